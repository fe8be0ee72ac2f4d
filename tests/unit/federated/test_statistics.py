"""The clients' statistics passes (livar_merge.federated.statistics): diagonal Fisher, Grams,
prototypes and feature moments against per-sample loops and numpy."""

import numpy as np
import pytest
import torch

from tests.helpers import tiny_peft_vit


def random_images(count: int, seed: int):
    """``count`` random 16 px images of 5 classes as a CPU batch source, and their labels."""
    from livar_merge.federated.data import BatchSource
    from livar_merge.federated.datasets import InMemoryImages

    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 16, 16), generator=gen, dtype=torch.uint8)
    labels = np.arange(count) % 5
    images = InMemoryImages(images, labels, list("abcde"))
    source = BatchSource(images, mean=(0.5,) * 3, std=(0.5,) * 3, device=torch.device("cpu"))
    return source, labels


def per_sample_fisher(model, source, count):
    """Brute force: one forward and backward pass per sample, squares summed in float64."""
    model.eval()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}
    for i in range(count):
        x, y = next(source.batches(np.array([i]), 1))
        model.zero_grad()
        torch.log_softmax(model(x), -1)[0, y[0]].backward()
        for n, p in named.items():
            expected[n] += p.grad.double() ** 2 / count
    return expected


def fisher_key(name: str) -> str:
    """The name of :func:`per_sample_fisher` a key of ``diagonal_fisher`` stands for."""
    if name.startswith("head."):
        return name.replace("head.", "base_model.model.head.modules_to_save.default.")
    return name.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default.")


@pytest.mark.parametrize("batch_size", [32, 3])
def test_diagonal_fisher_matches_a_per_sample_loop(batch_size):
    from livar_merge.federated.statistics import diagonal_fisher

    model = tiny_peft_vit(seed=5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    source, _ = random_images(10, seed=0)
    fisher = diagonal_fisher(model, source, np.arange(10), max_samples=10, batch_size=batch_size)
    expected = per_sample_fisher(model, source, 10)
    assert len(fisher) == len(expected)
    # float32 forward passes of a batch vs single samples differ in the last bits
    for key, value in fisher.items():
        torch.testing.assert_close(value, expected[fisher_key(key)], rtol=1e-4, atol=1e-7)
    # every statistic is informative (not all zeros) so the comparison can fail
    assert all(value.abs().max() > 0 for value in fisher.values())


def test_diagonal_fisher_with_a_trainable_non_linear_takes_the_per_sample_path():
    """A trainable LayerNorm is not covered by the Linear hooks: the brute-force path runs and
    still matches (the hook path would silently miss the LayerNorm's gradients)."""
    from livar_merge.federated.statistics import diagonal_fisher

    model = tiny_peft_vit(seed=7)
    norm = model.base_model.model.norm
    for p in norm.parameters():
        p.requires_grad_(True)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    source, _ = random_images(6, seed=2)
    fisher = diagonal_fisher(model, source, np.arange(6), max_samples=6)
    expected = per_sample_fisher(model, source, 6)
    assert set(map(fisher_key, fisher)) == set(expected)
    for key, value in fisher.items():
        torch.testing.assert_close(value, expected[fisher_key(key)], rtol=1e-4, atol=1e-7)


def test_feature_moments_and_gram_pass_against_numpy():
    from livar_merge.federated.model import forward_with_features
    from livar_merge.federated.statistics import feature_moments, gram_and_prototype_pass

    model = tiny_peft_vit(seed=6).eval()
    source, labels = random_images(23, seed=1)
    idx = np.arange(23)
    captured = []
    layer = "base_model.model.blocks.1.mlp.fc2"
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, args, _out: captured.append(args[0].detach().double())
    )
    with torch.no_grad():
        feats = (
            torch.cat([forward_with_features(model, x)[0] for x, _ in source.batches(idx, 8)])
            .double()
            .numpy()
        )
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).numpy()
    stats = gram_and_prototype_pass(
        model, source, idx, 5, layers=[layer], batch_size=8, want_gram=True, want_prototypes=True
    )
    np.testing.assert_allclose(stats["gram"][layer].numpy(), x.T @ x, rtol=1e-9)
    aug = np.c_[feats, np.ones(23)]
    np.testing.assert_allclose(stats["head_gram"].numpy(), aug.T @ aug, rtol=1e-9)
    np.testing.assert_allclose(stats["proto_mean"][2], feats[labels == 2].mean(0), rtol=1e-9)
    moments = feature_moments(model, source, idx, 5, batch_size=8)
    np.testing.assert_allclose(moments["mean"][3], feats[labels == 3].mean(0), rtol=1e-9)
    np.testing.assert_allclose(moments["cov"][3], np.cov(feats[labels == 3].T), atol=1e-9)
    diag = feature_moments(model, source, idx, 5, batch_size=8, full_covariance=False)
    np.testing.assert_allclose(diag["cov"][3], np.var(feats[labels == 3], 0, ddof=1), atol=1e-9)
