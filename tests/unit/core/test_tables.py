import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livar_merge import GShapTable, TableError, make_table
from livar_merge.tables import assign_bins, content_checksum

# Appendix Table A as printed in the paper: rows Q_A bins, columns Q_B bins.
PAPER_PRINTED = {
    ("A<25", "B<60"): 0.038,
    ("A<25", "B60-80"): 0.100,
    ("A<25", "B>80"): 0.193,
    ("A25-50", "B<60"): 0.038,
    ("A25-50", "B60-80"): 0.089,
    ("A25-50", "B>80"): 0.118,
    ("A>50", "B<60"): 0.038,
    ("A>50", "B60-80"): 0.078,
    ("A>50", "B>80"): 0.093,
}
# The released code's constants: rows Q_B bins, columns Q_A bins.
RELEASED = [
    [0.03813978, 0.03813978, 0.03813978],
    [0.09813978, 0.08813978, 0.07813978],
    [0.19313978, 0.11813978, 0.09313978],
]
# A representative percentile inside each bin, and the bin's boundaries.
A_POINTS = {"A<25": 10.0, "A25-50": 40.0, "A>50": 75.0}
B_POINTS = {"B<60": 30.0, "B60-80": 70.0, "B>80": 90.0}


def test_paper_table_all_nine_cells_by_hand():
    table = GShapTable.load("paper-table-a")
    assert table.version == 1 and table.base_value == pytest.approx(0.063)
    for (a_bin, b_bin), value in PAPER_PRINTED.items():
        assert table.lookup(A_POINTS[a_bin], B_POINTS[b_bin]) == pytest.approx(value, abs=1e-12)


def test_reference_table_all_nine_cells_by_hand():
    table = GShapTable.load("reference-code")
    assert table.base_value is None
    b_names, a_names = ["B<60", "B60-80", "B>80"], ["A<25", "A25-50", "A>50"]
    for i, b_bin in enumerate(b_names):
        for j, a_bin in enumerate(a_names):
            assert table.lookup(A_POINTS[a_bin], B_POINTS[b_bin]) == RELEASED[i][j]


@pytest.mark.parametrize("name", ["paper-table-a", "reference-code"])
def test_boundaries_fall_in_the_middle_bin(name):
    table = GShapTable.load(name)
    v = table.values
    # Exactly on an edge -> middle bin; just outside -> outer bin (Table A's <, <=, >).
    assert table.lookup(25, 70) == v[1, 1]
    assert table.lookup(50, 70) == v[1, 1]
    assert table.lookup(24.999, 70) == v[1, 0]
    assert table.lookup(50.001, 70) == v[1, 2]
    assert table.lookup(40, 60) == v[1, 1]
    assert table.lookup(40, 80) == v[1, 1]
    assert table.lookup(40, 59.999) == v[0, 1]
    assert table.lookup(40, 80.001) == v[2, 1]


def test_assign_bins_rule_for_more_bins_and_ties():
    edges = np.array([1.0, 2.0, 3.0])
    values = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    assert assign_bins(values, edges).tolist() == [0, 1, 1, 1, 2, 2, 3]
    tied = np.array([2.0, 2.0])
    assert assign_bins(np.array([1.0, 2.0, 3.0]), tied).tolist() == [0, 1, 2]
    assert assign_bins(np.array([1.0, 2.0]), np.array([1.0])).tolist() == [1, 1]
    assert assign_bins(np.array([0.0, 9.0]), np.array([])).tolist() == [0, 0]


def test_repr_and_dataframe():
    table = GShapTable.load("paper-table-a")
    text = repr(table)
    assert "paper-table-a v1" in text and "0.193" in text and "Q_B>80" in text
    frame = table.to_dataframe()
    assert list(frame.index) == ["Q_B<60", "60<=Q_B<=80", "Q_B>80"]
    assert list(frame.columns) == ["Q_A<25", "25<=Q_A<=50", "Q_A>50"]
    assert frame.loc["Q_B>80", "Q_A<25"] == pytest.approx(0.193)


def test_save_load_round_trip_and_immutability(tmp_path):
    table = make_table(
        "toy",
        3,
        np.arange(1, 17).reshape(4, 4) / 10,
        edges_a=(20, 40, 60),
        edges_b=(10, 50, 90),
        base_value=0.5,
    )
    path = table.save(tmp_path)
    assert path.name == "toy.v3.json"
    again = GShapTable.load(path)
    assert again == table and again.shape == (4, 4)
    with pytest.raises(TableError, match="exists"):
        table.save(path)


def test_name_resolution(tmp_path, monkeypatch):
    for version in (1, 2):
        make_table("mine", version, [[1.0, 2.0], [3.0, 4.0]], edges_a=(50,), edges_b=(50,)).save(
            tmp_path
        )
    monkeypatch.setenv("LIVAR_GSHAP_PATH", str(tmp_path))
    assert GShapTable.load("mine").version == 2
    assert GShapTable.load("mine.v1").version == 1
    assert GShapTable.load("mine@1").version == 1
    with pytest.raises(TableError, match="available: .*paper-table-a"):
        GShapTable.load("no-such-table")
    with pytest.raises(TableError, match="does not exist"):
        GShapTable.load(tmp_path / "missing.json")


def _write(tmp_path: Path, document, name="t.v1.json") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def _good_document() -> dict:
    return GShapTable.load("paper-table-a").to_document()


def _resealed(document: dict) -> dict:
    document = dict(document)
    document["checksum"] = content_checksum(document)
    return document


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema_version=2), "unsupported schema_version 2"),
        (lambda d: d.pop("values"), "'values' is a required property"),
        (lambda d: d.update(extra=1), "Additional properties"),
        (lambda d: d["values"][1].__setitem__(2, -0.1), "field values/1/2"),
        (lambda d: d["values"].pop(), "expected 3 rows"),
        (lambda d: d["quantile_edges"].update(A=[50, 25]), "strictly increasing"),
        (lambda d: d["quantile_edges"].update(B=[60, 100]), "field quantile_edges/B/1"),
        (lambda d: d.update(version="1"), "field version"),
        (lambda d: d["provenance"].pop("backbone"), "'backbone' is a required property"),
    ],
)
def test_malformed_tables_name_file_and_field(tmp_path, mutate, message):
    document = _good_document()
    mutate(document)
    path = _write(tmp_path, _resealed(document))
    with pytest.raises(TableError, match=message) as info:
        GShapTable.load(path)
    assert str(path) in str(info.value)


def test_tampered_table_fails_checksum(tmp_path):
    document = _good_document()
    document["values"][2][0] = 0.5
    path = _write(tmp_path, document)
    with pytest.raises(TableError, match="field checksum.*edited or corrupted"):
        GShapTable.load(path)


def test_not_json(tmp_path):
    path = _write(tmp_path, "{ not json")
    with pytest.raises(TableError, match=r"not valid JSON \(line 1"):
        GShapTable.load(path)


# ---------------------------------------------------------------- property-based
edges_strategy = st.lists(
    st.floats(min_value=0.5, max_value=99.5, allow_nan=False), min_size=0, max_size=4
).map(lambda xs: sorted(set(round(x, 3) for x in xs)))


@st.composite
def random_tables(draw):
    edges_a, edges_b = draw(edges_strategy), draw(edges_strategy)
    rows, cols = len(edges_b) + 1, len(edges_a) + 1
    cells = draw(
        st.lists(
            st.floats(min_value=1e-6, max_value=10.0), min_size=rows * cols, max_size=rows * cols
        )
    )
    return make_table(
        "random",
        draw(st.integers(1, 50)),
        np.array(cells).reshape(rows, cols),
        edges_a=edges_a,
        edges_b=edges_b,
        base_value=draw(st.none() | st.floats(-1, 1)),
    )


@settings(max_examples=40, deadline=None)
@given(table=random_tables())
def test_random_valid_tables_round_trip(tmp_path_factory, table):
    path = table.save(tmp_path_factory.mktemp("t") / table.file_name)
    loaded = GShapTable.load(path)
    assert loaded == table
    np.testing.assert_array_equal(loaded.values, table.values)
    assert loaded.to_dataframe().shape == table.shape


@settings(max_examples=40, deadline=None)
@given(table=random_tables(), cut=st.floats(0.0, 0.999))
def test_truncated_files_are_rejected(tmp_path_factory, table, cut):
    text = json.dumps(table.to_document(), indent=2)
    path = tmp_path_factory.mktemp("t") / "x.v1.json"
    path.write_text(text[: int(len(text) * cut)])
    with pytest.raises(TableError):
        GShapTable.load(path)


@settings(max_examples=60, deadline=None)
@given(table=random_tables(), data=st.data())
def test_corrupted_cells_are_rejected(tmp_path_factory, table, data):
    document = table.to_document()
    rows, cols = table.shape
    i, j = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
    document["values"][i][j] = data.draw(st.sampled_from([0, -1.0, None, "x", [1.0]]))
    path = tmp_path_factory.mktemp("t") / "x.v1.json"
    path.write_text(json.dumps(_resealed(document)))
    with pytest.raises(TableError, match="values"):
        GShapTable.load(path)
