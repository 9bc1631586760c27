"""The memory budget that bounds the sampled-column workspace of every kernel.

Deformable convolution materialises, per image, a ``(in_channels * kh * kw, out_h * out_w)``
matrix of bilinearly sampled values ("columns"). Kernels never build it for the whole batch at
once: they walk the batch in chunks whose columns fit the budget, so memory stays bounded for any
batch size.

The budget has two levels: :func:`set_workspace_budget` sets the process-wide default (seen by
every thread), and :func:`workspace_budget` overrides it in a ``contextvars.ContextVar``, so the
override holds for the current thread or asyncio task only: two threads (or tasks) may nest
their own budgets without seeing each other's.

A context budget is read where the kernel runs. Backward passes of CPU tensors run in the thread
that calls ``backward()``; autograd runs those of other devices in a thread of its own, which
sees the process-wide default only.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from deformconv._validation import check_int

_ENV = "DEFORMCONV_WORKSPACE_MB"
_DEFAULT_MB = 256

# Process-wide default (set_workspace_budget) and per-context override (workspace_budget).
_process_bytes: int | None = None
_context_bytes: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "deformconv_workspace_budget", default=None
)


def _check(nbytes: int | None) -> None:
    if nbytes is not None:
        check_int(nbytes, "nbytes")


def get_workspace_budget() -> int:
    """The workspace budget in bytes that applies here.

    In order: the innermost :func:`workspace_budget` of this thread or task, the process
    default of :func:`set_workspace_budget`, ``$DEFORMCONV_WORKSPACE_MB``, 256 MiB.

    Example:
        >>> with workspace_budget(2**20):
        ...     get_workspace_budget()
        1048576
    """
    for nbytes in (_context_bytes.get(), _process_bytes):
        if nbytes is not None:
            return nbytes
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
    """Set the process-wide workspace budget in bytes; ``None`` restores the default.

    Every thread sees it, except where a :func:`workspace_budget` context overrides it.

    Example:
        >>> set_workspace_budget(64 * 2**20)
        >>> get_workspace_budget()
        67108864
        >>> set_workspace_budget(None)
    """
    global _process_bytes
    _check(nbytes)
    _process_bytes = nbytes


@contextlib.contextmanager
def workspace_budget(nbytes: int | None) -> Iterator[None]:
    """Use a workspace budget of ``nbytes`` bytes in this thread or asyncio task, inside the
    ``with`` block; contexts nest, and other threads and tasks keep their own budget. ``None``
    lifts the enclosing contexts' budgets, back to the process default.

    Example:
        >>> with workspace_budget(2**20):
        ...     with workspace_budget(2**10):
        ...         get_workspace_budget()
        ...     get_workspace_budget()
        1024
        1048576
    """
    _check(nbytes)
    token = _context_bytes.set(nbytes)
    try:
        yield
    finally:
        _context_bytes.reset(token)


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
