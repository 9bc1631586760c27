from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deformconv.demo.data import Split, load_digits
from deformconv.demo.encoder_decoder import EncoderDecoder
from deformconv.demo.occlusion import Occlusion, occlude
from deformconv.demo.restore import (
    IDENTITY,
    RestoreConfig,
    restoration_error,
    run_restore,
    train_restorer,
)
from deformconv.demo.train import TrainConfig

# A budget that trains in seconds: one strided stage on 16x16 digits, small batches.
SMALL = {"size": 16, "limit": 300, "epochs": 3, "channels": (16, 32), "batch_size": 16}


@pytest.fixture(scope="module")
def result():
    return run_restore(RestoreConfig(**SMALL, lr=1e-2))


def test_restoration_beats_returning_the_input(result):
    rows = {row.name: row for row in result.rows}
    assert list(rows) == [IDENTITY, "encoder-decoder", "deformable encoder-decoder"]
    # The baseline, computed here with NumPy from the held-out digits.
    inputs = result.test_input.images.numpy().astype(np.float64)
    targets = result.test_target.images.numpy().astype(np.float64)
    occluded = result.test_input.occluders.numpy()
    assert rows[IDENTITY].error == pytest.approx(((inputs - targets) ** 2).mean())
    assert rows[IDENTITY].occluded_error == pytest.approx(
        ((inputs - targets)[occluded] ** 2).mean()
    )
    for name in ("encoder-decoder", "deformable encoder-decoder"):
        row = rows[name]
        assert row.error < rows[IDENTITY].error, name
        assert row.occluded_error < rows[IDENTITY].occluded_error, name
        with torch.no_grad():
            out = result.models[name](result.test_input.images).numpy().astype(np.float64)
        assert row.error == pytest.approx(((out - targets) ** 2).mean(), rel=1e-5)
        assert out.shape == targets.shape
    # The deformable twin differs from the regular network only by its offset branches.
    assert rows["deformable encoder-decoder"].parameters > rows["encoder-decoder"].parameters


def test_test_digits_are_held_out_and_occluded(result):
    assert result.sizes == {"train": 300, "val": 179, "test": 359}
    splits = load_digits(16, 10)
    assert torch.equal(result.test_target.images, splits.test.images)
    changed = (result.test_input.images != result.test_target.images).flatten(1).any(1)
    assert bool(changed.all())
    assert torch.equal(
        result.test_input.images[~result.test_input.occluders],
        splits.test.images[~result.test_input.occluders],
    )


def test_result_is_json_serialisable(result):
    data = json.loads(json.dumps(result.to_dict()))
    assert data["task"] == "restore"
    assert data["config"]["occlusion"]["fraction"] == 0.3
    assert [r["epochs"] for r in data["rows"]] == [0, 3, 3]


def test_training_keeps_the_best_validation_epoch():
    splits = load_digits(16, 10)
    occlusion = Occlusion(0.3)
    generator = torch.Generator().manual_seed(1)
    images, occluders = occlude(splits.val.images, occlusion, generator)
    val_input = Split(images, splits.val.labels, occluders=occluders)
    torch.manual_seed(0)
    model = EncoderDecoder(RestoreConfig(**SMALL).model_config())
    train_split = Split(splits.train.images[:64], splits.train.labels[:64])
    updates = []
    row = train_restorer(
        model,
        train_split,
        val_input,
        splits.val,
        TrainConfig(epochs=3, batch_size=16, lr=1e-2),
        occlusion,
        task="r",
        progress=updates.append,
    )
    errors = [r.val_error for r in row.history]
    assert row.best_epoch == errors.index(min(errors)) + 1
    assert not model.training
    assert restoration_error(model, images, splits.val.images, occluders)[0] == pytest.approx(
        min(errors)
    )
    assert [u.val_error for u in updates if u.val_error is not None] == errors
    assert [u.step for u in updates if u.val_error is None] == list(range(1, 3 * 4 + 1))
    with pytest.raises(ValueError, match="val_input must be an occluded split"):
        train_restorer(model, train_split, splits.val, splits.val, TrainConfig(), occlusion)


def test_restoration_error_by_hand():
    inputs = torch.tensor([[[[0.0, 0.5], [1.0, 0.2]]]])
    targets = torch.tensor([[[[1.0, 0.5], [0.0, 0.2]]]])
    occluders = torch.tensor([[[[True, True], [False, False]]]])
    assert restoration_error(None, inputs, targets, occluders) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": "cifar"}, r"data must be one of \('digits', 'mnist'\)"),
        ({"data": "mnist"}, "needs root"),
        ({"size": 3}, "size must be an int >= 4, got 3"),
        ({"digit_size": 40}, r"digit_size must be in \[1, size=32\]"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"channels": (8,)}, "channels must hold the stem's width"),
        ({"epochs": 0}, "epochs must be a positive int"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RestoreConfig(**kwargs)


def test_odd_sizes_are_accepted():
    config = RestoreConfig(size=29)
    assert config.digit_side() == 18 and config.model_config().image_size == (29, 29)
