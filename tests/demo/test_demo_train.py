from __future__ import annotations

import pytest
import torch

from deformconv.demo.data import Deformation, Split
from deformconv.demo.models import DigitCNN, ModelConfig, deformable_twin
from deformconv.demo.train import (
    TrainConfig,
    count_parameters,
    evaluate,
    init_distributed,
    train,
)


def _bars(n: int, seed: int) -> Split:
    """Vertical (label 0) or horizontal (label 1) bars at random places: learnable in a few
    steps, and still recognisable after mild deformation."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 16, 16)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(4, 12, (n,), generator=g)
    for i in range(n):
        if labels[i] == 0:
            images[i, 0, 3:13, where[i] - 1 : where[i] + 1] = 1
        else:
            images[i, 0, where[i] - 1 : where[i] + 1, 3:13] = 1
    return Split(images, labels)


def _model(deformable: int = 0, seed: int = 0) -> DigitCNN:
    torch.manual_seed(seed)
    return DigitCNN(
        ModelConfig(channels=(4, 8, 8, 8), deformable=deformable, num_classes=2, image_size=16)
    )


def test_training_learns_and_keeps_the_best_validation_epoch():
    train_split, val_split = _bars(64, 0), _bars(32, 1)
    model = _model()
    updates = []
    result = train(
        model,
        train_split,
        val_split,
        TrainConfig(epochs=4, batch_size=8, lr=1e-2),
        task="bars",
        progress=updates.append,
    )
    accuracies = [r.val_accuracy for r in result.history]
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == accuracies.index(max(accuracies)) + 1
    assert result.best_val_accuracy == max(accuracies) > 0.8
    # The model holds the selected epoch's weights and is left in eval mode.
    assert not model.training
    assert evaluate(model, val_split) == result.best_val_accuracy
    steps = [u for u in updates if u.val_accuracy is None]
    assert [u.step for u in steps] == list(range(1, 4 * 8 + 1))
    assert all(u.task == "bars" and u.total_steps == 32 for u in updates)
    assert [u.val_accuracy for u in updates if u.val_accuracy is not None] == accuracies
    assert result.seconds_per_epoch > 0


def test_training_is_reproducible():
    split = _bars(32, 2)
    deformation = Deformation(scale=(0.8, 1.2), rotation=10, translation=1)
    states = []
    for _ in range(2):
        model = _model(deformable=1, seed=5)
        train(model, split, split, TrainConfig(epochs=2, batch_size=16, seed=3), deformation)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_offsets_only_training_changes_only_the_offset_branches():
    split = _bars(32, 3)
    regular = _model(seed=1)
    train(regular, split, split, TrainConfig(epochs=1, batch_size=16))
    twin = deformable_twin(regular, 2)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    train(
        twin, split, split, TrainConfig(epochs=2, batch_size=16, trainable="offsets"), Deformation()
    )
    after = twin.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("conv_offset" in k for k in changed)
    assert all(p.requires_grad for p in twin.parameters())


def test_train_config_validation():
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match=r"trainable must be one of \('all', 'offsets'\)"):
        TrainConfig(trainable="bias")
    with pytest.raises(ValueError, match="model has no DeformableConv2d layer"):
        train(_model(), _bars(8, 0), _bars(8, 0), TrainConfig(epochs=1, trainable="offsets"))


def test_single_process_context():
    context = init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
    assert context.device == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda'"):
        init_distributed("tpu")
    assert count_parameters(torch.nn.Linear(3, 2)) == 8
