"""The demo's training loop, on one process or many (``torchrun`` + DistributedDataParallel).

Under ``torchrun`` every process builds the same data from the same seed, draws the same random
deformations for each epoch, and trains on its own share of every batch; DistributedDataParallel
averages the gradients, so all processes hold identical parameters, and batch-norm statistics are
copied from rank 0 after every epoch so they match too. Validation is sharded and its counts
summed, so every process selects the same best epoch. Model selection only ever looks at the
validation split.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deformconv.demo.data import Augmentation, Split
from deformconv.nn import DeformableConv2d, offset_param_groups

__all__ = [
    "DistributedContext",
    "DistributedPlan",
    "EpochRecord",
    "ProgressCallback",
    "ProgressUpdate",
    "TrainConfig",
    "TrainResult",
    "count_parameters",
    "distributed_plan",
    "evaluate",
    "every_process_ok",
    "init_distributed",
    "optimizer_and_schedule",
    "train",
]

TRAINABLE = ("all", "offsets")


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Args:
        epochs: passes over the training split.
        batch_size: images per optimisation step, over all processes together.
        lr: peak learning rate of AdamW (cosine decay to zero after a short warm-up).
        weight_decay: AdamW weight decay.
        offset_lr_mult: learning-rate factor of the offset branches (``offset_param_groups``).
        trainable: ``"all"`` parameters, or only the ``"offsets"`` branches of deformable layers
            (everything else frozen, batch-norm statistics included).
        seed: seed of initialisation-independent randomness: batch order and deformations.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    offset_lr_mult: float = 1.0
    trainable: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.offset_lr_mult >= 0:
            raise ValueError(f"offset_lr_mult must be >= 0, got {self.offset_lr_mult!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")


@dataclass(frozen=True)
class ProgressUpdate:
    """Where a training run stands; handed to the progress callback after every step, and
    after every epoch with its validation accuracy (classifiers) or error (restoration)."""

    task: str
    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float
    val_accuracy: float | None = None
    val_error: float | None = None


ProgressCallback = Callable[[ProgressUpdate], None]


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean training loss and accuracy, validation accuracy, training seconds."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    """A finished run; the model holds the weights of ``best_epoch``."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0

    @property
    def seconds_per_epoch(self) -> float:
        """Median training seconds of an epoch: robust to the one-off kernel compilation of
        the first epoch and to other processes' bursts."""
        if not self.history:
            return 0.0
        return float(statistics.median(r.seconds for r in self.history))


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _context() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class DistributedPlan:
    """How this process trains: alone, or with others through a ``backend``.

    Attributes:
        world_size: processes training together (1: alone).
        local_rank: this process's index on its machine.
        backend: ``"nccl"`` on GPUs, ``"gloo"`` on CPUs; ``None`` for a single process.
        device: where this process's model and every tensor of a collective live
            (``cuda:<local_rank>`` on GPUs: NCCL only moves tensors on the process's own GPU).
    """

    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device


def distributed_plan(
    device: str = "auto",
    environ: Mapping[str, str] | None = None,
    cuda_devices: int | None = None,
) -> DistributedPlan:
    """The backend and device of this process, from ``torchrun``'s environment variables.

    Args:
        device: ``"auto"`` (CUDA when a GPU is visible), ``"cpu"`` or ``"cuda"``.
        environ: the environment (default ``os.environ``); ``WORLD_SIZE`` and ``LOCAL_RANK``
            are read.
        cuda_devices: the number of visible GPUs (default ``torch.cuda.device_count()`` when
            CUDA is available, else 0).

    Example:
        >>> distributed_plan("auto", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, cuda_devices=2)
        DistributedPlan(world_size=2, local_rank=1, backend='nccl', device=device(type='cuda', index=1))
        >>> distributed_plan("auto", {}, cuda_devices=0).device
        device(type='cpu')
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    environ = os.environ if environ is None else environ
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_cuda = cuda_devices > 0 if device == "auto" else device == "cuda"
    if use_cuda and cuda_devices == 0:
        raise ValueError("device is 'cuda' but torch.cuda.is_available() is False")
    world_size = int(environ.get("WORLD_SIZE", "1"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    if use_cuda and not 0 <= local_rank < cuda_devices:
        raise ValueError(
            f"LOCAL_RANK is {local_rank} but {cuda_devices} CUDA device(s) are visible: start at "
            "most one process per GPU (torchrun --nproc_per_node)"
        )
    backend = None if world_size == 1 else ("nccl" if use_cuda else "gloo")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistributedPlan(world_size, local_rank, backend, target)


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL on GPUs and gloo on CPU (see :func:`distributed_plan`); on a GPU the process's
    device is made current before the process group starts, so NCCL binds to it. Without
    ``WORLD_SIZE`` > 1 in the environment nothing is initialised and a single-process context is
    returned.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    plan = distributed_plan(device)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    if plan.backend is not None and not dist.is_initialized():
        if plan.backend == "nccl":
            dist.init_process_group(backend=plan.backend, device_id=plan.device)
        else:
            dist.init_process_group(backend=plan.backend)
    rank, world_size = _context()
    if world_size > 1 and plan.device.type == "cpu":
        # Processes sharing one machine must share its cores. Numba's thread pool (the CPU
        # kernel) would otherwise start one thread per core and, sharing the OpenMP runtime,
        # raise PyTorch's thread count with it; NUMBA_NUM_THREADS is read when Numba loads.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        default = max(1, (os.cpu_count() or 1) // local_world)
        threads = int(os.environ.get("OMP_NUM_THREADS", default))
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
    return DistributedContext(rank, world_size, plan.device)


def every_process_ok(ok: bool, context: DistributedContext) -> bool:
    """Whether ``ok`` holds on every process (a collective: every process must call it).

    The flag travels in a tensor on ``context.device``, the only place NCCL can move it.

    Example:
        >>> every_process_ok(False, DistributedContext())
        False
    """
    if context.world_size == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], device=context.device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return indices[rank::world_size]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on ``split``; sharded and summed over processes when distributed.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> split = Split(torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))
        >>> 0.0 <= evaluate(model, split) <= 1.0
        True
    """
    rank, world_size = _context()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    index = _shard(torch.arange(len(split)), rank, world_size)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, index.numel(), batch_size):
        batch = index[start : start + batch_size]
        logits = model(split.images[batch].to(device))
        correct += (logits.argmax(1) == split.labels[batch].to(device)).sum()
    if world_size > 1:
        dist.all_reduce(correct)
    model.train(was_training)
    return float(correct) / max(len(split), 1)


def _set_trainable(model: nn.Module, trainable: str) -> None:
    if trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    offsets = [m.conv_offset for m in model.modules() if isinstance(m, DeformableConv2d)]
    if not offsets:
        raise ValueError("trainable is 'offsets' but model has no DeformableConv2d layer")
    for p in model.parameters():
        p.requires_grad_(False)
    for branch in offsets:
        for p in branch.parameters():
            p.requires_grad_(True)


def _train_mode(model: nn.Module, trainable: str) -> None:
    model.train()
    if trainable == "offsets":
        # Frozen layers must compute exactly what they did: keep batch norm on its statistics.
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def optimizer_and_schedule(
    model: nn.Module, config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``model``'s trainable parameters (offset branches at ``offset_lr_mult``) and
    its schedule: linear warm-up over the first tenth of the steps (at most an epoch), then
    cosine decay to zero; call the scheduler's ``step`` after every optimiser step.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> optimizer, scheduler = optimizer_and_schedule(net, TrainConfig(epochs=2, lr=0.1), 10)
        >>> round(scheduler.get_last_lr()[0], 3)
        0.05
    """
    groups = offset_param_groups(
        model, config.lr, config.offset_lr_mult, weight_decay=config.weight_decay
    )
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    total = steps_per_epoch * config.epochs
    warmup = min(steps_per_epoch, max(total // 10, 1))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _sync_buffers(model: nn.Module, world_size: int) -> None:
    if world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def train(
    model: nn.Module,
    train_split: Split,
    val_split: Split,
    config: TrainConfig,
    augmentation: Augmentation | None = None,
    task: str = "train",
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place, keeping the weights of the epoch best on ``val_split``.

    Args:
        model: the network, already on its device.
        train_split: training images; with ``augmentation`` every epoch draws fresh random
            deformations or occlusions of them (the same on every process).
        val_split: images for model selection (never the test split).
        config: the schedule.
        augmentation: random change applied to training images (a
            :class:`~deformconv.demo.data.Deformation` or
            :class:`~deformconv.demo.occlusion.Occlusion`), or ``None``.
        task: name passed to ``progress``.
        progress: called after every optimisation step (on every process; the caller decides
            which one displays).

    Returns:
        The per-epoch history and the best epoch, whose weights the model now holds.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> images = torch.rand(32, 1, 2, 2)
        >>> split = Split(images, (images.mean((1, 2, 3)) > 0.5).long())
        >>> result = train(model, split, split, TrainConfig(epochs=2, batch_size=8, lr=0.05))
        >>> [r.epoch for r in result.history], result.best_epoch in (1, 2)
        ([1, 2], True)
    """
    rank, world_size = _context()
    device = next(model.parameters()).device
    _set_trainable(model, config.trainable)
    n = len(train_split)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer, scheduler = optimizer_and_schedule(model, config, steps_per_epoch)
    if world_size > 1:
        ddp_model: nn.Module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        ddp_model = model

    result = TrainResult()
    best_state = copy.deepcopy(model.state_dict())
    step = 0
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
        images = train_split.images[order]
        if augmentation is not None:
            images = augmentation.apply(images, generator)
        labels = train_split.labels[order]
        _train_mode(model, config.trainable)
        loss_sum = correct = seen = 0.0
        for first in range(0, n, config.batch_size):
            end = min(first + config.batch_size, n)
            if end - first < world_size:
                # Every process must step together; a remainder smaller than the world is dropped.
                continue
            batch = _shard(torch.arange(first, end), rank, world_size)
            x = images[batch].to(device)
            y = labels[batch].to(device)
            logits = ddp_model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = float(loss.detach())
            loss_sum += loss_value * y.numel()
            correct += float((logits.argmax(1) == y).sum())
            seen += y.numel()
            if progress is not None:
                progress(ProgressUpdate(task, step, total, epoch, config.epochs, loss_value))
        seconds = time.perf_counter() - start
        _sync_buffers(model, world_size)
        totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(totals)
        loss_sum, correct, seen = (float(t) for t in totals)
        val_accuracy = evaluate(model, val_split)
        result.history.append(
            EpochRecord(
                epoch, loss_sum / max(seen, 1), correct / max(seen, 1), val_accuracy, seconds
            )
        )
        if progress is not None:
            progress(
                ProgressUpdate(
                    task, step, total, epoch, config.epochs, loss_sum / max(seen, 1), val_accuracy
                )
            )
        if val_accuracy > result.best_val_accuracy or epoch == 1:
            result.best_epoch, result.best_val_accuracy = epoch, val_accuracy
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return result
