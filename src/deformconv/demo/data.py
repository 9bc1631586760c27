"""Digit data for the demo: scikit-learn's handwritten digits or a local MNIST copy, and the random
deformations (scale, rotation, translation, optional elastic warp) that make them harder.

Images are float32 tensors of shape ``(N, 1, size, size)`` in [0, 1], a bright digit on a dark
background; labels are int64 tensors of shape ``(N,)``. Nothing is ever downloaded: the digits ship
inside scikit-learn, and MNIST is read from files the user already has, in torchvision's raw IDX
format, without needing torchvision.
"""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASETS",
    "Augmentation",
    "DataError",
    "Deformation",
    "DigitSplits",
    "Split",
    "Transform",
    "check_source",
    "default_digit_size",
    "deform",
    "load_dataset",
    "load_digits",
    "load_image",
    "load_mnist",
    "read_idx",
]

DATASETS: tuple[str, ...] = ("digits", "mnist")

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset cannot be found or read; the message says which file and why."""


@dataclass(frozen=True)
class Split:
    """Images ``(N, 1, H, W)`` float32 in [0, 1] and their labels ``(N,)`` int64.

    ``scales`` holds, for deformed copies, the scale factor applied to each image (``(N,)``);
    ``None`` for undeformed images. ``occluders`` holds, for occluded copies, where each occluder
    lies (``(N, 1, H, W)`` bool); ``None`` for unoccluded images.
    """

    images: Tensor
    labels: Tensor
    scales: Tensor | None = None
    occluders: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DigitSplits:
    """Disjoint train, validation and test splits of one dataset."""

    train: Split
    val: Split
    test: Split
    name: str


class Augmentation(Protocol):
    """A random change of training images, drawn afresh every epoch (:class:`Deformation`,
    :class:`~deformconv.demo.occlusion.Occlusion`)."""

    def apply(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """``(N, C, H, W)`` images changed at random; the same generator state gives the same
        output."""
        ...


@dataclass(frozen=True)
class Deformation:
    """The random deformation of :func:`deform`.

    Args:
        scale: ``(low, high)`` range of the scale factor, sampled log-uniformly.
        rotation: largest rotation in degrees (uniform in ``[-rotation, rotation]``).
        translation: largest shift in pixels along each axis.
        elastic: amplitude in pixels of a smooth random displacement field (0: none).
        elastic_sigma: smoothness of that field (Gaussian sigma, pixels).
    """

    scale: tuple[float, float] = (0.5, 1.5)
    rotation: float = 20.0
    translation: float = 3.0
    elastic: float = 0.0
    elastic_sigma: float = 4.0

    def __post_init__(self) -> None:
        low, high = self.scale
        if not (0 < low <= high and math.isfinite(high)):
            raise ValueError(f"scale must be a range 0 < low <= high, got ({low!r}, {high!r})")
        for name in ("rotation", "translation", "elastic"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.elastic_sigma > 0:
            raise ValueError(f"elastic_sigma must be positive, got {self.elastic_sigma!r}")

    def apply(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The deformed images alone (the :class:`Augmentation` interface)."""
        return deform(images, self, generator)[0]


def _stratified_split(
    labels: np.ndarray, fractions: tuple[float, ...], seed: int
) -> list[np.ndarray]:
    """Index arrays, one per fraction (plus the remainder last), with every class spread evenly."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for k, fraction in enumerate(fractions):
            count = round(fraction * idx.size)
            parts[k].append(idx[start : start + count])
            start += count
        parts[-1].append(idx[start:])
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _place(images: Tensor, size: int, digit_size: int) -> Tensor:
    """Resize ``(N, 1, h, w)`` images to ``digit_size`` and centre them on a ``size`` canvas."""
    if digit_size > size:
        raise ValueError(f"digit_size must be <= size ({size}), got {digit_size}")
    resized = F.interpolate(
        images, size=(digit_size, digit_size), mode="bicubic", align_corners=False
    )
    resized = resized.clamp_(0.0, 1.0)
    before = (size - digit_size) // 2
    after = size - digit_size - before
    return F.pad(resized, (before, after, before, after))


def load_digits(size: int = 32, digit_size: int = 20, seed: int = 0) -> DigitSplits:
    """scikit-learn's 1,797 handwritten digits, upsampled and split 70/10/20 (stratified).

    Args:
        size: side of the square canvas in pixels.
        digit_size: side the 8x8 digit is upsampled to (bicubic) before it is centred on the
            canvas, leaving room for enlarged copies.
        seed: seed of the split.

    Returns:
        Train (1,259), validation (179) and test (359) splits of ``(N, 1, size, size)`` images.

    Example:
        >>> splits = load_digits(size=16, digit_size=12)
        >>> len(splits.train), len(splits.val), len(splits.test)
        (1259, 179, 359)
        >>> splits.train.images.shape[1:], float(splits.train.images.max()) <= 1.0
        (torch.Size([1, 16, 16]), True)
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'deformconv[demo]'"
        ) from exc
    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    images = _place(images, size, digit_size)
    test_idx, val_idx, train_idx = _stratified_split(bunch.target, (0.2, 0.1), seed)

    def take(idx: np.ndarray) -> Split:
        index = torch.from_numpy(idx)
        return Split(images[index].contiguous(), labels[index].contiguous())

    return DigitSplits(take(train_idx), take(val_idx), take(test_idx), "digits")


def check_source(data: str, root: str | Path | None) -> None:
    """Raise a ``ValueError`` unless ``data`` names a dataset and MNIST comes with its ``root``.

    Example:
        >>> check_source("mnist", None)
        Traceback (most recent call last):
        ...
        ValueError: data 'mnist' needs root: the folder of a local MNIST copy
    """
    if data not in DATASETS:
        raise ValueError(f"data must be one of {DATASETS}, got {data!r}")
    if data == "mnist" and not root:
        raise ValueError("data 'mnist' needs root: the folder of a local MNIST copy")


def default_digit_size(data: str, size: int) -> int:
    """The side a source digit is resized to on a ``size`` canvas: 5/8 of it for the 8x8
    digits, 7/8 for MNIST's 28x28 images, whose digits already have a margin.

    Example:
        >>> default_digit_size("digits", 32), default_digit_size("mnist", 32)
        (20, 28)
    """
    if data not in DATASETS:
        raise ValueError(f"data must be one of {DATASETS}, got {data!r}")
    return round(size * (5 / 8 if data == "digits" else 7 / 8))


def load_dataset(
    data: str,
    size: int,
    digit_size: int | None = None,
    root: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> DigitSplits:
    """The splits of ``data`` (``"digits"`` or ``"mnist"`` under ``root``), the training split
    cut to its first ``limit`` images.

    Example:
        >>> splits = load_dataset("digits", 16, limit=100)
        >>> len(splits.train), tuple(splits.test.images.shape[1:])
        (100, (1, 16, 16))
    """
    check_source(data, root)
    side = default_digit_size(data, size) if digit_size is None else digit_size
    if data == "digits":
        splits = load_digits(size, side, seed)
    else:
        assert root is not None
        splits = load_mnist(root, size, side, seed=seed)
    if limit is not None and limit < len(splits.train):
        train = Split(splits.train.images[:limit], splits.train.labels[:limit])
        splits = DigitSplits(train, splits.val, splits.test, splits.name)
    return splits


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format; ``.gz`` compressed or not) into a NumPy array.

    Example:
        >>> import tempfile, os
        >>> raw = struct.pack(">HBB", 0, 0x08, 2) + struct.pack(">II", 2, 3) + bytes(range(6))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "a-idx2-ubyte")
        ...     _ = open(p, "wb").write(raw)
        ...     read_idx(p).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file: only {len(data)} bytes")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_TYPES or ndim == 0:
        raise DataError(
            f"{path} is not an IDX file: magic number {data[:4].hex()} (expected 0000 followed "
            "by a type code 08-0e and a dimension count)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: header needs {header} bytes, file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path} has {len(data)} bytes, but its header {shape} of {dtype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _mnist_file(root: Path, stem: str) -> Path:
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(
        f"MNIST file {stem}[.gz] not found under {root} (looked in {root / 'MNIST' / 'raw'}, "
        f"{root / 'raw'} and {root}); the demo never downloads: point --root at a folder "
        "laid out like torchvision.datasets.MNIST(root) saves it"
    )


def load_mnist(
    root: str | Path,
    size: int = 32,
    digit_size: int = 28,
    val_size: int | None = None,
    seed: int = 0,
) -> DigitSplits:
    """A local MNIST copy in torchvision's layout (``root/MNIST/raw/*-ubyte[.gz]``).

    The 60,000 training images are split into train and validation (``val_size``, stratified);
    the 10,000 ``t10k`` images are the test split.

    Args:
        root: the folder given to ``torchvision.datasets.MNIST(root)``, or its ``MNIST/raw``.
        size: side of the square canvas.
        digit_size: side the 28x28 images are resized to before centring.
        val_size: validation images taken from the training file (default: 5,000 of the
            full 60,000, a twelfth of a smaller file).
        seed: seed of the split.

    Raises:
        DataError: the folder or one of the four files is missing or not valid IDX.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MNIST root {root} is not a folder (--root must be an existing folder)")
    arrays = {key: read_idx(_mnist_file(root, stem)) for key, stem in _MNIST_FILES.items()}
    for part in ("train", "test"):
        imgs, labs = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if imgs.ndim != 3 or labs.ndim != 1 or imgs.shape[0] != labs.shape[0]:
            raise DataError(
                f"MNIST {part} files disagree: images {imgs.shape}, labels {labs.shape} "
                "(expected (N, 28, 28) and (N,))"
            )
    train_labels = arrays["train_labels"].astype(np.int64)
    if val_size is None:
        val_size = max(1, min(5000, train_labels.size // 12))
    if not 0 < val_size < train_labels.size:
        raise ValueError(f"val_size must be in (0, {train_labels.size}), got {val_size}")

    def prepare(imgs: np.ndarray) -> Tensor:
        t = torch.from_numpy(imgs.astype(np.float32) / 255.0).unsqueeze(1)
        return _place(t, size, digit_size)

    train_images = prepare(arrays["train_images"])
    val_idx, train_idx = _stratified_split(train_labels, (val_size / train_labels.size,), seed)
    labels = torch.from_numpy(train_labels)

    def take(idx: np.ndarray) -> Split:
        index = torch.from_numpy(idx)
        return Split(train_images[index].contiguous(), labels[index].contiguous())

    test = Split(
        prepare(arrays["test_images"]),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
    return DigitSplits(take(train_idx), take(val_idx), test, "mnist")


def _gaussian_blur(field: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=field.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    kx = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    ky = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    field = F.conv2d(F.pad(field, (radius, radius, 0, 0), mode="replicate"), kx, groups=channels)
    return F.conv2d(F.pad(field, (0, 0, radius, radius), mode="replicate"), ky, groups=channels)


@dataclass(frozen=True)
class Transform:
    """The random transform :func:`deform` applied to each of ``N`` images.

    Attributes:
        scale: ``(N,)`` scale factors.
        angle: ``(N,)`` rotations in degrees, counter-clockwise as displayed.
        shift: ``(N, 2)`` shifts in pixels (rows down, columns right), applied after scaling
            and rotating about the canvas centre.
    """

    scale: Tensor
    angle: Tensor
    shift: Tensor


def deform(
    images: Tensor, deformation: Deformation, generator: torch.Generator
) -> tuple[Tensor, Transform]:
    """Randomly scale, rotate, shift (and optionally elastically warp) each image.

    Each image gets its own transform: scaled and rotated about the canvas centre, then
    shifted; pixels that come from outside the canvas are zero. The elastic warp, if any, adds a
    smooth random displacement to where each output pixel samples.

    Args:
        images: ``(N, C, H, W)`` float images.
        deformation: the ranges to sample from.
        generator: source of randomness (the same generator state gives the same output).

    Returns:
        The deformed images ``(N, C, H, W)`` and the :class:`Transform` of each.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.zeros(2, 1, 16, 16); x[:, :, 6:10, 6:10] = 1
        >>> y, transform = deform(x, Deformation(scale=(2.0, 2.0), rotation=0, translation=0), g)
        >>> transform.scale.tolist(), round(float(y.sum() / x.sum()), 1)
        ([2.0, 2.0], 4.0)
    """
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    dt = images.dtype
    low, high = deformation.scale
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    scales = torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).to(dt)
    degrees = (torch.rand(n, generator=generator, dtype=dt) * 2 - 1) * deformation.rotation
    shifts = (torch.rand(n, 2, generator=generator, dtype=dt) * 2 - 1) * deformation.translation
    # affine_grid wants the inverse map, output -> input, in [-1, 1] units. In pixels about the
    # centre, (column, row) of the input is R(angle) ((column, row) of the output - shift) / s,
    # where R rotates with rows pointing down, which turns the content counter-clockwise.
    radians = torch.deg2rad(degrees)
    cos, sin = torch.cos(radians) / scales, torch.sin(radians) / scales
    shift_x, shift_y = shifts[:, 1], shifts[:, 0]
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, -(cos * shift_x - sin * shift_y) * 2 / w], dim=1),
            torch.stack([sin * w / h, cos, -(sin * shift_x + cos * shift_y) * 2 / h], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    if deformation.elastic > 0:
        noise = torch.rand(n, 2, h, w, generator=generator, dtype=dt) * 2 - 1
        field = _gaussian_blur(noise, deformation.elastic_sigma)
        field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        scale = torch.tensor([2.0 / w, 2.0 / h], dtype=dt)
        grid = grid + deformation.elastic * field.permute(0, 2, 3, 1) * scale
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0), Transform(scales, degrees, shifts)


def load_image(
    path: str | Path, size: int, invert: str = "auto", fit: float | None = 0.625
) -> Tensor:
    """A grey image file as the demo's models see it: ``(1, size, size)`` in [0, 1].

    The models expect a bright digit on a dark background: ``invert="auto"`` inverts images whose
    border is mostly bright (a dark digit on paper), ``"yes"`` and ``"no"`` force the choice.
    With ``fit``, the bounding box of the content (pixels brighter than a quarter of the
    maximum, after inversion) is cropped and resized so its longer side is ``fit * size``, then
    centred, as the training digits are (20 of 32 pixels); with ``fit=None`` the whole image is
    padded to a square with its border colour and resized.

    Raises:
        DataError: the file is missing or not an image Pillow can read.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "digit.png")
        ...     Image.new("L", (20, 10), color=255).save(path)
        ...     image = load_image(path, 16)
        >>> tuple(image.shape), float(image.max())
        ((1, 16, 16), 0.0)
    """
    if invert not in ("auto", "yes", "no"):
        raise ValueError(f"invert must be 'auto', 'yes' or 'no', got {invert!r}")
    if fit is not None and not 0 < fit <= 1:
        raise ValueError(f"fit must be in (0, 1] or None, got {fit!r}")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ImportError("reading images needs pillow: pip install 'deformconv[demo]'") from exc
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist or is not a file")
    try:
        with Image.open(path) as opened:
            grey = np.asarray(opened.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not an image file Pillow can read ({exc})") from exc

    def border(image: np.ndarray) -> float:
        return float(np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])))

    if invert == "yes" or (invert == "auto" and border(grey) > 0.5):
        grey = 1.0 - grey
    background = border(grey)
    target = size
    if fit is not None:
        content = np.abs(grey - background) > 0.25 * max(
            float(np.abs(grey - background).max()), 1e-6
        )
        if content.any():
            rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
            grey = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        target = max(1, round(fit * size))
    h, w = grey.shape
    side = max(h, w)
    square = np.full((side, side), background, dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = grey
    tensor = torch.from_numpy(square)[None, None]
    if side > target:
        resized = F.interpolate(tensor, size=(target, target), mode="area")
    else:
        resized = F.interpolate(tensor, size=(target, target), mode="bilinear", align_corners=False)
    before = (size - target) // 2
    after = size - target - before
    return F.pad(resized[0], (before, after, before, after), value=background).clamp_(0.0, 1.0)
