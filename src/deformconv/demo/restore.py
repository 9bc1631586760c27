"""The demo's restoration task: an encoder-decoder brings back the clean digit from an occluded one.

The input is a digit with a random occluder over part of it (:mod:`~deformconv.demo.occlusion`),
the target the same digit unoccluded, so the decoder has to draw the hidden strokes, not just copy
its input. A regular :class:`~deformconv.demo.encoder_decoder.EncoderDecoder` and its twin with
deformable strided convolutions start from the same weights and train with the same schedule on
freshly occluded training digits every epoch (mean squared error). The epoch with the lowest
error on the fixed occluded validation digits is kept; the test digits are only evaluated,
against the baseline of returning the input unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deformconv.demo.data import Split, check_source, default_digit_size, load_dataset
from deformconv.demo.encoder_decoder import (
    EncoderDecoder,
    EncoderDecoderConfig,
    deformable_encoder,
)
from deformconv.demo.occlusion import Occlusion, occluded_split
from deformconv.demo.train import (
    ProgressCallback,
    ProgressUpdate,
    TrainConfig,
    count_parameters,
    optimizer_and_schedule,
)

__all__ = [
    "IDENTITY",
    "RestoreConfig",
    "RestoreEpoch",
    "RestoreResult",
    "RestoreRow",
    "restoration_error",
    "run_restore",
    "train_restorer",
]

IDENTITY = "input unchanged"


@dataclass(frozen=True)
class RestoreConfig:
    """Everything the restoration task's outcome depends on.

    Args:
        data: the digits' source, as for :class:`~deformconv.demo.protocols.DemoConfig`.
        root: the MNIST folder, as for :class:`~deformconv.demo.protocols.DemoConfig`.
        size: the image side, any side >= 4, odd or even.
        digit_size: as for :class:`~deformconv.demo.protocols.DemoConfig`.
        limit: as for :class:`~deformconv.demo.protocols.DemoConfig`.
        seed: as for :class:`~deformconv.demo.protocols.DemoConfig`.
        occlusion: the random occlusion of the inputs.
        channels: widths of the encoder-decoder (see
            :class:`~deformconv.demo.encoder_decoder.EncoderDecoderConfig`).
        modulated: the deformable twin's convolutions also learn a modulation mask.
        epochs: the schedule's epochs (see :class:`~deformconv.demo.train.TrainConfig`).
        batch_size: its batch size.
        lr: its learning rate.
    """

    data: str = "digits"
    root: str | None = None
    size: int = 32
    digit_size: int | None = None
    limit: int | None = None
    occlusion: Occlusion = field(default_factory=Occlusion)
    channels: tuple[int, ...] = (16, 32, 64)
    modulated: bool = False
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_source(self.data, self.root)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 4:
            raise ValueError(f"size must be an int >= 4, got {self.size!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 training image or None, got {self.limit!r}")
        if not 1 <= self.digit_side() <= self.size:
            raise ValueError(
                f"digit_size must be in [1, size={self.size}], got {self.digit_size!r}"
            )
        self.model_config()
        self.train_config()

    def digit_side(self) -> int:
        """The digit side actually used (see ``digit_size``)."""
        if self.digit_size is not None:
            return self.digit_size
        return default_digit_size(self.data, self.size)

    def model_config(self, deformable: int = 0) -> EncoderDecoderConfig:
        return EncoderDecoderConfig(
            (self.size, self.size), self.channels, deformable=deformable, modulated=self.modulated
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["occlusion"] = asdict(self.occlusion)
        return out


@dataclass(frozen=True)
class RestoreEpoch:
    """One epoch: mean training loss, validation error and training seconds."""

    epoch: int
    train_loss: float
    val_error: float
    seconds: float


@dataclass
class RestoreRow:
    """One row of the results: a model (or the identity baseline) and its test errors.

    ``error`` is the mean squared error per pixel over the whole image, ``occluded_error`` the
    same over the occluded pixels only (where the input holds no trace of the digit).
    """

    name: str
    error: float
    occluded_error: float
    parameters: int = 0
    history: list[RestoreEpoch] = field(default_factory=list)
    best_epoch: int = 0

    @property
    def seconds_per_epoch(self) -> float:
        """Median training seconds of an epoch (0 for the baseline)."""
        seconds = sorted(r.seconds for r in self.history)
        return seconds[len(seconds) // 2] if seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "error": self.error,
            "occluded_error": self.occluded_error,
            "parameters": self.parameters,
            "seconds_per_epoch": self.seconds_per_epoch,
            "epochs": len(self.history),
            "best_epoch": self.best_epoch,
            "history": [asdict(r) for r in self.history],
        }


@dataclass
class RestoreResult:
    """The rows (baseline first), the trained models by row name, and the test digits."""

    config: RestoreConfig
    rows: list[RestoreRow]
    models: dict[str, EncoderDecoder]
    test_input: Split
    test_target: Split
    sizes: dict[str, int]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": "restore",
            "config": self.config.to_dict(),
            "dataset_sizes": self.sizes,
            "seconds": self.seconds,
            "rows": [r.to_dict() for r in self.rows],
        }


@torch.no_grad()
def restoration_error(
    model: EncoderDecoder | None,
    inputs: Tensor,
    targets: Tensor,
    occluders: Tensor,
    batch_size: int = 256,
) -> tuple[float, float]:
    """Mean squared error per pixel of ``model(inputs)`` against ``targets``, over all pixels
    and over the ``occluders`` only; ``model=None`` scores the inputs themselves.

    Args:
        inputs: ``(N, 1, H, W)``.
        targets: ``(N, 1, H, W)``.
        occluders: ``(N, 1, H, W)`` bool.

    Example:
        >>> x = torch.zeros(1, 1, 2, 2); y = torch.ones(1, 1, 2, 2)
        >>> restoration_error(None, x, y, torch.tensor([[[[True, False], [False, False]]]]))
        (1.0, 1.0)
    """
    squared = torch.zeros((), dtype=torch.float64)
    occluded = torch.zeros((), dtype=torch.float64)
    if model is not None:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size]
        out = x if model is None else model(x.to(device)).cpu()
        errors = (out - targets[start : start + batch_size]).double() ** 2
        squared += errors.sum()
        occluded += errors[occluders[start : start + batch_size]].sum()
    if model is not None:
        model.train(was_training)
    return float(squared) / max(targets.numel(), 1), float(occluded) / max(int(occluders.sum()), 1)


def train_restorer(
    model: EncoderDecoder,
    train_split: Split,
    val_input: Split,
    val_target: Split,
    config: TrainConfig,
    occlusion: Occlusion,
    task: str = "restore",
    progress: ProgressCallback | None = None,
) -> RestoreRow:
    """Train ``model`` in place to restore occluded digits, keeping its best validation epoch.

    Args:
        model: the network, already on its device.
        train_split: clean training digits; every epoch occludes them afresh.
        val_input: fixed occluded validation digits (with their ``occluders``), for model
            selection.
        val_target: the clean originals of ``val_input``.
        config: the schedule (``offset_lr_mult`` applies as in training a classifier; every
            parameter trains, whatever ``trainable`` says).
        occlusion: the random occlusion of the training inputs.
        task: name passed to ``progress``.
        progress: called after every optimisation step.

    Returns:
        A row named ``task`` with the history and best epoch (test errors left at 0).
    """
    if val_input.occluders is None:
        raise ValueError("val_input must be an occluded split (its occluders are None)")
    device = next(model.parameters()).device
    n = len(train_split)
    steps_per_epoch = math.ceil(n / config.batch_size)
    optimizer, scheduler = optimizer_and_schedule(model, config, steps_per_epoch)
    total = steps_per_epoch * config.epochs
    row = RestoreRow(task, 0.0, 0.0, count_parameters(model))
    best_state, best_error = copy.deepcopy(model.state_dict()), math.inf
    step = 0
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        targets = train_split.images[torch.randperm(n, generator=generator)]
        inputs = occlusion.apply(targets, generator)
        model.train()
        loss_sum = 0.0
        for first in range(0, n, config.batch_size):
            x = inputs[first : first + config.batch_size].to(device)
            y = targets[first : first + config.batch_size].to(device)
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += float(loss.detach()) * x.shape[0]
            if progress is not None:
                progress(
                    ProgressUpdate(task, step, total, epoch, config.epochs, float(loss.detach()))
                )
        seconds = time.perf_counter() - start
        val_error, _ = restoration_error(
            model, val_input.images, val_target.images, val_input.occluders
        )
        row.history.append(RestoreEpoch(epoch, loss_sum / n, val_error, seconds))
        if progress is not None:
            progress(
                ProgressUpdate(
                    task, step, total, epoch, config.epochs, loss_sum / n, val_error=val_error
                )
            )
        if val_error < best_error:
            best_error, row.best_epoch = val_error, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return row


def run_restore(
    config: RestoreConfig,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Train the regular and the deformable encoder-decoder and score them on the test digits.

    Example:
        >>> config = RestoreConfig(size=9, digit_size=7, limit=32, channels=(4, 4, 4), epochs=1)
        >>> result = run_restore(config)
        >>> [row.name for row in result.rows]
        ['input unchanged', 'encoder-decoder', 'deformable encoder-decoder']
        >>> tuple(result.models["encoder-decoder"](result.test_input.images[:2]).shape)
        (2, 1, 9, 9)
    """
    start = time.perf_counter()
    device = torch.device(device)
    splits = load_dataset(
        config.data, config.size, config.digit_side(), config.root, config.limit, config.seed
    )
    # Fixed occluded copies, never trained on; the seeds differ from the classifier protocols'.
    val_input = occluded_split(splits.val, config.occlusion, config.seed + 5_000_011)
    test_input = occluded_split(splits.test, config.occlusion, config.seed + 6_000_023)
    assert test_input.occluders is not None
    rows = [
        RestoreRow(
            IDENTITY,
            *restoration_error(None, test_input.images, splits.test.images, test_input.occluders),
        )
    ]
    torch.manual_seed(config.seed)
    regular = EncoderDecoder(config.model_config()).to(device)
    deformable = deformable_encoder(regular, modulated=config.modulated)
    models = {"encoder-decoder": regular, "deformable encoder-decoder": deformable}
    for name, model in models.items():
        row = train_restorer(
            model,
            splits.train,
            val_input,
            splits.val,
            config.train_config(),
            config.occlusion,
            task=name,
            progress=progress,
        )
        row.error, row.occluded_error = restoration_error(
            model, test_input.images, splits.test.images, test_input.occluders
        )
        rows.append(row)
    sizes = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    return RestoreResult(
        config, rows, models, test_input, splits.test, sizes, time.perf_counter() - start
    )
