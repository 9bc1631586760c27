"""Scratch buffers that the CPU kernels reuse from call to call, and how to release them.

A fresh buffer of a few MiB costs a page fault per 4 KiB (on the project's machine, a new 58 MB
tensor took 20-40 ms against 6 ms to write into one already touched), so the kernels keep their
scratch buffers between calls. They are kept per calling Python thread, so two threads running
kernels at the same time never share one, and only while what a thread keeps stays within the
workspace budget (:func:`deformconv.ops.get_workspace_budget`); a request beyond it gets fresh
memory that is freed when the call ends. A thread's buffers go when the thread ends.

:func:`release_cpu_buffers` drops the buffers of every thread, for when the memory is wanted
elsewhere (after inference, between phases of a job). A call that is running keeps the buffers
it holds until it returns.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from deformconv.ops._workspace import get_workspace_budget

__all__ = ["BufferPool", "cpu_buffers", "release_cpu_buffers"]


class _Owner:
    """Held in a thread-local slot: when its thread ends, it is collected and the thread's
    buffers with it."""


class _Kept:
    """One thread's kept buffers and their total size in bytes (kept up to date, so that a
    request does not add the sizes up again)."""

    __slots__ = ("buffers", "nbytes")

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self.nbytes = 0


class BufferPool:
    """Named buffers, per calling thread, within the workspace budget.

    Example:
        >>> pool = BufferPool()
        >>> a = pool.get("cols", 10, torch.float32)
        >>> b = pool.get("cols", 8, torch.float32)  # the same memory, reused
        >>> a.data_ptr() == b.data_ptr(), pool.kept_bytes()
        (True, 40)
        >>> pool.release()
        40
    """

    def __init__(self) -> None:
        # The lock guards every _Kept (release() empties those of other threads) and _threads.
        self._lock = threading.Lock()
        self._local = threading.local()
        self._threads: dict[int, _Kept] = {}

    def _mine(self) -> _Kept:
        kept = getattr(self._local, "kept", None)
        if kept is None:
            owner = self._local.owner = _Owner()
            kept = self._local.kept = _Kept()
            key = id(owner)
            weakref.finalize(owner, self._forget, key)
            with self._lock:
                self._threads[key] = kept
        return kept

    def _forget(self, key: int) -> None:
        with self._lock:
            self._threads.pop(key, None)

    def get(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        """A 1-D tensor of ``numel`` elements of ``dtype`` (contents undefined), reused across
        calls of this thread under ``name`` when the thread's kept buffers fit the budget."""
        kept = self._mine()
        key = (name, dtype)
        with self._lock:
            buf = kept.buffers.pop(key, None)
            if buf is not None:
                kept.nbytes -= buf.nbytes
            others = kept.nbytes
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
        if others + buf.nbytes <= get_workspace_budget():
            with self._lock:
                kept.buffers[key] = buf
                kept.nbytes += buf.nbytes
        return buf[:numel]

    def kept_bytes(self) -> int:
        """Bytes this thread keeps between calls."""
        kept = self._mine()
        with self._lock:
            return kept.nbytes

    def release(self) -> int:
        """Drop the kept buffers of every thread; returns how many bytes were kept."""
        with self._lock:
            released = sum(kept.nbytes for kept in self._threads.values())
            for kept in self._threads.values():
                kept.buffers.clear()
                kept.nbytes = 0
        return released


#: The pool of every CPU kernel of deformconv (name buffers by kernel, e.g. ``"dcnv3.grad"``).
cpu_buffers = BufferPool()


def release_cpu_buffers() -> int:
    """Free the scratch buffers that the CPU kernels keep between calls, in every thread.

    Returns the number of bytes that were kept. The next call of a kernel allocates afresh
    (and pays the page faults once more).

    Example:
        >>> import torch
        >>> from deformconv import deform_conv2d
        >>> x, w = torch.rand(1, 2, 5, 5), torch.rand(3, 2, 3, 3)
        >>> _ = deform_conv2d(x, torch.zeros(1, 18, 3, 3), w)
        >>> release_cpu_buffers() >= 0
        True
        >>> release_cpu_buffers()
        0
    """
    return cpu_buffers.release()
