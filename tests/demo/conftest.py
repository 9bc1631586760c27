from __future__ import annotations

import pytest
import torch
from torch import nn

from deformconv.demo.data import Split
from deformconv.demo.models import DigitCNN, ModelConfig


@pytest.fixture(scope="module")
def model_and_split():
    """A small deformable CNN with non-zero offset branches, and six bars of growing height
    (a split with scales 0.5 to 1.5, as deformed copies have)."""
    torch.manual_seed(0)
    model = DigitCNN(ModelConfig(channels=(4, 4, 8, 8), deformable=2, image_size=16)).eval()
    for conv in model.convs[2:]:
        nn.init.normal_(conv.conv_offset.weight, std=0.2)
    images = torch.zeros(6, 1, 16, 16)
    for i in range(6):
        images[i, 0, 4 + i // 3 : 12 - i // 3, 6:10] = 1
    return model, Split(images, torch.arange(6) % 10, torch.linspace(0.5, 1.5, 6))
