"""Options declared once: Literal choices, bounds, the method registry and failing fast."""

import inspect
import subprocess
import sys
import typing

import numpy as np
import pytest
from test_aggregation import make_updates

import livar_merge.aggregation as aggregation
from livar_calib import cli as calib_cli
from livar_calib.config import CalibConfig, validate_calib_config
from livar_merge._options import coerce_option, option_specs
from livar_merge.aggregation import (
    available_methods,
    make_aggregator,
    method_spec,
    register_method,
    unregister_method,
)
from livar_merge.aggregation.registry import keyword_parameters
from livar_merge.errors import ConfigError, MethodOptionError, RegistrationError, TableError
from livar_merge.federated import cli as fed_cli
from livar_merge.federated.config import FedConfig, resolve_config, validate_config

CONFIGS = [(FedConfig, fed_cli.build_parser), (CalibConfig, calib_cli.build_parser)]
CHOICE_ERROR = "option lora_merge must be one of 'product', 'svd', 'factors'; got 'average'"


def literal_fields(cls):
    hints = typing.get_type_hints(cls)
    return {
        name: typing.get_args(hint)
        for name, hint in hints.items()
        if typing.get_origin(hint) is typing.Literal
    }


@pytest.mark.parametrize(("cls", "build_parser"), CONFIGS)
def test_literal_choices_reach_argparse_and_help(cls, build_parser):
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    text = parser.format_help()
    assert literal_fields(cls), "the choice fields are typed with Literal"
    for name, choices in literal_fields(cls).items():
        assert actions[name].choices == list(choices), name
        assert "{" + ",".join(choices) + "}" in text, name


@pytest.mark.parametrize(
    ("cls", "check"), [(FedConfig, validate_config), (CalibConfig, validate_calib_config)]
)
def test_every_literal_field_is_checked_on_a_built_config(cls, check):
    for name in literal_fields(cls):
        with pytest.raises(ConfigError, match=f"option {name} must be one of"):
            check(cls(**{name: "not-a-choice"}))


def test_a_bad_choice_gives_the_same_error_from_a_file_the_command_line_and_a_run_config(
    tmp_path, capsys
):
    config = tmp_path / "run.toml"
    config.write_text('lora-merge = "average"\n')
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:  # TOML file
        fed_cli.main(["--preset", "tiny", "--config", str(config), "--out", str(out)])
    assert exc.value.code == 2 and CHOICE_ERROR in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # command line
        fed_cli.main(["--preset", "tiny", "--lora-merge", "average", "--out", str(out)])
    assert exc.value.code == 2 and CHOICE_ERROR in capsys.readouterr().err
    with pytest.raises(ConfigError) as err:  # Flower run config (the ServerApp's resolve_config)
        resolve_config("tiny", None, {"lora_merge": "average"})
    assert str(err.value) == CHOICE_ERROR
    assert not out.exists()


def test_coercion_checks_types_bounds_and_names():
    assert coerce_option(FedConfig, "rounds", "3") == 3
    assert coerce_option(FedConfig, "max_train", "none") is None
    assert coerce_option(FedConfig, "augment", "yes") is True
    assert coerce_option(CalibConfig, "betas", "0.1, 0.5") == [0.1, 0.5]
    with pytest.raises(ConfigError, match="option rounds must be >= 1, got 0"):
        coerce_option(FedConfig, "rounds", 0)
    with pytest.raises(ConfigError, match=r"option lora_dropout must be in \[0, 1\), got 1.0"):
        coerce_option(FedConfig, "lora_dropout", 1)
    with pytest.raises(ConfigError, match="option rounds expects int, got 'two'"):
        coerce_option(FedConfig, "rounds", "two")
    with pytest.raises(ConfigError, match="option rounds cannot be None"):
        coerce_option(FedConfig, "rounds", "none")
    with pytest.raises(ConfigError, match="option betas must hold values > 0"):
        coerce_option(CalibConfig, "betas", [0.5, -1])
    with pytest.raises(ConfigError, match="unknown option 'round'; did you mean rounds"):
        coerce_option(FedConfig, "round", 3)
    with pytest.raises(ConfigError, match="option beta expects float, got 'x'"):
        validate_config(FedConfig(beta="x"))


# ------------------------------------------------------------------------------ the registry
def factory_parameters(spec):
    """Keyword parameters of a built-in factory and their defaults; a factory forwarding
    ``**options`` forwards them to the class it returns (CCVR's ``ccvr_*`` options)."""
    factory = spec.load()
    params = keyword_parameters(factory)
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()):
        returned = typing.get_type_hints(factory)["return"]
        params |= {k: v for k, v in keyword_parameters(returned).items() if k not in ("name",)}
    return {k: v for k, v in params.items() if k != "base"}


@pytest.mark.parametrize("name", available_methods())
def test_builtin_options_are_fedconfig_fields_with_its_defaults(name):
    spec = method_spec(name)
    params = factory_parameters(spec)
    assert set(spec.options) == set(params), name
    defaults = FedConfig()
    for option in spec.options:
        assert params[option] == getattr(defaults, option), (name, option)
    aggregator = make_aggregator(name)
    assert aggregator.needs == spec.needs and aggregator.describe()["method"] == name
    assert spec.uses_table == (name in ("livar", "livar-alpha", "livar+ccvr"))


def test_make_aggregator_refuses_options_a_method_does_not_take():
    with pytest.raises(MethodOptionError) as err:
        make_aggregator("fisher", lora_merge="svd", ccvr_lr=0.1)
    message = str(err.value)
    assert "'fisher'" in message and "ccvr_lr, lora_merge" in message
    assert "it takes: fisher_floor" in message
    with pytest.raises(ValueError, match="unknown aggregation method 'fedmagic'"):
        make_aggregator("fedmagic")


def test_method_options_are_the_methods_own():
    config = resolve_config("tiny", None, {"method": "regmean", "regmean_shrinkage": 0.25})
    assert config.method_options() == {"lora_merge": "product", "regmean_shrinkage": 0.25}
    assert config.method_options("fisher") == {"fisher_floor": 1e-8}
    assert set(config.method_options("livar", "fisher")) == {"table", "lora_merge", "fisher_floor"}


def test_paired_aggregators_take_their_own_options():
    from livar_merge.federated.paired import check_paired

    values = {"table": "reference-code", "lora_merge": "svd", "regmean_shrinkage": 0.3}
    aggregators = check_paired("fedavg", ["livar", "regmean"], values)
    assert aggregators["livar"].describe()["table"]["name"] == "reference-code"
    assert aggregators["regmean"].shrinkage == 0.3 and aggregators["regmean"].lora_merge == "svd"


@pytest.fixture
def user_method():
    from livar_merge.aggregation.weighted import WeightedAggregator

    @register_method("test-half", needs={"sigma"})
    def half(*, lora_merge="product", proto_weight=1.0):
        """FedAvg LoRA, variance head (a user method for the tests)."""
        aggregator = WeightedAggregator("test-half", "samples", "variance", lora_merge=lora_merge)
        aggregator.weight = proto_weight
        return aggregator

    yield half
    unregister_method("test-half")


def test_a_user_method_runs_end_to_end_with_its_declared_options(user_method):
    spec = method_spec("test-half")
    assert spec.options == ("lora_merge", "proto_weight") and spec.needs == {"sigma"}
    assert spec.description.startswith("FedAvg LoRA") and not spec.uses_table
    config = resolve_config("tiny", None, {"method": "test-half", "proto_weight": 0.5})
    assert config.method_options() == {"lora_merge": "product", "proto_weight": 0.5}
    aggregator = make_aggregator(config.method, **config.method_options())
    assert aggregator.weight == 0.5
    reference = make_aggregator("livar-sigma")
    updates = make_updates()
    np.testing.assert_array_equal(
        aggregator.aggregate(updates).head.weight, reference.aggregate(updates).head.weight
    )
    with pytest.raises(MethodOptionError, match="'test-half' does not take option"):
        make_aggregator("test-half", table="paper-table-a")
    with pytest.raises(RegistrationError, match="registered twice"):
        register_method("test-half")(user_method)


def test_registrations_are_checked():
    def factory(*, lora_merge="product"):
        raise AssertionError("never built")

    with pytest.raises(RegistrationError, match="does not take"):
        register_method("test-bad", options=("fisher_floor",))(factory)
    with pytest.raises(RegistrationError, match="known needs"):
        register_method("test-bad", needs={"hessian"})(factory)
    assert "test-bad" not in available_methods()


def test_user_option_outside_fedconfig_is_refused_by_the_run_config():
    register_method("test-level")(lambda *, level=1: None)
    try:
        with pytest.raises(ConfigError, match="'test-level' declares option 'level'"):
            resolve_config("tiny", None, {"method": "test-level"})
    finally:
        unregister_method("test-level")


def test_package_names_resolve_and_all_lists_them():
    assert aggregation.__all__ == sorted(aggregation.__all__, key=lambda n: (n != n.upper(), n))
    for name in aggregation.__all__:
        assert getattr(aggregation, name) is not None, name
    assert set(aggregation.__all__) >= set(aggregation._LAZY)


def test_registry_config_and_clis_do_not_import_torch():
    code = (
        "import sys\n"
        "import livar_merge.aggregation.registry\n"
        "from livar_merge.federated import cli\n"
        "from livar_calib import cli as calib\n"
        "from livar_merge.federated.config import resolve_config\n"
        "c = resolve_config('tiny', None, {'method': 'livar', 'paired': ['regmean']})\n"
        "cli.build_parser().format_help(); calib.build_parser().format_help()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ failing fast
FED, CALIB = fed_cli.main, calib_cli.main


@pytest.mark.parametrize(
    ("main", "options", "message"),
    [
        (FED, ["--method", "nope"], "unknown aggregation method 'nope'"),
        (FED, ["--table", "nope"], "option table: no G_SHAP table named 'nope'"),
        (FED, ["--method", "fedavg", "--paired", "livar", "--table", "nope"], "named 'nope'"),
        (FED, ["--lora-merge", "nope"], "option lora_merge must be one of"),
        (FED, ["--engine", "flower", "--method", "nope"], "unknown aggregation method"),
        (FED, ["--method", "fisher", "--paired", "fedproto"], "paired method 'fedproto'"),
        (CALIB, ["--precision", "fp8"], "option precision must be one of"),
        (CALIB, ["--seeds", "1", "1"], "option seeds must be one or more distinct seeds"),
        (CALIB, ["--max-train", "2", "--num-clients", "3"], "option max_train (2) is below"),
    ],
)
def test_bad_names_and_options_fail_before_any_data(tmp_path, capsys, main, options, message):
    """livar-fed and livar-calibrate: exit 2 with the message, nothing created."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", *options, "--out", str(out)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_a_table_only_the_method_does_not_read_is_not_loaded():
    assert resolve_config("tiny", None, {"method": "fedavg", "table": "nope"}).table == "nope"
    with pytest.raises(TableError):
        resolve_config("tiny", None, {"method": "livar-alpha", "table": "nope"})


def test_option_specs_read_the_declarations():
    specs = option_specs(FedConfig)
    assert specs["lora_merge"].choices == ("product", "svd", "factors")
    assert specs["beta"].bounds == {"gt": 0} and specs["paired"].is_list
    assert specs["max_train"].nullable and not specs["rounds"].nullable
