"""Launching Triton kernels safely on CUDA: grid limits, index width, device and launch errors.

Every Triton kernel of deformconv (deformable convolution, DCNv3, DCNv4) launches through these
helpers, because Triton's CPU interpreter (``TRITON_INTERPRET=1``, how the tests run without a
GPU) enforces none of what a GPU does. Each rule is therefore decided here, on the host, from
shapes alone, where a test can check it for any shape without running a kernel:

- **Grid limits.** CUDA launches at most ``2**31 - 1`` programs on grid axis 0 and ``65,535`` on
  axes 1 and 2 (:data:`MAX_GRID`). Put the large product (images x groups x taps x pixel blocks)
  on axis 0 and keep axes 1 and 2 for small, bounded counts; :func:`split_rows` splits the rows
  (usually images) of one logical launch into launches whose axis 0 fits, and :func:`launch`
  refuses any grid beyond the limits with :class:`GridLimitError` instead of letting the driver
  fail with "invalid argument".
- **Index width.** Triton computes offsets in int32 unless told otherwise. :func:`needs_int64`
  says, from the extents of the tensors a launch touches, when some offset can pass
  ``2**31 - 1``; kernels then take an ``INDEX_64`` constexpr and widen their program ids (and
  the indices derived from them) to int64. The threshold :data:`INDEX_LIMIT` is a module
  attribute so tests can lower it and run the int64 path on small tensors.
- **Device.** Triton launches on the *current* CUDA device and its current stream. A kernel
  given tensors on ``cuda:1`` while ``cuda:0`` is current would run on the wrong device, so the
  host code of every kernel runs inside :func:`device_guard` (decorate its entry points with
  :func:`on_tensor_device`; this also covers its allocations), and :func:`launch` checks that
  every CUDA tensor argument is on the current device.
- **Launch errors.** A ``ValueError`` or ``TypeError`` raised by Triton's launcher is a fault of
  the kernel, not of the caller (arguments reaching a launch were validated before), so
  :func:`launch` re-raises it as :class:`KernelLaunchError`, which the kernel dispatcher treats
  as a reason to fall back to the portable kernel.

Example (a 1-D launch over images, split so that every launch fits):

    >>> rows = split_rows(5, programs_per_row=10, limit=25)
    >>> rows
    [(0, 2), (2, 4), (4, 5)]
    >>> [check_grid(((stop - start) * 10,)) for start, stop in rows]
    [(20,), (20,), (10,)]
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "INDEX_LIMIT",
    "INDEX_MARGIN",
    "INT32_MAX",
    "MAX_GRID",
    "MAX_GRID_X",
    "MAX_GRID_YZ",
    "GridLimitError",
    "KernelLaunchError",
    "cdiv",
    "check_grid",
    "device_guard",
    "extent",
    "grids",
    "launch",
    "needs_int64",
    "on_tensor_device",
    "split_rows",
]

_F = TypeVar("_F", bound=Callable[..., Any])

INT32_MAX = 2**31 - 1
#: CUDA's largest grid: axis 0 up to 2**31 - 1 programs, axes 1 and 2 up to 65,535 (compute
#: capability 3.0 and later; CUDA C Programming Guide, "Technical Specifications").
MAX_GRID_X = INT32_MAX
MAX_GRID_YZ = 65_535
MAX_GRID = (MAX_GRID_X, MAX_GRID_YZ, MAX_GRID_YZ)
#: Elements a block may address past a tensor's last element in its masked-off lanes (a block
#: of pixels past the end of a row, a bilinear corner one row or column outside the image).
INDEX_MARGIN = 2**16
#: The largest element extent that int32 indexing serves; tests lower it to force int64.
INDEX_LIMIT = INT32_MAX - INDEX_MARGIN


class GridLimitError(RuntimeError):
    """A launch grid beyond CUDA's limits (a bug in the host code that built it)."""


class KernelLaunchError(RuntimeError):
    """Triton refused to launch a kernel; the dispatcher falls back to the portable kernel."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints: the number of blocks of ``b`` covering ``a``.

    Example:
        >>> cdiv(3136, 64), cdiv(0, 64)
        (49, 0)
    """
    return -(-a // b)


def check_grid(grid: Sequence[int]) -> tuple[int, ...]:
    """``grid`` as a tuple, after checking it has 1 to 3 axes, each of 1 to :data:`MAX_GRID`
    programs.

    Example:
        >>> check_grid([100_000, 4])
        (100000, 4)
        >>> check_grid((8, 70_000))
        Traceback (most recent call last):
        ...
        deformconv.ops._launch.GridLimitError: grid axis 1 must be between 1 and 65535, got 70000 (grid (8, 70000))
    """
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise GridLimitError(f"grid must have 1 to 3 axes, got {grid}")
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if not 1 <= size <= limit:
            raise GridLimitError(
                f"grid axis {axis} must be between 1 and {limit}, got {size} (grid {grid})"
            )
    return grid


def split_rows(rows: int, programs_per_row: int, limit: int | None = None) -> list[tuple[int, int]]:
    """Ranges ``[start, stop)`` of ``rows`` (images, usually) such that a launch of
    ``(stop - start) * programs_per_row`` programs on one axis stays within ``limit`` (default
    :data:`MAX_GRID_X`, read at each call so that tests can lower it).

    Raises :class:`GridLimitError` when one row alone needs more than ``limit`` programs.

    Example:
        >>> split_rows(1024, programs_per_row=4 * 25 * 49)
        [(0, 1024)]
        >>> split_rows(3, programs_per_row=2**30)
        [(0, 1), (1, 2), (2, 3)]
        >>> split_rows(0, 7)
        []
    """
    limit = MAX_GRID_X if limit is None else limit
    if programs_per_row > limit:
        raise GridLimitError(
            f"one row needs {programs_per_row} programs, more than a launch may have ({limit})"
        )
    step = max(1, limit // max(programs_per_row, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def grids(rows: int, programs_per_row: int) -> list[tuple[int, int, tuple[int]]]:
    """``(start, stop, grid)`` of the one-axis launches covering ``rows`` rows (images, usually)
    of ``programs_per_row`` programs each: :func:`split_rows` with each range's grid.

    Example:
        >>> grids(5, programs_per_row=3)
        [(0, 5, (15,))]
    """
    return [
        (start, stop, ((stop - start) * programs_per_row,))
        for start, stop in split_rows(rows, programs_per_row)
    ]


def extent(t: Tensor) -> int:
    """Elements between a tensor's first element and one past its last, in memory: the largest
    offset (plus one) an index into ``t`` computes from ``t.data_ptr()``; 0 when empty.

    Example:
        >>> extent(torch.empty(2, 3, 4)), extent(torch.empty(2, 3, 4).transpose(0, 2))
        (24, 24)
        >>> extent(torch.empty(8, 8)[:, :2])
        58
    """
    if t.numel() == 0:
        return 0
    return 1 + sum(
        (size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)
    )


def needs_int64(*extents: Tensor | int) -> bool:
    """Whether a launch touching tensors of these extents (tensors, or element counts for
    buffers described by shape alone) needs int64 offsets: whether any extent, plus the
    :data:`INDEX_MARGIN` of masked lanes, passes int32.

    Example:
        >>> needs_int64(torch.empty(2, 64, 56, 56), 2 * 576 * 3136)
        False
        >>> needs_int64(2**31)
        True
    """
    largest = max((e if isinstance(e, int) else extent(e) for e in extents), default=0)
    return largest > INDEX_LIMIT


def device_guard(t: Tensor) -> AbstractContextManager[Any]:
    """``torch.cuda.device(t.device)`` for a CUDA tensor (kernels launch on the current device),
    otherwise a context that does nothing.

    Example:
        >>> with device_guard(torch.zeros(1)):
        ...     pass
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_tensor_device(fn: _F) -> _F:
    """Decorator: run ``fn`` inside :func:`device_guard` of its first argument (a tensor), so
    that every allocation and launch in it happens on that tensor's device.

    Example:
        >>> @on_tensor_device
        ... def double(x):
        ...     return x * 2
        >>> double(torch.ones(2))
        tensor([2., 2.])
    """

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with device_guard(args[0]):
            return fn(*args, **kwargs)

    return guarded  # type: ignore[return-value]


def _check_devices(args: Sequence[Any]) -> None:
    cuda = [a.device for a in args if isinstance(a, Tensor) and a.device.type == "cuda"]
    if not cuda:
        return
    current = torch.cuda.current_device()
    for device in cuda:
        if device.index != current:
            raise KernelLaunchError(
                f"a tensor on {device} reached a launch on cuda:{current}; the host code must run "
                "inside device_guard(input)"
            )


def launch(kernel: Any, grid: Sequence[int], *args: Any, **meta: Any) -> None:
    """Launch Triton ``kernel`` on ``grid`` with ``args`` and constexprs ``meta``, after checking
    the grid against CUDA's limits and the tensors' devices against the current device.

    A ``ValueError`` or ``TypeError`` from Triton becomes :class:`KernelLaunchError` (see the
    module docstring); other errors (compilation, resources, CUDA) propagate unchanged.
    """
    grid = check_grid(grid)
    _check_devices(args)
    try:
        kernel[grid](*args, **meta)
    except (ValueError, TypeError) as exc:
        name = getattr(kernel, "__name__", None) or getattr(
            getattr(kernel, "fn", None), "__name__", "kernel"
        )
        raise KernelLaunchError(
            f"Triton could not launch {name}: {type(exc).__name__}: {exc}"
        ) from exc
