"""The livar-fed command line (livar_merge.apps.fed_cli): help and refusals."""

from __future__ import annotations

import pytest

from livar_merge.federated.config import resolve_config
from tests.helpers import fresh_imports


def test_cli_help_is_light_and_documents_options():
    from livar_merge.apps.fed_cli import build_parser

    code = "from livar_merge.apps.fed_cli import build_parser; build_parser().format_help()"
    assert fresh_imports(code, ["torch"]) == []
    text = build_parser().format_help()
    assert "--lora-merge" in text and "--sigma-pass" in text


def test_cli_engine_option_and_refusals(capsys, tmp_path):
    from livar_merge.apps.fed_cli import main

    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--engine", "ray"])
    assert "engine must be one of" in capsys.readouterr().err
    assert (
        resolve_config("tiny", None, {"engine": "flower"}).config_hash()
        == resolve_config("tiny", None, {}).config_hash()
    )
