"""UTF-8 line tables: ``<id> <value>`` metadata files and one-name-a-line class lists."""

from __future__ import annotations

from pathlib import Path

from livar_merge.federated.datasets.formats.folders import need_file
from livar_merge.federated.datasets.registry import dataset_error


def text_lines(dataset: str, path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-empty lines of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise dataset_error(dataset, f"cannot read {path}: {exc}", hint=False) from exc
    return [(no, line.strip()) for no, line in enumerate(text.splitlines(), 1) if line.strip()]


def id_table(dataset: str, path: Path, what: str) -> dict[int, tuple[str, int]]:
    """``id value`` lines of a metadata file -> {id: (value, line number)}."""
    need_file(dataset, path, what)
    table: dict[int, tuple[str, int]] = {}
    for no, line in text_lines(dataset, path):
        key, _, value = line.partition(" ")
        if not key.isdigit() or not value.strip():
            raise dataset_error(
                dataset, f"{path} line {no}: expected '<id> <value>', got {line!r}", hint=False
            )
        if int(key) in table:
            raise dataset_error(dataset, f"{path} line {no}: id {key} appears twice", hint=False)
        table[int(key)] = (value.strip(), no)
    return table


def int_field(
    dataset: str, path: Path, key: int, entry: tuple[str, int], low: int, high: int
) -> int:
    """The value of ``entry`` as an int in [low, high], else an error naming file and line."""
    value, no = entry
    if not value.isdigit() or not low <= int(value) <= high:
        raise dataset_error(
            dataset,
            f"{path} line {no}: image id {key} has value {value!r}, expected an integer in "
            f"[{low}, {high}]",
            hint=False,
        )
    return int(value)


def read_wnids(dataset: str, path: Path) -> list[str]:
    """The wnids of ``wnids.txt`` (one a line), rejecting duplicates and blanks-with-spaces."""
    wnids: list[str] = []
    seen: dict[str, int] = {}
    for no, line in text_lines(dataset, path):
        if len(line.split()) != 1:
            raise dataset_error(
                dataset, f"{path} line {no}: expected one wnid, got {line!r}", hint=False
            )
        if line in seen:
            raise dataset_error(
                dataset,
                f"{path} line {no}: wnid {line} repeats line {seen[line]}",
                hint=False,
            )
        seen[line] = no
        wnids.append(line)
    if not wnids:
        raise dataset_error(dataset, f"{path} lists no wnids.", hint=False)
    return wnids
