"""The livar-fed presets (livar_merge.federated.config)."""

from livar_merge.federated.config import resolve_config


def test_cpu_preset_is_the_pretrained_backbone_and_cpu_random_the_control():
    cpu, control = resolve_config("cpu"), resolve_config("cpu-random")
    assert (cpu.model, cpu.weights) == ("vit_small_patch14_dinov2", "dinov2-s14-imgfocus")
    assert (control.weights, control.embed_dim) == ("random", 96)
