"""Training batches and their augmentations (livar_merge.federated.data)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as tvf

from livar_merge.errors import ConfigError
from livar_merge.federated.data import (
    augmentation,
    random_resized_crop,
    resized_crop_params,
)


@pytest.mark.parametrize(("height", "width"), [(42, 30), (16, 16), (10, 40)])
def test_crop_parameters_are_torchvisions(height, width):
    """The same draws as torchvision's RandomResizedCrop.get_params from the same seed (it
    reads the global generator, ours the run's)."""
    image = torch.zeros(3, height, width)
    for seed in range(100):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        got = resized_crop_params(height, width, torch.Generator().manual_seed(seed))
        assert got == tuple(expected), seed
    for seed in range(5):  # a scale no crop can meet: torchvision's centre-crop fallback
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, (0.995, 1.0), (2.0, 2.5))
        got = resized_crop_params(
            height, width, torch.Generator().manual_seed(seed), (0.995, 1.0), (2.0, 2.5)
        )
        assert got == tuple(expected)


def test_random_resized_crop_batch_replays_per_image():
    x = torch.rand(6, 3, 16, 16)
    out = random_resized_crop(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    gen = torch.Generator().manual_seed(3)  # replay: the crops, then the flips
    crops = [
        tvf.resized_crop(img, *resized_crop_params(16, 16, gen), size=[16, 16], antialias=True)
        for img in x
    ]
    flips = torch.rand(6, generator=gen) < 0.5
    for i, crop in enumerate(crops):
        torch.testing.assert_close(out[i], crop.flip(-1) if flips[i] else crop)
    assert torch.equal(out, random_resized_crop(x, torch.Generator().manual_seed(3)))


def test_augmentation_names():
    assert augmentation("off") is None and augmentation(False) is None
    assert augmentation(True) is augmentation("pad-crop")
    assert augmentation("rrc") is random_resized_crop
    with pytest.raises(ConfigError, match="unknown augmentation 'mixup'"):
        augmentation("mixup")
