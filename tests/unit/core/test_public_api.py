"""The package's public API: one lazy table, everything resolvable, ``import livar_merge`` light."""

import subprocess
import sys
from importlib import metadata

import livar_merge


def test_every_public_name_resolves_from_its_module():
    assert livar_merge.__all__ == sorted(livar_merge.__all__)
    for name in livar_merge.__all__:
        assert getattr(livar_merge, name) is not None, name
    for name in ("ClientUpdate", "make_aggregator", "available_methods", "register_method"):
        assert name in livar_merge.__all__
    assert "livar" in livar_merge.available_methods()


def test_version_comes_from_the_package_metadata():
    assert livar_merge.__version__ == metadata.version("livar")


def test_importing_the_package_does_not_import_torch():
    code = "import sys, livar_merge; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
