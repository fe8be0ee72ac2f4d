import pytest
import torch

from tests.helpers import NUM_CLASSES, tiny_peft_vit


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_peft_vit(rank=4, alpha=8.0, num_classes=NUM_CLASSES, seed=0)
