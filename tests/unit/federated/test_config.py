"""The livar-fed presets (livar_merge.federated.config)."""

from livar_merge.federated.config import resolve_config


def test_cpu_preset_is_the_pretrained_backbone_and_cpu_random_the_control():
    cpu, control = resolve_config("cpu"), resolve_config("cpu-random")
    assert (cpu.model, cpu.weights) == ("vit_small_patch14_dinov2", "dinov2-s14-imgfocus")
    assert (control.weights, control.embed_dim) == ("random", 96)


def test_legacy_boolean_augment_and_the_hash_of_an_earlier_run():
    """``augment`` was a boolean before 'rrc': files, run configs and constructors still read
    it, and a config.json written then (tests/data, by commit d090cb9) keeps its hash."""
    import json

    from livar_merge.federated.config import FedConfig, resolve_config
    from tests.helpers import REPO

    for value, choice in ((True, "pad-crop"), ("true", "pad-crop"), ("no", "off"), (0, "off")):
        assert resolve_config("tiny", {"augment": value}).augment == choice
    assert FedConfig(augment=True).augment == "pad-crop"  # type: ignore[arg-type]
    saved = json.loads((REPO / "tests" / "data" / "legacy_fed_config.json").read_text())
    assert saved["config"]["augment"] is False
    assert FedConfig(**saved["config"]).config_hash() == saved["config_hash"]


def test_released_protocol_sets_its_options_and_refuses_contradictions():
    import pytest

    from livar_merge.errors import ConfigError
    from livar_merge.federated.config import RELEASED_PROTOCOL, resolve_config

    config = resolve_config("tiny", None, {"protocol": "released"})
    for name, value in RELEASED_PROTOCOL.items():
        assert getattr(config, name) == value, name
    assert config.lora_alpha == config.lora_rank == 4  # LoRA scale 1
    # what the user gives explicitly wins, except a merge that is not the factor merge
    assert resolve_config("tiny", None, {"protocol": "released", "augment": "off"}).augment == "off"
    kept = resolve_config("tiny", None, {"protocol": "released", "lora_alpha": 8.0})
    assert kept.lora_alpha == 8.0
    with pytest.raises(ConfigError, match="lora_merge 'svd' contradicts it"):
        resolve_config("tiny", None, {"protocol": "released", "lora_merge": "svd"})
    with pytest.raises(ConfigError, match="--paired under --protocol released"):
        resolve_config("tiny", None, {"protocol": "released", "paired": ["fedavg"]})
    paper = resolve_config("tiny")
    assert paper.protocol == "paper" and paper.lora_merge == "product"
