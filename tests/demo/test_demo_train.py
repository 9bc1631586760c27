from __future__ import annotations

import pytest
import torch

from deformconv.demo.data import Deformation, Split
from deformconv.demo.models import DigitCNN, ModelConfig, deformable_twin
from deformconv.demo.train import (
    DistributedContext,
    TrainConfig,
    count_parameters,
    distributed_plan,
    evaluate,
    every_process_ok,
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


@pytest.mark.parametrize(
    ("device", "environ", "gpus", "backend", "expected"),
    [
        # torchrun's variables; NCCL only moves tensors on the process's own GPU (LOCAL_RANK).
        ("auto", {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 4, "nccl", torch.device("cuda", 3)),
        ("cuda", {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 2, "nccl", torch.device("cuda", 0)),
        ("cpu", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 2, "gloo", torch.device("cpu")),
        ("auto", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0, "gloo", torch.device("cpu")),
        ("auto", {}, 1, None, torch.device("cuda", 0)),
        ("auto", {}, 0, None, torch.device("cpu")),
    ],
)
def test_distributed_plan(device, environ, gpus, backend, expected):
    plan = distributed_plan(device, environ, cuda_devices=gpus)
    assert plan.backend == backend and plan.device == expected
    assert plan.world_size == int(environ.get("WORLD_SIZE", "1"))


def test_distributed_plan_errors():
    with pytest.raises(ValueError, match="device is 'cuda' but"):
        distributed_plan("cuda", {}, cuda_devices=0)
    with pytest.raises(ValueError, match="LOCAL_RANK is 2 but 2 CUDA device"):
        distributed_plan("auto", {"WORLD_SIZE": "3", "LOCAL_RANK": "2"}, cuda_devices=2)


def test_gpu_process_sets_its_device_before_joining_the_group(monkeypatch):
    """Simulated GPUs: NCCL binds a process to the current device when the group starts, so
    set_device must come first (torch.distributed's NCCL notes)."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: len(calls) > 1)
    monkeypatch.setattr(
        dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"]))
    )
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    context = init_distributed("auto")
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    assert context.device == torch.device("cuda", 1) and context.world_size == 2


def test_agreement_tensor_lives_on_the_process_device(monkeypatch):
    import torch.distributed as dist

    devices = []

    class Stop(Exception):
        pass

    def all_reduce(tensor):
        devices.append(tensor.device)
        raise Stop

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    # "meta" stands for a GPU here: any device other than the CPU default shows the choice.
    context = DistributedContext(0, 2, torch.device("meta"))
    with pytest.raises(Stop):
        every_process_ok(True, context)
    assert devices == [torch.device("meta")]
    assert every_process_ok(False, DistributedContext()) is False
