"""A bank of named 2-D filter kernels, and a reader for kernels typed as text.

The classic image filters split into two groups. Sobel, Scharr, Prewitt, box, Gaussian and
binomial kernels are outer products of two 1-D kernels (rank 1), so they can be applied as a
``k x 1`` then a ``1 x k`` convolution. The Laplacian, its 8-neighbour variant, the Laplacian of
Gaussian and the sharpening kernel are not; :func:`deformconv.tools.separability.factorize_kernel`
tells them apart.

Derivative kernels follow OpenCV and kornia: ``*_x`` responds to a change along the width
(columns), ``*_y`` along the height (rows), and a positive response means values grow to the
right or downwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor

__all__ = ["kernel_names", "named_kernel", "parse_kernel"]


def _binomial(size: int) -> Tensor:
    """Row ``size - 1`` of Pascal's triangle: ``[1, 2, 1]`` for size 3."""
    return torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float64)


def _central_difference(size: int) -> Tensor:
    """Sobel's derivative taps: binomial smoothing of ``[-1, 0, 1]``, e.g. ``[-1, -2, 0, 2, 1]``."""
    taps = _binomial(size - 2)
    out = torch.zeros(size, dtype=torch.float64)
    out[2:] += taps
    out[:-2] -= taps
    return out


def _default_sigma(size: int) -> float:
    # OpenCV's getGaussianKernel rule, so a size alone gives the familiar kernel.
    return 0.3 * ((size - 1) * 0.5 - 1) + 0.8


def _gaussian_1d(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _sobel(size: int, sigma: float | None) -> Tensor:
    return torch.outer(_binomial(size), _central_difference(size))


def _scharr(size: int, sigma: float | None) -> Tensor:
    return torch.outer(
        torch.tensor([3.0, 10.0, 3.0], dtype=torch.float64),
        torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64),
    )


def _prewitt(size: int, sigma: float | None) -> Tensor:
    ramp = torch.arange(size, dtype=torch.float64) - size // 2
    return torch.outer(torch.ones(size, dtype=torch.float64), ramp)


def _box(size: int, sigma: float | None) -> Tensor:
    return torch.full((size, size), 1.0 / size**2, dtype=torch.float64)


def _gaussian(size: int, sigma: float | None) -> Tensor:
    g = _gaussian_1d(size, _default_sigma(size) if sigma is None else sigma)
    return torch.outer(g, g)


def _binomial_2d(size: int, sigma: float | None) -> Tensor:
    b = _binomial(size) / 2 ** (size - 1)
    return torch.outer(b, b)


def _laplacian(size: int, sigma: float | None) -> Tensor:
    return torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)


def _laplacian8(size: int, sigma: float | None) -> Tensor:
    kernel = torch.ones(3, 3, dtype=torch.float64)
    kernel[1, 1] = -8.0
    return kernel


def _log(size: int, sigma: float | None) -> Tensor:
    s = _default_sigma(size) if sigma is None else sigma
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    r2 = x[:, None] ** 2 + x[None, :] ** 2
    # Left without mean removal on purpose: then it is exactly g''(y) g(x) + g(y) g''(x), rank 2.
    return -(1 - r2 / (2 * s**2)) * torch.exp(-r2 / (2 * s**2)) / (math.pi * s**4)


def _sharpen(size: int, sigma: float | None) -> Tensor:
    return torch.tensor(
        [[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]], dtype=torch.float64
    )


_Builder = Callable[[int, "float | None"], Tensor]

# name -> (builder, default size, allowed sizes as a predicate, description of the allowed sizes,
# whether the builder takes sigma).
_BANK: dict[str, tuple[_Builder, int, Callable[[int], bool], str, bool]] = {
    "sobel_x": (_sobel, 3, lambda n: n >= 3 and n % 2 == 1, "an odd size >= 3", False),
    "sobel_y": (_sobel, 3, lambda n: n >= 3 and n % 2 == 1, "an odd size >= 3", False),
    "scharr_x": (_scharr, 3, lambda n: n == 3, "size 3", False),
    "scharr_y": (_scharr, 3, lambda n: n == 3, "size 3", False),
    "prewitt_x": (_prewitt, 3, lambda n: n >= 3 and n % 2 == 1, "an odd size >= 3", False),
    "prewitt_y": (_prewitt, 3, lambda n: n >= 3 and n % 2 == 1, "an odd size >= 3", False),
    "box": (_box, 3, lambda n: n >= 1, "a size >= 1", False),
    "gaussian": (_gaussian, 3, lambda n: n >= 1, "a size >= 1", True),
    "binomial": (_binomial_2d, 3, lambda n: n >= 1, "a size >= 1", False),
    "laplacian": (_laplacian, 3, lambda n: n == 3, "size 3", False),
    "laplacian8": (_laplacian8, 3, lambda n: n == 3, "size 3", False),
    "log": (_log, 5, lambda n: n >= 3 and n % 2 == 1, "an odd size >= 3", True),
    "sharpen": (_sharpen, 3, lambda n: n == 3, "size 3", False),
}
_ALIASES = {"sobel": "sobel_x", "scharr": "scharr_x", "prewitt": "prewitt_x", "mean": "box"}


def kernel_names() -> tuple[str, ...]:
    """The names :func:`named_kernel` accepts (aliases such as ``"sobel"`` for ``"sobel_x"`` too).

    Example:
        >>> kernel_names()[:4]
        ('binomial', 'box', 'gaussian', 'laplacian')
    """
    return tuple(sorted([*_BANK, *_ALIASES]))


def named_kernel(name: str, size: int | None = None, sigma: float | None = None) -> Tensor:
    """A classic 2-D filter kernel by name.

    Args:
        name: one of :func:`kernel_names` (case-insensitive): ``sobel_x``/``sobel_y`` (odd
            sizes), ``scharr_x``/``scharr_y`` (3), ``prewitt_x``/``prewitt_y`` (odd sizes),
            ``box``, ``gaussian``, ``binomial`` (any size), ``laplacian``, ``laplacian8``,
            ``sharpen`` (3) and ``log``, the Laplacian of Gaussian (odd sizes).
        size: kernel height and width; ``None`` for the kernel's usual size (5 for ``log``, else 3).
        sigma: standard deviation of ``gaussian`` and ``log`` in pixels; ``None`` for OpenCV's
            default ``0.3 * ((size - 1) / 2 - 1) + 0.8``.

    Returns:
        ``Tensor[size, size]`` in float64. Smoothing kernels (box, Gaussian, binomial) sum to 1;
        derivative kernels keep their integer taps.

    Example:
        >>> named_kernel("sobel_x")
        tensor([[-1.,  0.,  1.],
                [-2.,  0.,  2.],
                [-1.,  0.,  1.]], dtype=torch.float64)
        >>> named_kernel("binomial", 5).sum().item()
        1.0
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _BANK:
        raise ValueError(f"name must be one of {', '.join(kernel_names())}; got {name!r}")
    builder, default, allowed, allowed_text, takes_sigma = _BANK[key]
    n = default if size is None else size
    if isinstance(n, bool) or not isinstance(n, int) or not allowed(n):
        raise ValueError(f"size of the {key} kernel must be {allowed_text}, got {size!r}")
    if sigma is not None:
        if not takes_sigma:
            raise ValueError(f"sigma applies to the gaussian and log kernels only, not to {key}")
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    kernel = builder(n, sigma)
    return kernel.T.contiguous() if key.endswith("_y") else kernel


def _number(token: str, row: int, column: int) -> float:
    try:
        value = float(Fraction(token)) if "/" in token else float(token)
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"kernel: could not read {token!r} (row {row}, value {column}) as a number"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"kernel: value {token!r} (row {row}, value {column}) is not finite")
    return value


_ROW = re.compile(r"\[([^\[\]]*)\]")


def _rows_from_brackets(text: str) -> list[list[str]]:
    rows = [match.replace(",", " ").split() for match in _ROW.findall(text)]
    balanced = text.count("[") == text.count("]")
    if not rows or not balanced or _ROW.sub("", text).strip("[], \t\n"):
        raise ValueError(f"kernel: expected a list of rows such as [[1, 2], [3, 4]], got {text!r}")
    return rows


def parse_kernel(text: str) -> Tensor:
    """Read a 2-D kernel typed as text.

    Rows are separated by ``;`` or new lines, values by commas or spaces; a value may be a
    fraction such as ``1/16``. A JSON-style nested list (``[[1, 2, 1], [2, 4, 2], [1, 2, 1]]``)
    works too.

    Args:
        text: the kernel, e.g. ``"1 2 1; 2 4 2; 1 2 1"``.

    Returns:
        ``Tensor[rows, columns]`` in float64.

    Example:
        >>> parse_kernel("1,2,1; 2,4,2; 1,2,1")
        tensor([[1., 2., 1.],
                [2., 4., 2.],
                [1., 2., 1.]], dtype=torch.float64)
        >>> parse_kernel("[[1/4, 1/4], [1/4, 1/4]]").sum().item()
        1.0
    """
    if not isinstance(text, str):
        raise TypeError(f"kernel text must be a str, got {type(text).__name__}")
    stripped = text.strip()
    if stripped.startswith("["):
        rows = _rows_from_brackets(stripped)
    else:
        rows = [line.replace(",", " ").split() for line in stripped.replace(";", "\n").splitlines()]
        rows = [row for row in rows if row]
    if not rows or not any(rows):
        raise ValueError(f"kernel must have at least one value, got {text!r}")
    width = len(rows[0])
    for index, row in enumerate(rows, start=1):
        if len(row) != width:
            raise ValueError(
                f"kernel rows must all have the same length: row 1 has {width} values, "
                f"row {index} has {len(row)}"
            )
    values = [
        [_number(tok, r, c) for c, tok in enumerate(row, start=1)]
        for r, row in enumerate(rows, start=1)
    ]
    return torch.tensor(values, dtype=torch.float64)
