from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from deformconv.demo.data import (
    DataError,
    Deformation,
    deform,
    load_digits,
    load_image,
    load_mnist,
    read_idx,
)


def _naive_deform(image: np.ndarray, scale: float, degrees: float, shift: tuple[float, float]):
    """Each output pixel looked up by hand: input = R(angle) (output - shift) / scale about the
    centre, with rows pointing down; bilinear, zero outside."""
    h, w = image.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    a = math.radians(degrees)
    out = np.zeros_like(image)
    for r in range(h):
        for c in range(w):
            x, y = c - cx - shift[1], r - cy - shift[0]
            xi = (math.cos(a) * x - math.sin(a) * y) / scale + cx
            yi = (math.sin(a) * x + math.cos(a) * y) / scale + cy
            x0, y0 = math.floor(xi), math.floor(yi)
            value = 0.0
            for yy, xx, wgt in (
                (y0, x0, (1 - (yi - y0)) * (1 - (xi - x0))),
                (y0, x0 + 1, (1 - (yi - y0)) * (xi - x0)),
                (y0 + 1, x0, (yi - y0) * (1 - (xi - x0))),
                (y0 + 1, x0 + 1, (yi - y0) * (xi - x0)),
            ):
                if 0 <= yy < h and 0 <= xx < w:
                    value += wgt * image[yy, xx]
            out[r, c] = value
    return np.clip(out, 0, 1)


@pytest.mark.parametrize(
    "deformation",
    [
        Deformation(scale=(0.5, 1.5), rotation=30, translation=3),
        Deformation(scale=(1.0, 1.0), rotation=90, translation=0),
        Deformation(scale=(0.7, 0.7), rotation=0, translation=5),
    ],
)
def test_deform_matches_naive_transform(deformation):
    images = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    out, transform = deform(images, deformation, torch.Generator().manual_seed(1))
    low, high = deformation.scale
    assert bool(((transform.scale >= low - 1e-9) & (transform.scale <= high + 1e-9)).all())
    assert float(transform.angle.abs().max()) <= deformation.rotation
    assert float(transform.shift.abs().max()) <= deformation.translation
    for n in range(3):
        expected = _naive_deform(
            images[n, 0].numpy(),
            float(transform.scale[n]),
            float(transform.angle[n]),
            tuple(transform.shift[n].tolist()),
        )
        np.testing.assert_allclose(out[n, 0].numpy(), expected, atol=1e-9)


def test_positive_angle_turns_counter_clockwise():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 7] = 1  # right of the centre
    out, transform = deform(
        image,
        Deformation(scale=(1, 1), rotation=90, translation=0),
        torch.Generator().manual_seed(3),
    )
    row, col = divmod(int(out[0, 0].argmax()), 9)
    angle = float(transform.angle[0])
    # Counter-clockwise on screen: the point rises (smaller row) for a positive angle.
    assert (row < 4) == (angle > 0)
    assert math.hypot(row - 4, col - 4) == pytest.approx(3, abs=0.75)


def test_deform_is_reproducible_and_elastic_changes_the_image():
    images = torch.rand(4, 1, 16, 16)
    plain = Deformation(scale=(1, 1), rotation=0, translation=0)
    elastic = Deformation(scale=(1, 1), rotation=0, translation=0, elastic=2.0)
    same, _ = deform(images, plain, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, images)
    a, _ = deform(images, elastic, torch.Generator().manual_seed(5))
    b, _ = deform(images, elastic, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert float((a - images).abs().max()) > 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": (0.0, 1.0)}, "scale must be a range"),
        ({"scale": (2.0, 1.0)}, "scale must be a range"),
        ({"rotation": -1.0}, "rotation must be a finite number >= 0"),
        ({"translation": float("nan")}, "translation must be"),
        ({"elastic_sigma": 0.0}, "elastic_sigma must be positive"),
    ],
)
def test_deformation_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Deformation(**kwargs)
    with pytest.raises(ValueError, match=r"images must be 4-D"):
        deform(torch.zeros(3, 8, 8), Deformation(), torch.Generator())


def test_digits_splits_are_disjoint_stratified_and_seeded():
    splits = load_digits(size=16, digit_size=10, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1259, 179, 359)
    assert splits.train.images.shape[1:] == (1, 16, 16)
    # The digit sits in the middle 10x10: the 3-pixel margins are empty.
    assert float(splits.test.images[..., :3, :].abs().max()) == 0.0
    assert float(splits.train.images.min()) >= 0.0 and float(splits.train.images.max()) <= 1.0
    for split in (splits.train, splits.val, splits.test):
        counts = torch.bincount(split.labels, minlength=10).float()
        assert float(counts.min()) / float(counts.max()) > 0.85
    rows = torch.cat([s.images.flatten(1) for s in (splits.train, splits.val, splits.test)])
    assert torch.unique(rows, dim=0).shape[0] >= rows.shape[0] - 5  # a few digits repeat
    again = load_digits(size=16, digit_size=10, seed=0)
    other = load_digits(size=16, digit_size=10, seed=1)
    assert torch.equal(again.test.labels, splits.test.labels)
    assert not torch.equal(other.test.labels, splits.test.labels)
    with pytest.raises(ValueError, match="digit_size must be <= size"):
        load_digits(size=16, digit_size=20)


def _idx(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize(
    ("dtype", "code"), [(np.uint8, 0x08), (np.int16, 0x0B), (np.float32, 0x0D)]
)
def test_read_idx_round_trip(tmp_path, compressed, dtype, code):
    array = (
        (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        if dtype != np.uint8
        else (np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    )
    raw = _idx(array, code)
    path = tmp_path / ("a-idx3" + (".gz" if compressed else ""))
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="is not an IDX file: magic number"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx(np.zeros((4, 2), np.uint8), 0x08)[:-3])
    with pytest.raises(DataError, match=r"has 17 bytes, but its header \(4, 2\) of uint8 needs 20"):
        read_idx(short)
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "missing")


def _fake_mnist(root: Path, train: int = 60, test: int = 20, gz: bool = False) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, array, code in (
            (f"{prefix}-images-idx3-ubyte", images, 0x08),
            (f"{prefix}-labels-idx1-ubyte", labels, 0x08),
        ):
            data = _idx(array, code)
            if gz:
                (raw / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_torchvision_layout(tmp_path, gz):
    _fake_mnist(tmp_path, gz=gz)
    splits = load_mnist(tmp_path, size=32, digit_size=28, val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 20)
    assert splits.train.images.shape[1:] == (1, 32, 32)
    assert sorted(splits.val.labels.tolist()) == list(range(10))
    # The raw folder itself is accepted as root too.
    again = load_mnist(tmp_path / "MNIST" / "raw", val_size=10)
    assert torch.equal(again.test.labels, splits.test.labels)


def test_load_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte\[.gz\] not found .* never downloads"
    ):
        load_mnist(tmp_path)
    _fake_mnist(tmp_path / "mismatch")
    labels = tmp_path / "mismatch" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(7, np.uint8), 0x08))
    with pytest.raises(DataError, match="MNIST test files disagree"):
        load_mnist(tmp_path / "mismatch")


def test_load_image_inverts_dark_on_light(tmp_path):
    from PIL import Image

    dark_on_light = np.full((30, 20), 255, np.uint8)
    dark_on_light[10:20, 8:12] = 0
    path = tmp_path / "digit.jpg"
    Image.fromarray(dark_on_light).save(path)
    image = load_image(path, 16)
    assert image.shape == (1, 16, 16)
    assert float(image[0, 8, 8]) > 0.8 and float(image[0, 0, 0]) < 0.1
    kept = load_image(path, 16, invert="no")
    assert float(kept[0, 0, 0]) > 0.9


@pytest.mark.parametrize(("fit", "rows"), [(0.625, 10), (None, 2)])
def test_load_image_fits_the_content_to_the_training_digit_size(tmp_path, fit, rows):
    from PIL import Image

    small = np.zeros((64, 64), np.uint8)
    small[10:18, 40:44] = 255  # a bright 8x4 stroke in a corner
    path = tmp_path / "small.png"
    Image.fromarray(small).save(path)
    image = load_image(path, 16, fit=fit)
    lit = np.flatnonzero((image[0] > 0.5).any(1).numpy())
    assert lit.size == pytest.approx(rows, abs=1)
    if fit is not None:
        assert (lit[0] + lit[-1]) / 2 == pytest.approx(7.5, abs=1)


def test_load_image_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match="is not an image file Pillow can read"):
        load_image(text, 16)
    with pytest.raises(DataError, match="does not exist or is not a file"):
        load_image(tmp_path / "missing.png", 16)
    with pytest.raises(ValueError, match="invert must be 'auto', 'yes' or 'no'"):
        load_image(text, 16, invert="maybe")
    with pytest.raises(ValueError, match=r"fit must be in \(0, 1\] or None"):
        load_image(text, 16, fit=1.5)
