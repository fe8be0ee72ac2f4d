"""``--sigma-pass pretrained --sigma-samples correct``: the samples are those the *trained* model
(LoRA and trained head) classifies correctly, the features those of W0 (a plain timm model with
the same initial weights), checked against a brute-force float64 computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from livar_merge.federated.collectors import ClientData, collect_class_stats
from livar_merge.federated.config import TrainSettings
from livar_merge.federated.data import BatchSource
from livar_merge.federated.datasets.images import InMemoryImages
from livar_merge.lora_view import find_lora_parameters, head_module
from tests.helpers import tiny_peft_vit, tiny_vit

CLASSES = 3
SAMPLES = 90
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def trained_model(seed: int) -> torch.nn.Module:
    """The tiny peft ViT of ``seed`` after a fake local training: B != 0, a new head."""
    model = tiny_peft_vit(rank=4, alpha=8.0, num_classes=CLASSES, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        head = head_module(model)
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
        head.bias.copy_(torch.randn(head.bias.shape, generator=gen))
    return model.eval()


def source_of(images: torch.Tensor, labels: np.ndarray) -> BatchSource:
    data = InMemoryImages(images, labels, [str(c) for c in range(CLASSES)])
    return BatchSource(data, mean=MEAN, std=STD, device=torch.device("cpu"))


def normalised(images: torch.Tensor) -> torch.Tensor:
    x = images.double() / 255.0
    return ((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).float()


def brute_force_sigma(features: np.ndarray, labels: np.ndarray, keep: np.ndarray):
    """Per class: count of kept samples, mean over dimensions of their unbiased variance."""
    count = np.zeros(CLASSES, dtype=np.int64)
    sigma = np.full(CLASSES, np.nan)
    for c in range(CLASSES):
        rows = features[keep & (labels == c)].astype(np.float64)
        count[c] = len(rows)
        if len(rows) >= 2:
            sigma[c] = rows.var(axis=0, ddof=1).mean()
    return count, sigma


@pytest.mark.parametrize("folded", [False, True])
def test_correct_samples_come_from_the_trained_model_features_from_w0(folded):
    seed = 3
    model = trained_model(seed)
    torch.manual_seed(seed)
    w0_model = tiny_vit(CLASSES).eval()  # the same initial weights W0, no peft, untrained head
    w0_layers = {
        layer: model.get_submodule(layer).base_layer.weight.detach().clone()
        for layer in find_lora_parameters(model)
    }
    pretrained_base = None
    if folded:  # lora_merge product: earlier merges folded into the frozen weights
        gen = torch.Generator().manual_seed(seed + 200)
        with torch.no_grad():
            for layer, weight in w0_layers.items():
                base = model.get_submodule(layer).base_layer.weight
                base.add_(0.2 * torch.randn(weight.shape, generator=gen))
        pretrained_base = w0_layers
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (SAMPLES, 3, 16, 16), generator=gen, dtype=torch.uint8)
    x = normalised(images)
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()  # the trained model, brute force
        features = w0_model.forward_head(w0_model.forward_features(x), pre_logits=True).numpy()
        initial_head = w0_model(x).argmax(1).numpy()
    # two thirds labelled as the trained model predicts (correct), the rest one class off
    rng = np.random.default_rng(seed)
    correct = rng.random(SAMPLES) < 2 / 3
    labels = np.where(correct, predicted, (predicted + 1) % CLASSES).astype(np.int64)
    assert (initial_head == labels).sum() != correct.sum()  # W0's head would pick others

    settings = TrainSettings(
        local_epochs=1,
        batch_size=8,
        lr=1e-3,
        weight_decay=0.0,
        sigma_pass="pretrained",
        sigma_samples="correct",
        eval_batch_size=16,  # several batches in both passes
    )
    before = copy.deepcopy(model.state_dict())
    data = ClientData(
        source_of(images, labels), np.arange(SAMPLES), CLASSES, settings, lambda *_: 0
    )
    got = collect_class_stats(model, data, pretrained_base=pretrained_base).result()
    count, sigma = brute_force_sigma(features, labels, correct)
    np.testing.assert_array_equal(got.count, count)
    np.testing.assert_array_equal(got.present, count >= 2)
    np.testing.assert_allclose(got.sigma, sigma, rtol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the model is restored
