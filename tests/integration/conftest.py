import pytest

from livar_merge.federated.config import resolve_config


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory):
    """The tiny preset run in-process: ``(folder, summary)``, the reference of the Flower
    engines."""
    from livar_merge.engines.inprocess import run_federated

    out = tmp_path_factory.mktemp("inprocess")
    return out, run_federated(resolve_config("tiny", None, {}), out)
