"""The demo's three experiments, regular CNN against its deformable twin.

Protocol 1 ("same data"): both networks start from the same weights (the deformable one adds
zero-initialised offset branches) and train with the same schedule on randomly deformed digits.

Protocol 2 ("classic", after the scaled-MNIST experiment that accompanied Dai et al. 2017): a
regular CNN trains on plain digits; then its last convolutions become deformable and only the new
offset branches train on deformed digits. As a control, a copy of the regular CNN fine-tunes all
of its weights on the same deformed digits for the same number of epochs.

Protocol 3 ("occlusion"): as protocol 1, but both networks train on occluded digits (a random
rectangle or blob over a stated fraction of each digit, drawn afresh every epoch).

Every model is tested on plain, deformed and occluded copies of the test digits, and selected on
its validation split (deformed when it trained on deformed digits, occluded when on occluded
ones); the test splits are only evaluated.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from deformconv.demo.data import (
    Augmentation,
    Deformation,
    DigitSplits,
    Split,
    check_source,
    default_digit_size,
    deform,
    load_dataset,
)
from deformconv.demo.models import DigitCNN, ModelConfig, deformable_twin
from deformconv.demo.occlusion import Occlusion, coverage, occluded_split
from deformconv.demo.train import (
    ProgressCallback,
    TrainConfig,
    TrainResult,
    count_parameters,
    evaluate,
    train,
)

__all__ = [
    "DemoConfig",
    "DemoResult",
    "ModelResult",
    "ProtocolResult",
    "load_data",
    "run_demo",
    "run_protocol1",
    "run_protocol2",
    "run_protocol3",
]

PROTOCOLS: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo's outcome depends on.

    Args:
        data: ``"digits"`` (scikit-learn's, bundled) or ``"mnist"`` (local copy under ``root``).
        root: MNIST folder (torchvision layout); required for ``data="mnist"``.
        size: image side in pixels.
        digit_size: side the source image is resized to before it is centred on the canvas
            (default: 5/8 of ``size`` for the 8x8 digits, 7/8 for MNIST's 28x28 images, whose
            digits already have a margin).
        limit: use at most this many training images (``None``: all).
        deformation: the random deformation of the deformed splits.
        occlusion: the random occlusion of the occluded splits (and of protocol 3's training).
        channels: widths of the four convolution blocks.
        deformable: how many of the last blocks become deformable.
        modulated: deformable blocks also learn a modulation mask (DCNv2).
        epochs: epochs of training from scratch (protocols 1 and 3, and the regular CNN of
            protocol 2).
        finetune_epochs: epochs on deformed digits after that in protocol 2.
        batch_size: see :class:`~deformconv.demo.train.TrainConfig`.
        lr: see :class:`~deformconv.demo.train.TrainConfig`.
        offset_lr_mult: see :class:`~deformconv.demo.train.TrainConfig`.
        protocols: which protocols to run.
        seed: seed of the split, initialisation, batch order and deformations.
    """

    data: str = "digits"
    root: str | None = None
    size: int = 32
    digit_size: int | None = None
    limit: int | None = None
    deformation: Deformation = field(default_factory=Deformation)
    occlusion: Occlusion = field(default_factory=Occlusion)
    channels: tuple[int, int, int, int] = (16, 32, 64, 64)
    deformable: int = 3
    modulated: bool = False
    epochs: int = 10
    finetune_epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    offset_lr_mult: float = 1.0
    protocols: tuple[int, ...] = PROTOCOLS
    seed: int = 0

    def __post_init__(self) -> None:
        check_source(self.data, self.root)
        if not self.protocols or any(p not in PROTOCOLS for p in self.protocols):
            raise ValueError(
                f"protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols!r}"
            )
        if self.limit is not None and self.limit < 10:
            raise ValueError(f"limit must be >= 10 training images or None, got {self.limit!r}")
        if not 1 <= self.deformable <= 3:
            raise ValueError(f"deformable must be in [1, 3], got {self.deformable!r}")
        ModelConfig(channels=self.channels, image_size=self.size)
        if not 1 <= self.digit_side() <= self.size:
            raise ValueError(
                f"digit_size must be in [1, size={self.size}], got {self.digit_size!r}"
            )
        self.train_config()

    def digit_side(self) -> int:
        """The digit side actually used (see ``digit_size``)."""
        if self.digit_size is not None:
            return self.digit_size
        return default_digit_size(self.data, self.size)

    def train_config(self, epochs: int | None = None, trainable: str = "all") -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs if epochs is None else epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            offset_lr_mult=self.offset_lr_mult,
            trainable=trainable,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["deformation"] = asdict(self.deformation)
        out["occlusion"] = asdict(self.occlusion)
        return out


@dataclass
class ModelResult:
    """One trained model's row of the results table."""

    name: str
    plain_accuracy: float
    deformed_accuracy: float
    occluded_accuracy: float
    parameters: int
    trainable_parameters: int
    seconds_per_epoch: float
    training: TrainResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "plain_accuracy": self.plain_accuracy,
            "deformed_accuracy": self.deformed_accuracy,
            "occluded_accuracy": self.occluded_accuracy,
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "seconds_per_epoch": self.seconds_per_epoch,
            "epochs": len(self.training.history),
            "best_epoch": self.training.best_epoch,
            "best_val_accuracy": self.training.best_val_accuracy,
            "history": [asdict(r) for r in self.training.history],
        }


@dataclass
class ProtocolResult:
    """The rows of one protocol and its trained models (by row name); ``deformable`` names the
    row of its deformable model."""

    protocol: int
    title: str
    deformable: str
    rows: list[ModelResult] = field(default_factory=list)
    models: dict[str, DigitCNN] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "title": self.title,
            "rows": [r.to_dict() for r in self.rows],
        }


@dataclass
class DemoResult:
    """The protocols' results and the test splits they were measured on."""

    config: DemoConfig
    protocols: list[ProtocolResult]
    test_plain: Split
    test_deformed: Split
    test_occluded: Split
    sizes: dict[str, int]
    seconds: float
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "dataset_sizes": self.sizes,
            "test_occluded_coverage": _mean_coverage(self.test_plain, self.test_occluded),
            "world_size": self.world_size,
            "seconds": self.seconds,
            "protocols": [p.to_dict() for p in self.protocols],
        }


@dataclass(frozen=True)
class _Data:
    splits: DigitSplits
    val_deformed: Split
    test_deformed: Split
    val_occluded: Split
    test_occluded: Split


def load_data(config: DemoConfig) -> DigitSplits:
    """The configured dataset's splits (train limited to ``config.limit`` images)."""
    return load_dataset(
        config.data, config.size, config.digit_side(), config.root, config.limit, config.seed
    )


def _deformed_copy(split: Split, deformation: Deformation, seed: int) -> Split:
    images, transform = deform(split.images, deformation, torch.Generator().manual_seed(seed))
    return Split(images, split.labels, transform.scale)


def _mean_coverage(plain: Split, occluded: Split) -> float:
    assert occluded.occluders is not None
    return float(coverage(plain.images, occluded.occluders).mean())


def _prepare(config: DemoConfig, splits: DigitSplits) -> _Data:
    # Fixed deformed and occluded copies: the same for every model, seed-dependent, never
    # trained on.
    return _Data(
        splits,
        _deformed_copy(splits.val, config.deformation, config.seed + 1_000_001),
        _deformed_copy(splits.test, config.deformation, config.seed + 2_000_003),
        occluded_split(splits.val, config.occlusion, config.seed + 3_000_017),
        occluded_split(splits.test, config.occlusion, config.seed + 4_000_037),
    )


def _row(
    name: str, model: DigitCNN, data: _Data, training: TrainResult, trainable: int
) -> ModelResult:
    return ModelResult(
        name=name,
        plain_accuracy=evaluate(model, data.splits.test),
        deformed_accuracy=evaluate(model, data.test_deformed),
        occluded_accuracy=evaluate(model, data.test_occluded),
        parameters=count_parameters(model),
        trainable_parameters=trainable,
        seconds_per_epoch=training.seconds_per_epoch,
        training=training,
    )


def _regular(config: DemoConfig, device: torch.device, seed: int) -> DigitCNN:
    torch.manual_seed(seed)
    model_config = ModelConfig(channels=config.channels, image_size=config.size)
    return DigitCNN(model_config).to(device)


def _offset_parameters(model: DigitCNN) -> int:
    return sum(
        p.numel()
        for conv in model.convs
        if hasattr(conv, "conv_offset")
        for p in conv.conv_offset.parameters()
    )


def _same_budget(
    result: ProtocolResult,
    config: DemoConfig,
    data: _Data,
    device: torch.device,
    augmentation: Augmentation,
    val_split: Split,
    seed: int,
    progress: ProgressCallback | None,
) -> ProtocolResult:
    """Train a regular CNN and its deformable twin from the same weights with one schedule."""
    regular = _regular(config, device, seed)
    deformable = deformable_twin(regular, config.deformable, config.modulated)
    schedule = config.train_config()
    for name, model in (("regular CNN", regular), ("deformable CNN", deformable)):
        training = train(
            model,
            data.splits.train,
            val_split,
            schedule,
            augmentation,
            task=f"P{result.protocol} {name}",
            progress=progress,
        )
        result.rows.append(_row(name, model, data, training, count_parameters(model)))
        result.models[name] = model
    return result


def run_protocol1(
    config: DemoConfig,
    data: _Data,
    device: torch.device,
    progress: ProgressCallback | None = None,
) -> ProtocolResult:
    """Regular and deformable CNN, same initial weights, both trained on deformed digits."""
    result = ProtocolResult(1, "Protocol 1: both trained on deformed digits", "deformable CNN")
    return _same_budget(
        result, config, data, device, config.deformation, data.val_deformed, config.seed, progress
    )


def run_protocol3(
    config: DemoConfig,
    data: _Data,
    device: torch.device,
    progress: ProgressCallback | None = None,
) -> ProtocolResult:
    """Regular and deformable CNN, same initial weights, both trained on occluded digits."""
    result = ProtocolResult(3, "Protocol 3: both trained on occluded digits", "deformable CNN")
    return _same_budget(
        result,
        config,
        data,
        device,
        config.occlusion,
        data.val_occluded,
        config.seed + 13,
        progress,
    )


def run_protocol2(
    config: DemoConfig,
    data: _Data,
    device: torch.device,
    progress: ProgressCallback | None = None,
) -> ProtocolResult:
    """Regular CNN on plain digits; then only new offset branches (or, as a control, all
    weights of a copy) trained on deformed digits."""
    result = ProtocolResult(
        2, "Protocol 2: regular CNN trained on plain digits, then adapted", "deformable: offsets"
    )
    regular = _regular(config, device, config.seed + 7)
    training = train(
        regular,
        data.splits.train,
        data.splits.val,
        config.train_config(),
        None,
        task="P2 regular CNN (plain)",
        progress=progress,
    )
    result.rows.append(
        _row("regular CNN (plain)", regular, data, training, count_parameters(regular))
    )
    result.models["regular CNN (plain)"] = regular

    twin = deformable_twin(regular, config.deformable, config.modulated)
    finetune = config.train_config(config.finetune_epochs, trainable="offsets")
    training = train(
        twin,
        data.splits.train,
        data.val_deformed,
        finetune,
        config.deformation,
        task="P2 deformable: offsets only",
        progress=progress,
    )
    name = result.deformable
    result.rows.append(_row(name, twin, data, training, _offset_parameters(twin)))
    result.models[name] = twin

    control = _regular(config, device, config.seed + 7)
    control.load_state_dict(regular.state_dict())
    training = train(
        control,
        data.splits.train,
        data.val_deformed,
        config.train_config(config.finetune_epochs),
        config.deformation,
        task="P2 control: regular fine-tuned",
        progress=progress,
    )
    name = "control: fine-tuned"
    result.rows.append(_row(name, control, data, training, count_parameters(control)))
    result.models[name] = control
    return result


def run_demo(
    config: DemoConfig,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    world_size: int = 1,
    splits: DigitSplits | None = None,
) -> DemoResult:
    """Run the configured protocols.

    Args:
        config: the experiment.
        device: where to train.
        progress: called after every training step (see :mod:`deformconv.demo.train`).
        world_size: number of training processes (recorded in the result).
        splits: the data, if already loaded with :func:`load_data` (default: loaded here).

    Example:
        >>> config = DemoConfig(size=16, digit_size=12, limit=64, channels=(4, 4, 4, 4),
        ...                     epochs=1, finetune_epochs=1, protocols=(1, 3))
        >>> result = run_demo(config)
        >>> [(p.protocol, [row.name for row in p.rows]) for p in result.protocols]
        [(1, ['regular CNN', 'deformable CNN']), (3, ['regular CNN', 'deformable CNN'])]
    """
    start = time.perf_counter()
    device = torch.device(device)
    data = _prepare(config, load_data(config) if splits is None else splits)
    results: list[ProtocolResult] = []
    if 1 in config.protocols:
        results.append(run_protocol1(config, data, device, progress))
    if 2 in config.protocols:
        results.append(run_protocol2(config, data, device, progress))
    if 3 in config.protocols:
        results.append(run_protocol3(config, data, device, progress))
    sizes = {
        "train": len(data.splits.train),
        "val": len(data.splits.val),
        "test": len(data.splits.test),
    }
    return DemoResult(
        config,
        results,
        data.splits.test,
        data.test_deformed,
        data.test_occluded,
        sizes,
        time.perf_counter() - start,
        world_size,
    )
