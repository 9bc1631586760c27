"""The memory budget that bounds the sampled-column workspace of every kernel.

Deformable convolution materialises, per image, a ``(in_channels * kh * kw, out_h * out_w)``
matrix of bilinearly sampled values ("columns"). Kernels never build it for the whole batch at
once: they walk the batch in chunks whose columns fit the budget, so memory stays bounded for any
batch size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_ENV = "DEFORMCONV_WORKSPACE_MB"
_DEFAULT_MB = 256

_budget_bytes: int | None = None


def get_workspace_budget() -> int:
    """The workspace budget in bytes (default 256 MiB, or ``$DEFORMCONV_WORKSPACE_MB``)."""
    if _budget_bytes is not None:
        return _budget_bytes
    env = os.environ.get(_ENV)
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"{_ENV} must be a number of MiB, got {env!r}") from None
        if mb <= 0:
            raise ValueError(f"{_ENV} must be positive, got {env!r}")
        return int(mb * 2**20)
    return _DEFAULT_MB * 2**20


def set_workspace_budget(nbytes: int | None) -> None:
    """Set the workspace budget in bytes; ``None`` restores the default.

    Example:
        >>> set_workspace_budget(64 * 2**20)
        >>> get_workspace_budget()
        67108864
        >>> set_workspace_budget(None)
    """
    global _budget_bytes
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes <= 0):
        raise ValueError(f"nbytes must be a positive int or None, got {nbytes!r}")
    _budget_bytes = nbytes


@contextlib.contextmanager
def workspace_budget(nbytes: int) -> Iterator[None]:
    """Temporarily set the workspace budget in bytes.

    Example:
        >>> with workspace_budget(2**20):
        ...     get_workspace_budget()
        1048576
    """
    global _budget_bytes
    previous = _budget_bytes
    set_workspace_budget(nbytes)
    try:
        yield
    finally:
        _budget_bytes = previous


def batch_chunks(batch: int, bytes_per_image: int) -> list[tuple[int, int]]:
    """Image ranges ``[start, stop)`` covering ``batch`` images, each as many as fit the budget
    at ``bytes_per_image`` (but at least one).

    Example:
        >>> with workspace_budget(10):
        ...     batch_chunks(5, 4)
        [(0, 2), (2, 4), (4, 5)]
    """
    per = max(int(bytes_per_image), 1)
    step = max(1, min(batch, get_workspace_budget() // per))
    return [(start, min(start + step, batch)) for start in range(0, batch, step)]
