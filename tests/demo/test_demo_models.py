from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deformconv.demo.encoder_decoder import (
    EncoderDecoder,
    EncoderDecoderConfig,
    save_encoder_decoder,
)
from deformconv.demo.models import (
    DigitCNN,
    ModelConfig,
    deformable_twin,
    load_checkpoint,
    save_checkpoint,
)
from deformconv.nn import DeformableConv2d
from deformconv.tools.visualize import sampling_points

SMALL = {"channels": (4, 6, 8, 8), "image_size": 16}


@pytest.mark.parametrize("deformable", [0, 1, 2, 3])
def test_architecture(deformable):
    torch.manual_seed(0)
    model = DigitCNN(ModelConfig(deformable=deformable, **SMALL))
    kinds = [isinstance(conv, DeformableConv2d) for conv in model.convs]
    assert kinds == [False] * (4 - deformable) + [True] * deformable
    assert model(torch.rand(5, 1, 16, 16)).shape == (5, 10)


@pytest.mark.parametrize("deformable", [1, 2, 3])
@pytest.mark.parametrize("modulated", [False, True])
def test_twin_starts_equal_and_shares_weights(deformable, modulated):
    torch.manual_seed(1)
    regular = DigitCNN(ModelConfig(**SMALL))
    # Non-trivial batch-norm statistics, so eval mode matters.
    regular.train()
    regular(torch.rand(8, 1, 16, 16))
    regular.eval()
    twin = deformable_twin(regular, deformable, modulated).eval()
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(twin(x), regular(x), atol=1e-5, rtol=1e-5)
    assert twin.config.deformable == deformable and twin.config.modulated == modulated
    shared = {k: v for k, v in twin.state_dict().items() if "conv_offset" not in k}
    assert shared.keys() == regular.state_dict().keys()
    for key, value in shared.items():
        assert torch.equal(value, regular.state_dict()[key])
    # The copy is independent of the original.
    with torch.no_grad():
        twin.convs[3].weight.add_(1.0)
    assert not torch.equal(twin.convs[3].weight, regular.convs[3].weight)


def test_twin_errors():
    regular = DigitCNN(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match=r"deformable must be in \[1, 3\]"):
        deformable_twin(regular, 0)
    with pytest.raises(ValueError, match="must be a regular DigitCNN"):
        deformable_twin(deformable_twin(regular, 1), 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": (4, 4, 4)}, "channels must be 4 positive ints"),
        ({"channels": (4, 4, 0, 4)}, "channels must be 4 positive ints"),
        ({"deformable": 4}, r"deformable must be in \[0, 3\]"),
        ({"image_size": 18}, "image_size must be a multiple of 4"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_sampling_stacks_match_the_layers_offsets():
    torch.manual_seed(2)
    model = DigitCNN(ModelConfig(deformable=2, modulated=True, **SMALL))
    for conv in model.convs[2:]:
        nn.init.normal_(conv.conv_offset.weight, std=0.3)
    images = torch.rand(3, 1, 16, 16)
    stacks = model.sampling_stacks(images)
    assert len(stacks) == 3 and len(stacks[0]) == 4
    # Feature map entering the third block: two conv blocks, each followed by pooling.
    model.eval()
    with torch.no_grad():
        x = images
        for index in range(2):
            x = model.pool(torch.relu(model.norms[index](model.convs[index](x))))
        offset, mask = model.convs[2].offsets_and_mask(x)
    torch.testing.assert_close(stacks[1][2].offset, offset[1])
    torch.testing.assert_close(stacks[1][2].mask, mask[1])
    assert [layer.input_scale for layer in stacks[0]] == [1.0, 2.0, 2.0, 1.0]
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, S, S\)"):
        model.sampling_stacks(torch.rand(1, 16, 16))


def test_sampling_geometry_of_the_regular_stack():
    # With zero offsets, the 3x3 kernels of blocks 3-4 at a 4x4 map (4 image pixels per unit)
    # sample a 5x5 block of units around the top unit, i.e. image rows 4u+1.5 for u in 0..4.
    model = DigitCNN(ModelConfig(deformable=2, **SMALL))
    stack = model.sampling_stacks(torch.rand(1, 1, 16, 16))[0]
    points, _ = sampling_points(stack, (2, 2), depth=2)
    rows = sorted({round(p, 6) for p in points[:, 0].tolist()})
    np.testing.assert_allclose(rows, [4 * u + 1.5 for u in range(5)])


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    model = DigitCNN(ModelConfig(deformable=3, modulated=True, **SMALL))
    nn.init.normal_(model.convs[3].conv_offset.weight, std=0.1)
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, {"seed": 3})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_checkpoint_errors(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"is not a model saved by `deformconv demo` .*format"):
        load_checkpoint(other)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(ValueError, match=r"is not a model saved by `deformconv demo` \(torch"):
        load_checkpoint(junk)
    # An encoder-decoder file is another kind of model file.
    restorer = tmp_path / "restore.pt"
    save_encoder_decoder(EncoderDecoder(EncoderDecoderConfig((8, 8), (2, 2))), restorer)
    with pytest.raises(ValueError, match="deformconv-demo-model/1"):
        load_checkpoint(restorer)
