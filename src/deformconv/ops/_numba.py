"""The Numba runtime shared by every CPU kernel of deformconv: threads, launches, fast math.

Each rule is decided here once, so that every kernel module (deformable convolution, DCNv3)
follows it the same way:

- **Threads.** A kernel runs on ``torch.get_num_threads()`` threads (at most the
  ``NUMBA_NUM_THREADS`` that Numba started), so ``torch.set_num_threads`` governs deformconv's
  kernels like every other operator. Numba's thread count is a setting of the calling thread,
  so :func:`parallel_launch` sets it each time. Starting Numba's OpenMP threading layer sets
  the process's OpenMP thread count, which PyTorch shares, to ``NUMBA_NUM_THREADS``: after
  ``torch.set_num_threads(1)``, the first Numba kernel would make every later PyTorch operator
  run on all cores. Numba is therefore started here, once, and PyTorch's count put back.
- **Concurrent launches.** Numba's ``workqueue`` threading layer (what Numba uses when neither
  TBB nor OpenMP loads) is not thread-safe: two Python threads launching parallel kernels at
  the same time abort the process ("Numba workqueue threading layer is terminating:
  Concurrent access has been detected").
  :func:`parallel_launch` holds a process-wide lock under that layer, so launches from several
  threads take turns; under ``omp`` and ``tbb``, which are thread-safe, they run concurrently.
- **Fast math.** :data:`FASTMATH` lets LLVM reassociate sums (so it vectorises reductions) and
  contract multiply-adds; :data:`FASTMATH_ORDERED` only contracts, for loops whose additions
  should keep their bracketing (reassociation can chain independent sums into one dependent
  chain). Neither allows ``nnan``/``ninf``: kernels detect non-finite sampling positions by
  comparisons, which those flags would fold away.

Usage, from the Python side of a kernel (everything between the lock and the results)::

    with parallel_launch() as threads:
        buffers = ...  # sized by ``threads``, e.g. one tile per thread
        my_parallel_kernel(...)

Lessons for writing the kernels themselves (each measured on this project's kernels):

- Numba marks a parallel kernel's array arguments ``noalias`` (which LLVM needs to vectorise
  loops that store into one array while loading from another) only when its alias analysis
  finds no alias inside the ``prange`` loop: no views such as ``cols = buffers[t]`` (index
  ``buffers[t, r, c]`` instead) and no *bool* taken from a tuple, e.g. a helper returning
  ``(corner, inside)`` (return 0/1 as an integer). ``NUMBA_DEBUG_ARRAY_OPT=1`` prints "No
  aliases found so adding noalias flag" when it worked.
- A signed index that may be negative gets a wrap-around test per access, which turns
  contiguous loads into gathers: offset channel loops with ``np.uint64`` values (and keep both
  operands unsigned: Numba promotes ``uint64 + int64`` to float).
- ``x * 0`` with a float32 ``x`` is float64 in Numba (the literal is int64): pass a typed
  ``one`` into the kernel and derive ``zero = one - one``.
- Per-thread scratch: allocate ``threads`` slots (from :func:`parallel_launch`) and index them
  with ``numba.get_thread_id()``; sums that must be deterministic go to slots fixed by the
  task, not by the thread.

Note on Numba's cache (``cache=True``): a cached kernel is invalidated when *its own* source
file changes, not when an ``inline="always"`` helper it imports from another file changes.
Installing a new version replaces every file, so users are not affected; while editing a
helper, clear ``__pycache__/*.nb?`` or set ``NUMBA_CACHE_DIR`` to a fresh directory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numba
import torch

__all__ = ["FASTMATH", "FASTMATH_ORDERED", "parallel_launch", "thread_count", "threading_layer"]

#: Fast-math flags of kernels with reductions (a set, as Numba requires; do not modify it).
FASTMATH = {"contract", "reassoc"}
#: Fast-math flags of kernels whose sums must keep their order of evaluation.
FASTMATH_ORDERED = {"contract"}

# The layers that accept parallel launches from several threads at once (Numba's
# documentation, "The Threading Layers": tbb and omp are thread-safe, workqueue is not).
_THREAD_SAFE_LAYERS = frozenset({"tbb", "omp"})
_launch_lock = threading.RLock()
_start_lock = threading.Lock()
_started = False
_safe: bool | None = None


def _start() -> None:
    """Start Numba's threads (once), keeping PyTorch's thread count."""
    global _started
    if _started:
        return
    with _start_lock:
        if not _started:
            threads = torch.get_num_threads()
            numba.get_num_threads()  # launches Numba's threads
            torch.set_num_threads(threads)
            _started = True


def threading_layer() -> str:
    """The name of Numba's threading layer (``"tbb"``, ``"omp"`` or ``"workqueue"``), starting
    Numba's threads if they are not running yet.

    Example:
        >>> threading_layer() in ("tbb", "omp", "workqueue")
        True
    """
    _start()
    return numba.threading_layer()


def thread_count() -> int:
    """The number of threads a kernel launched now runs on: ``torch.get_num_threads()``, at
    most ``numba.config.NUMBA_NUM_THREADS``.

    Example:
        >>> 1 <= thread_count() <= numba.config.NUMBA_NUM_THREADS
        True
    """
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _launches_are_thread_safe() -> bool:
    global _safe
    if _safe is None:
        _safe = threading_layer() in _THREAD_SAFE_LAYERS
    return _safe


@contextlib.contextmanager
def parallel_launch() -> Iterator[int]:
    """Context for launching parallel Numba kernels from any Python thread; yields the number
    of threads they run on (see :func:`thread_count`).

    Sets Numba's thread count for the calling thread and, under a threading layer that is not
    thread-safe, holds a process-wide (re-entrant) lock, so that concurrent calls from several
    Python threads run one after the other instead of aborting the process.

    Example:
        >>> with parallel_launch() as threads:
        ...     numba.get_num_threads() == threads
        True
    """
    _start()
    threads = thread_count()
    guard = contextlib.nullcontext() if _launches_are_thread_safe() else _launch_lock
    with guard:
        numba.set_num_threads(threads)
        yield threads
