import copy

import numpy as np
import pytest
import torch

from livar_merge import ClassFeatureStats, ImportanceTracker, find_lora_parameters
from livar_merge.errors import ClientUpdateError, ConfigError
from tests.helpers import tiny_peft_vit


def make_batches(num_batches=6, batch=8, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, 16, 16, generator=gen),
            torch.randint(0, num_classes, (batch,), generator=gen),
        )
        for _ in range(num_batches)
    ]


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def brute_force_omegas(model, optimizer, batches, elementwise=False):
    """Plain loop: keep grads and params before each step, accumulate per matrix after it."""
    layers = find_lora_parameters(model)
    omega = {name: [0.0, 0.0] for name in layers}
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = {n: [p.detach().clone().double() for p in ab] for n, ab in layers.items()}
        grads = {n: [p.grad.detach().clone().double() for p in ab] for n, ab in layers.items()}
        optimizer.step()
        for n, ab in layers.items():
            for i, p in enumerate(ab):
                prod = grads[n][i] * (before[n][i] - p.detach().double())
                omega[n][i] += float(prod.abs().sum() if elementwise else prod.sum().abs())
    return np.array([omega[n][0] for n in layers]), np.array([omega[n][1] for n in layers])


def tracked_run(model, optimizer, batches, tracker, scaler=None):
    for x, y in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return tracker.result()


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("reduction", ["matrix", "elementwise"])
def test_tracker_matches_brute_force(opt, reduction):
    batches = make_batches()
    model_a = tiny_peft_vit(seed=1)
    model_b = copy.deepcopy(model_a)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    opt_a = make_optimizer(opt, trainable(model_a))
    tracker = ImportanceTracker(model_a, reduction=reduction).attach(opt_a)
    result = tracked_run(model_a, opt_a, batches, tracker)
    expected_a, expected_b = brute_force_omegas(
        model_b,
        make_optimizer(opt, trainable(model_b)),
        batches,
        elementwise=reduction == "elementwise",
    )
    assert result.steps == len(batches) and len(result.layer_names) == 8
    assert result.layer_names[0] == "base_model.model.blocks.0.attn.qkv"
    np.testing.assert_allclose(result.omega_a, expected_a, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(result.omega_b, expected_b, rtol=1e-5, atol=1e-12)
    assert (result.omega_a > 0).all() and (result.omega_b > 0).all()


def test_tracker_reads_unscaled_gradients_under_grad_scaler():
    batches = make_batches()
    model_a = tiny_peft_vit(seed=2)
    model_b = copy.deepcopy(model_a)
    params_a = [p for p in model_a.parameters() if p.requires_grad]
    params_b = [p for p in model_b.parameters() if p.requires_grad]
    opt_a, opt_b = make_optimizer("adamw", params_a), make_optimizer("adamw", params_b)
    tracker_a = ImportanceTracker(model_a).attach(opt_a)
    tracker_b = ImportanceTracker(model_b).attach(opt_b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = tracked_run(model_a, opt_a, batches, tracker_a, scaler=scaler)
    plain = tracked_run(model_b, opt_b, batches, tracker_b)
    assert scaler.get_scale() == 2.0**12
    np.testing.assert_allclose(scaled.omega_a, plain.omega_a, rtol=1e-5)
    np.testing.assert_allclose(scaled.omega_b, plain.omega_b, rtol=1e-5)


def test_skipped_steps_and_manual_grad_scale():
    model = tiny_peft_vit(seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer("sgd", params)
    tracker = ImportanceTracker(model).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = make_batches(1)[0]
    loss = torch.nn.functional.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)  # inf gradients: GradScaler skips the step, the tracker sees nothing
    assert tracker.result().steps == 0 and tracker.result().omega_a.sum() == 0
    tracker.detach()
    # manual path: gradients still scaled by 8, tracker told so
    manual, reference = ImportanceTracker(model), ImportanceTracker(copy.deepcopy(model))
    opt.zero_grad()
    (torch.nn.functional.cross_entropy(model(x), y) * 8).backward()
    grads = [p.grad.clone() for p in params]
    manual.before_step(grad_scale=8.0)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= 0.1 * g / 8
    manual.after_step()
    assert manual.result().steps == 1 and manual.result().omega_b.sum() > 0
    del reference


def test_reset_and_cumulative_and_state_dict():
    model = tiny_peft_vit(seed=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer("adamw", params)
    per_round = ImportanceTracker(model).attach(opt)
    total = ImportanceTracker(model, cumulative=True).attach(opt)
    tracked_run(model, opt, make_batches(2), per_round)
    first = per_round.result().omega_a.copy()
    saved = total.state_dict()
    per_round.start_round()
    total.start_round()
    tracked_run(model, opt, make_batches(2, seed=1), per_round)
    second = per_round.result().omega_a
    np.testing.assert_allclose(total.result().omega_a, first + second, rtol=1e-12)
    assert total.result().steps == 4 and per_round.result().steps == 2
    restored = ImportanceTracker(model, cumulative=True)
    restored.load_state_dict(saved)
    np.testing.assert_allclose(restored.result().omega_a, first)


def stats_by_numpy(feats, labels, preds, num_classes, only_correct):
    keep = preds == labels if only_correct else np.ones_like(labels, bool)
    out = {}
    for c in range(num_classes):
        x = feats[keep & (labels == c)]
        out[c] = (
            len(x),
            x.mean(0) if len(x) else None,
            x.var(0, ddof=1).mean() if len(x) >= 2 else np.nan,
        )
    return out


@pytest.mark.parametrize("only_correct", [True, False])
def test_class_feature_stats_match_numpy(only_correct):
    rng = np.random.default_rng(0)
    num_classes, dim = 6, 5
    feats = rng.normal(size=(300, dim)) * rng.uniform(0.5, 3, size=dim) + 10
    labels = rng.integers(0, num_classes - 2, size=300)  # classes 4 and 5 never appear...
    labels[0] = 4  # ...except one sample of class 4: absent (fewer than 2)
    preds = np.where(rng.random(300) < 0.7, labels, rng.integers(0, num_classes, 300))
    preds[0] = 4
    stats = ClassFeatureStats(num_classes, only_correct=only_correct)
    for chunk in np.array_split(np.arange(300), 7):  # uneven streaming batches
        logits = torch.nn.functional.one_hot(torch.as_tensor(preds[chunk]), num_classes).float()
        stats.update(
            torch.as_tensor(feats[chunk], dtype=torch.float32),
            torch.as_tensor(labels[chunk]),
            logits,
        )
    result = stats.result()
    expected = stats_by_numpy(
        feats.astype(np.float32).astype(np.float64), labels, preds, num_classes, only_correct
    )
    for c in range(num_classes):
        count, mean, sigma = expected[c]
        assert result.count[c] == count
        assert result.present[c] == (count >= 2)
        if count >= 2:
            assert result.sigma[c] == pytest.approx(sigma, rel=1e-9)
            np.testing.assert_allclose(result.mean[c], mean, rtol=1e-9)
        else:
            assert np.isnan(result.sigma[c])
    assert not result.present[5] and not result.present[4]


def test_class_feature_stats_needs_predictions_and_valid_labels():
    stats = ClassFeatureStats(3)
    with pytest.raises(ConfigError, match="only_correct=True needs predictions"):
        stats.update(torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ClientUpdateError, match=r"labels outside \[0, 3\)"):
        ClassFeatureStats(3, only_correct=False).update(torch.zeros(2, 4), torch.tensor([0, 3]))
    empty = ClassFeatureStats(3).result()
    assert not empty.present.any() and empty.count.sum() == 0
