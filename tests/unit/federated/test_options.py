"""Options declared once: Literal choices, bounds, run configs and failing fast."""

import subprocess
import sys
import typing

import pytest

from livar_calib import cli as calib_cli
from livar_calib.config import CalibConfig, validate_calib_config
from livar_merge._options import coerce_option, option_specs
from livar_merge.aggregation import (
    register_method,
    unregister_method,
)
from livar_merge.apps import fed_cli as fed_cli
from livar_merge.errors import ConfigError, TableError
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
    assert coerce_option(FedConfig, "progress", "yes") is True
    assert coerce_option(FedConfig, "augment", "rrc") == "rrc"
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


def test_method_options_are_the_methods_own():
    config = resolve_config("tiny", None, {"method": "regmean", "regmean_shrinkage": 0.25})
    assert config.method_options() == {"lora_merge": "product", "regmean_shrinkage": 0.25}
    assert config.method_options("fisher") == {"fisher_floor": 1e-8}
    assert set(config.method_options("livar", "fisher")) == {"table", "lora_merge", "fisher_floor"}


def test_user_option_outside_fedconfig_is_refused_by_the_run_config():
    register_method("test-level")(lambda *, level=1: None)
    try:
        with pytest.raises(ConfigError, match="'test-level' declares option 'level'"):
            resolve_config("tiny", None, {"method": "test-level"})
    finally:
        unregister_method("test-level")


def test_registry_config_and_clis_do_not_import_torch():
    code = (
        "import sys\n"
        "import livar_merge.aggregation.registry\n"
        "from livar_merge.apps import fed_cli as cli\n"
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
