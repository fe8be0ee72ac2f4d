"""Paired evaluation (--paired): options, refusals before any data, and the interval maths."""

import json

import pytest
from scipy import stats

from livar_merge.apps.fed_cli import main
from livar_merge.errors import (
    LivarError,
)
from livar_merge.federated.paired import mean_interval, paired_summary, with_differences
from tests.helpers import tiny


def test_paired_aggregators_take_their_own_options():
    from livar_merge.federated.paired import check_paired

    values = {"table": "reference-code", "lora_merge": "svd", "regmean_shrinkage": 0.3}
    aggregators = check_paired("fedavg", ["livar", "regmean"], values)
    assert aggregators["livar"].describe()["table"]["name"] == "reference-code"
    assert aggregators["regmean"].shrinkage == 0.3 and aggregators["regmean"].lora_merge == "svd"


def test_paired_changes_the_config_hash_only_when_given():
    assert (
        tiny(method="fedavg").config_hash() != tiny(method="fedavg", paired=["livar"]).config_hash()
    )
    plain = tiny(method="fedavg").to_dict()
    plain.pop("paired")
    import hashlib

    ignore = {"out", "progress", "threads", "num_workers", "eval_batch_size", "engine"}
    ignore |= {"client_cpus", "client_gpus", "track"}
    later = {"ccvr_rounds", "protocol", "sigma_inputs", "clients_per_round", "fraction_train"}
    later |= {"client_ranks", "test_fraction", "image_column", "label_column", "partitioner"}
    later |= {"shards_per_client", "classes_per_client"}
    body = {k: v for k, v in plain.items() if k not in ignore and k not in later}
    body["augment"] = False  # the boolean 'augment' of earlier versions ('off')
    legacy = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    assert tiny(method="fedavg").config_hash() == legacy  # older run folders keep their hash


@pytest.mark.parametrize(
    ("paired", "message"),
    [
        (["nope"], "unknown"),
        (["fedavg"], "own method"),
        (["livar", "livar"], "twice"),
        (["ccvr"], "moments"),
        (["fedproto"], "prototypes"),
    ],
)
def test_bad_paired_methods_are_refused_before_any_data(paired, message):
    with pytest.raises(LivarError, match=message):
        tiny(method="fedavg", paired=paired)


def test_cli_refuses_a_bad_paired_method_with_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--method", "fedavg", "--paired", "ccvr", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "paired method 'ccvr'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_paired_list_from_a_string_as_in_toml_or_flower_run_config():
    assert tiny(paired="fedavg, livar-sigma").paired == ["fedavg", "livar-sigma"]
    assert tiny(paired="fedavg livar-alpha").paired == ["fedavg", "livar-alpha"]


def test_mean_interval_matches_scipy(rng):
    x = rng.normal(0.02, 0.05, size=9)
    got = mean_interval(x)
    low, high = stats.t.interval(0.95, 8, loc=x.mean(), scale=stats.sem(x))
    assert got["n"] == 9 and got["mean"] == pytest.approx(x.mean())
    assert (got["low"], got["high"]) == pytest.approx((low, high))
    assert mean_interval([0.1])["low"] is None and mean_interval([])["mean"] is None


def test_paired_summary_by_hand():
    rows = with_differences(
        [
            {
                "round": 1,
                "method": "a",
                "test_accuracy": 0.5,
                "aggregation_seconds": 0.1,
                "evaluation_seconds": 1.0,
            },
        ],
        0.4,
    ) + with_differences(
        [
            {
                "round": 2,
                "method": "a",
                "test_accuracy": 0.55,
                "aggregation_seconds": 0.1,
                "evaluation_seconds": 1.0,
            },
        ],
        0.6,
    )
    summary = paired_summary(rows, "own")["methods"]["a"]
    assert summary["final_difference"] == pytest.approx(-0.05)
    assert summary["rounds"]["mean"] == pytest.approx(0.025)
    assert summary["rounds_better"] == 1 and summary["rounds_worse"] == 1
    assert summary["evaluation_seconds"] == pytest.approx(2.0)
