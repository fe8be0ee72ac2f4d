"""Baselines (RegMean, Fisher, FedProto, CCVR) against independent computations."""

import numpy as np
import pytest
import torch
from helpers import tiny_peft_vit

from livar_merge.aggregation import ClientUpdate, make_aggregator
from livar_merge.aggregation.ccvr import (
    ClassMoments,
    pool_moments,
    retrain_head,
    sample_virtual_features,
)
from livar_merge.aggregation.fedproto import pooled_prototypes
from livar_merge.aggregation.fisher import fisher_average
from livar_merge.aggregation.regmean import regmean_delta, regmean_head, shrink_gram


def test_regmean_delta_solves_the_regression_on_the_clients_data(rng):
    """Shrinkage 1: RegMean = argmin_W sum_m ||X_m W^T - X_m dW_m^T||^2 (lstsq on stacked data)."""
    d, k, r, m = 7, 5, 2, 3
    xs = [rng.normal(size=(40, k)) for _ in range(m)]
    bs = [torch.as_tensor(rng.normal(size=(d, r))) for _ in range(m)]
    as_ = [torch.as_tensor(rng.normal(size=(r, k))) for _ in range(m)]
    grams = [torch.as_tensor(x.T @ x) for x in xs]
    merged = regmean_delta(bs, as_, grams, scaling=0.5, shrinkage=1.0).numpy()
    targets = [x @ (0.5 * b.numpy() @ a.numpy()).T for x, b, a in zip(xs, bs, as_, strict=True)]
    expected, *_ = np.linalg.lstsq(np.vstack(xs), np.vstack(targets), rcond=None)
    np.testing.assert_allclose(merged, expected.T, rtol=1e-9, atol=1e-10)


def test_regmean_with_shrinkage_matches_numpy_on_the_same_grams(rng):
    d, k, r = 6, 4, 2
    grams = [torch.as_tensor(g.T @ g) for g in (rng.normal(size=(9, k)) for _ in range(3))]
    bs = [torch.as_tensor(rng.normal(size=(d, r))) for _ in range(3)]
    as_ = [torch.as_tensor(rng.normal(size=(r, k))) for _ in range(3)]
    merged = regmean_delta(bs, as_, grams, scaling=1.0, shrinkage=0.3).numpy()
    shrunk = [0.3 * g.numpy() + 0.7 * np.diag(np.diag(g.numpy())) for g in grams]
    num = sum((b.numpy() @ a.numpy()) @ g for b, a, g in zip(bs, as_, shrunk, strict=True))
    expected = np.linalg.lstsq(sum(shrunk).T, num.T, rcond=None)[0].T
    np.testing.assert_allclose(merged, expected, rtol=1e-9)
    torch.testing.assert_close(shrink_gram(grams[0], 0.3), torch.as_tensor(shrunk[0]))


def test_regmean_singular_gram_uses_the_pseudo_inverse(rng):
    x = rng.normal(size=(3, 5))  # rank 3 < 5
    gram = torch.as_tensor(x.T @ x)
    b, a = torch.as_tensor(rng.normal(size=(4, 2))), torch.as_tensor(rng.normal(size=(2, 5)))
    merged = regmean_delta([b], [a], [gram], scaling=1.0, shrinkage=1.0).numpy()
    expected = (b.numpy() @ a.numpy() @ gram.numpy()) @ np.linalg.pinv(gram.numpy())
    np.testing.assert_allclose(merged, expected, atol=1e-8)


def test_regmean_head_with_bias(rng):
    feats = [rng.normal(size=(30, 4)) for _ in range(2)]
    ws = [torch.as_tensor(rng.normal(size=(3, 4))) for _ in range(2)]
    bs = [torch.as_tensor(rng.normal(size=3)) for _ in range(2)]
    grams = [torch.as_tensor(np.c_[f, np.ones(30)].T @ np.c_[f, np.ones(30)]) for f in feats]
    w, b = regmean_head(ws, bs, grams, shrinkage=1.0)
    xs = [np.c_[f, np.ones(30)] for f in feats]
    ys = [f @ w_.numpy().T + b_.numpy() for f, w_, b_ in zip(feats, ws, bs, strict=True)]
    sol = np.linalg.lstsq(np.vstack(xs), np.vstack(ys), rcond=None)[0].T
    np.testing.assert_allclose(w.numpy(), sol[:, :-1], atol=1e-9)
    np.testing.assert_allclose(b.numpy(), sol[:, -1], atol=1e-9)


def test_regmean_refuses_factors_mode():
    with pytest.raises(ValueError, match="product' or 'svd"):
        make_aggregator("regmean", lora_merge="factors")


def test_fisher_average_formula(rng):
    params = [torch.as_tensor(rng.normal(size=(3, 2))) for _ in range(3)]
    fishers = [torch.as_tensor(rng.exponential(size=(3, 2))) for _ in range(3)]
    fishers[1][0, 0] = 0.0
    merged = fisher_average(params, fishers, floor=1e-3).numpy()
    num = sum((f.numpy() + 1e-3) * p.numpy() for p, f in zip(params, fishers, strict=True))
    den = sum(f.numpy() + 1e-3 for f in fishers)
    np.testing.assert_allclose(merged, num / den)


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


def test_diagonal_fisher_matches_a_per_sample_loop():
    from livar_merge.federated.statistics import diagonal_fisher

    model = tiny_peft_vit(seed=5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    source, _ = random_images(10, seed=0)
    fisher = diagonal_fisher(model, source, np.arange(10), max_samples=10)
    model.eval()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}
    for i in range(10):
        x, y = next(source.batches(np.array([i]), 1))
        model.zero_grad()
        torch.log_softmax(model(x), -1)[0, y[0]].backward()
        for n, p in named.items():
            expected[n] += p.grad.double() ** 2 / 10
    key = "base_model.model.blocks.0.attn.qkv.lora_B.weight"
    # float32 forward passes of a batch vs single samples differ in the last bits
    tol = {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(
        fisher[key], expected[key.replace("lora_B.", "lora_B.default.")], **tol
    )
    head = "base_model.model.head.modules_to_save.default.weight"
    torch.testing.assert_close(fisher["head.weight"], expected[head], **tol)
    assert len(fisher) == len(named)


def test_prototypes_and_their_loss(rng):
    from livar_merge.federated.client import prototype_loss

    means = [
        np.array([[1.0, 0.0], [np.nan, np.nan], [2.0, 2.0]]),
        np.array([[3.0, 0.0], [np.nan, np.nan], [np.nan, np.nan]]),
    ]
    counts = [np.array([1, 0, 4]), np.array([3, 0, 0])]
    proto, total = pooled_prototypes(means, counts)
    np.testing.assert_allclose(proto[0], [2.5, 0.0])
    assert np.isnan(proto[1]).all() and total.tolist() == [4, 0, 4]
    np.testing.assert_allclose(proto[2], [2.0, 2.0])
    feats = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 1, 2])
    loss = prototype_loss(feats, labels, torch.as_tensor(proto, dtype=torch.float32))
    assert loss.item() == pytest.approx((2.5**2 + 3**2 + 3**2) / 2)  # class 1 has no prototype


@pytest.mark.parametrize("diagonal", [False, True])
def test_pooled_moments_equal_the_moments_of_the_union(rng, diagonal):
    data = [rng.normal(size=(n, 3)) * [1, 2, 3] + c for n, c in ((5, 0), (9, 1), (2, -1))]
    means = [x.mean(0)[None] for x in data]
    covs = [(np.diag(np.cov(x.T)) if diagonal else np.cov(x.T))[None] for x in data]
    counts = [np.array([len(x)]) for x in data]
    pooled = pool_moments(means, covs, counts)
    union = np.vstack(data)
    np.testing.assert_allclose(pooled.mean[0], union.mean(0), atol=1e-12)
    expected = np.diag(np.cov(union.T)) if diagonal else np.cov(union.T)
    np.testing.assert_allclose(pooled.cov[0], expected, atol=1e-12)
    assert pooled.count[0] == 16


def test_virtual_features_match_the_moments_within_sampling_error(rng):
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + np.eye(3)
    moments = ClassMoments(
        mean=np.array([[1.0, -2.0, 0.5], [0, 0, 0]]),
        cov=np.stack([cov, np.eye(3)]),
        count=np.array([50, 1]),
    )
    n = 20000
    feats, labels = sample_virtual_features(moments, n, seed=0)
    assert labels.unique().tolist() == [0]  # class 1 has fewer than 2 pooled samples
    x = feats.double().numpy()
    std_err = np.sqrt(np.diag(cov) / n)
    assert (np.abs(x.mean(0) - moments.mean[0]) < 5 * std_err).all()
    np.testing.assert_allclose(np.cov(x.T), cov, rtol=0.06, atol=0.06)


def test_retrain_head_fits_virtual_features(rng):
    moments = ClassMoments(
        mean=np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]]),
        cov=np.stack([np.eye(2) * 0.3] * 3),
        count=np.array([10, 10, 10]),
    )
    feats, labels = sample_virtual_features(moments, 200, seed=1)
    weight, bias = torch.zeros(3, 2), torch.zeros(3)
    new_w, new_b = retrain_head(weight, bias, feats, labels, epochs=5, seed=0)
    accuracy = ((feats @ new_w.T + new_b).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95


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


def test_fedproto_aggregator_sends_back_prototypes():
    gen = torch.Generator().manual_seed(0)
    updates = []
    for m in range(2):
        lora = {
            "l.lora_A.weight": torch.randn(2, 3, generator=gen),
            "l.lora_B.weight": torch.randn(4, 2, generator=gen),
        }
        updates.append(
            ClientUpdate(
                client_id=f"c{m}",
                num_samples=10,
                lora=lora,
                head_weight=torch.randn(3, 5),
                head_bias=torch.zeros(3),
                extras={
                    "proto_mean": np.full((3, 5), float(m)),
                    "proto_count": np.array([1, 1, 2]),
                },
            )
        )
    result = make_aggregator("fedproto").aggregate(updates)
    np.testing.assert_allclose(result.details["prototypes"], 0.5)
    del updates[1].extras["proto_mean"]
    with pytest.raises(ValueError, match="client 'c1' sent no 'proto_mean'"):
        make_aggregator("fedproto").aggregate(updates)
