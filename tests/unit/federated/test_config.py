"""The livar-fed presets (livar_merge.federated.config)."""

from livar_merge.federated.config import resolve_config


def test_cpu_preset_is_the_pretrained_backbone_and_cpu_random_the_control():
    cpu, control = resolve_config("cpu"), resolve_config("cpu-random")
    assert (cpu.model, cpu.weights) == ("vit_small_patch14_dinov2", "dinov2-s14-imgfocus")
    assert (control.weights, control.embed_dim) == ("random", 96)


def test_legacy_boolean_augment_and_the_hash_of_an_earlier_run():
    """``augment`` was a boolean before 'rrc': files and run configs still read it (through
    livar_merge.federated.migrations), and a config.json written then (tests/data, by commit
    d090cb9) keeps its hash; the dataclass itself takes today's form only."""
    import json

    import pytest

    from livar_merge._options import check_dataclass
    from livar_merge.errors import ConfigError
    from livar_merge.federated.config import FedConfig, resolve_config
    from livar_merge.federated.migrations import upgrade_options
    from tests.helpers import REPO

    for value, choice in ((True, "pad-crop"), ("true", "pad-crop"), ("no", "off"), (0, "off")):
        assert resolve_config("tiny", {"augment": value}).augment == choice
    assert upgrade_options({"augment": True, "lr": 0.1}) == {"augment": "pad-crop", "lr": 0.1}
    with pytest.raises(ConfigError, match="augment"):
        check_dataclass(FedConfig(augment=True))  # type: ignore[arg-type]
    saved = json.loads((REPO / "tests" / "data" / "legacy_fed_config.json").read_text())
    assert saved["config"]["augment"] is False
    upgraded = FedConfig(**upgrade_options(saved["config"]))
    assert upgraded.augment == "off" and upgraded.config_hash() == saved["config_hash"]


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


def test_earlier_formats_have_one_home():
    """The names of earlier formats appear only in livar_merge/federated/migrations.py."""
    from tests.helpers import REPO

    markers = ('"tracker_state" in', "LEGACY_AUGMENT", "OMITS_DEFAULT", "legacy_augment")
    home = REPO / "livar_merge" / "federated" / "migrations.py"
    found = [
        f"{path.relative_to(REPO)}: {marker}"
        for package in ("livar_merge", "livar_calib", "analysis")
        for path in sorted((REPO / package).rglob("*.py"))
        if path != home
        for marker in markers
        if marker in path.read_text()
    ]
    assert found == []
    assert all(marker in home.read_text() for marker in markers[:3])


def test_option_groups_are_declared_once_and_composed():
    """FedConfig and CalibConfig are composed of the same option groups: a shared option's help
    and bounds are the group's; CalibConfig only chooses other defaults (option_like)."""
    import dataclasses

    from livar_calib.config import CalibConfig
    from livar_merge._options import option_specs
    from livar_merge.federated.config import (
        DataOptions,
        FedConfig,
        ModelOptions,
        RuntimeOptions,
        TrainingOptions,
    )

    for group in (DataOptions, ModelOptions, RuntimeOptions, TrainingOptions):
        assert issubclass(FedConfig, group) and issubclass(CalibConfig, group)
        for f in dataclasses.fields(group):
            own, fed, calib = (option_specs(c)[f.name] for c in (group, FedConfig, CalibConfig))
            assert own.help == fed.help == calib.help, f.name
            assert own.bounds == fed.bounds == calib.bounds, f.name
            assert own.default == fed.default, f.name  # FedConfig keeps the groups' defaults
    assert CalibConfig().image_size == 42 and FedConfig().image_size == 224
