"""Which kernel runs each operator family on each device type.

An operator family (``"deform_conv2d"``, ``"dcnv3"``, ...) registers a portable kernel module,
which runs anywhere PyTorch does, and at most one fast kernel module per device type (Numba on
``"cpu"``, Triton on ``"cuda"``). The choice is made once per (family, device type) and cached:

- ``DEFORMCONV_<DEVICE>_KERNEL`` (for example ``DEFORMCONV_CPU_KERNEL=portable``) is read then;
  ``auto`` (or unset) picks the fast kernel, a kernel name picks that one, and any other value is
  a ``ValueError`` that lists the valid ones;
- a fast kernel module that fails to import, for any reason (a missing package, Numba's cache
  locator on a read-only install...), is reported once with a :class:`KernelFallbackWarning`
  naming the cause and the variable, and the portable kernel takes over;
- a fast kernel that fails on its first call (a Triton compile or launch error, say) is reported
  in the same way and replaced by the portable kernel for the rest of the process, provided the
  portable kernel then succeeds on that call; when it fails too, the fault is not the fast
  kernel's (a sticky CUDA error, a cuBLAS setting), its error propagates and nothing changes.
  After one successful call the fast kernel's errors propagate like any other, except those its
  module lists in ``KERNEL_FAULTS`` (Triton's compile errors, for instance, which a new dtype or
  shape can raise at any call): those fall back as on the first call.

:func:`use_kernel` overrides the choice for a device type (benchmarks, tests, debugging).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import torch

__all__ = ["KernelFallbackWarning", "active_kernel", "kernel_names", "use_kernel"]

PORTABLE = "portable"
AUTO = "auto"
_T = TypeVar("_T")

# Errors that say something about the call rather than about the kernel: they never trigger
# the fallback, so a bad argument or an exhausted device is not retried on a slower kernel.
_NOT_KERNEL_FAULTS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    torch.OutOfMemoryError,
    KeyboardInterrupt,
)


class KernelFallbackWarning(RuntimeWarning):
    """A fast kernel could not be used, and the portable kernel runs instead."""


@dataclass(frozen=True)
class _Family:
    portable: str
    fast: dict[str, tuple[str, str]]  # device type -> (kernel name, module path)


@dataclass
class _Choice:
    name: str
    module: ModuleType
    verified: bool  # one call has succeeded (the portable kernel needs no proof)


_families: dict[str, _Family] = {}
_choices: dict[tuple[str, str], _Choice] = {}
_overrides: dict[str, str] = {}
_lock = threading.RLock()


def register(family: str, portable: str, fast: dict[str, tuple[str, str]]) -> None:
    """Declare ``family``'s kernels: the portable module and ``{device: (name, module)}``.

    Modules are imported on first use, not here.
    """
    with _lock:
        _families[family] = _Family(portable, dict(fast))
        for key in [k for k in _choices if k[0] == family]:
            del _choices[key]


def kernel_names(device_type: str) -> tuple[str, ...]:
    """The values ``DEFORMCONV_<DEVICE>_KERNEL`` and :func:`use_kernel` accept for a device.

    Example:
        >>> kernel_names("cpu")
        ('auto', 'numba', 'portable')
        >>> kernel_names("mps")
        ('auto', 'portable')
    """
    fast = sorted({f.fast[device_type][0] for f in _families.values() if device_type in f.fast})
    return (AUTO, *fast, PORTABLE)


def _env_var(device_type: str) -> str:
    return f"DEFORMCONV_{device_type.upper()}_KERNEL"


def _requested(device_type: str) -> str:
    name = _overrides.get(device_type)
    if name is None:
        name = os.environ.get(_env_var(device_type), "").strip().lower() or AUTO
        if name not in kernel_names(device_type):
            raise ValueError(
                f"{_env_var(device_type)} must be one of {', '.join(kernel_names(device_type))}, "
                f"got {os.environ[_env_var(device_type)]!r}"
            )
    return name


def _fallback_warning(family: str, device_type: str, name: str, cause: BaseException) -> None:
    warnings.warn(
        f"deformconv: the {name} kernel for {family} on {device_type} failed "
        f"({type(cause).__name__}: {cause}); the portable PyTorch kernel runs instead (slower). "
        f"Set {_env_var(device_type)}={PORTABLE} to choose it explicitly, or fix the cause to get "
        f"the {name} kernel back.",
        KernelFallbackWarning,
        stacklevel=3,
    )


def _choose(family: str, device_type: str) -> _Choice:
    key = (family, device_type)
    with _lock:
        choice = _choices.get(key)
        if choice is not None:
            return choice
        spec = _families[family]
        requested = _requested(device_type)
        fast = spec.fast.get(device_type)
        choice = None
        if fast is not None and requested in (AUTO, fast[0]):
            try:
                choice = _Choice(fast[0], importlib.import_module(fast[1]), verified=False)
            except Exception as exc:  # any failure to load means: use the portable kernel
                _fallback_warning(family, device_type, fast[0], exc)
        if choice is None:
            choice = _Choice(PORTABLE, importlib.import_module(spec.portable), verified=True)
        _choices[key] = choice
        return choice


def kernel_module(family: str, device_type: str) -> ModuleType:
    """The module whose kernels run ``family`` on ``device_type`` now."""
    return _choose(family, device_type).module


def active_kernel(device_type: str = "cpu", family: str = "deform_conv2d") -> str:
    """The name of the kernel that runs ``family`` on ``device_type``: ``"numba"``,
    ``"triton"`` or ``"portable"``.

    Example:
        >>> active_kernel("meta")
        'portable'
        >>> with use_kernel("portable", "cpu"):
        ...     active_kernel("cpu")
        'portable'
    """
    if family not in _families:
        raise ValueError(f"family must be one of {', '.join(sorted(_families))}, got {family!r}")
    return _choose(family, device_type).name


def run(family: str, device_type: str, call: Callable[[ModuleType], _T]) -> _T:
    """``call(module)`` with ``family``'s kernel module for ``device_type``; a fast kernel that
    fails on its first call, or with one of its ``KERNEL_FAULTS`` at any call, is replaced by the
    portable one (with a warning) and ``call`` rerun.
    """
    choice = _choose(family, device_type)
    try:
        result = call(choice.module)
    except _NOT_KERNEL_FAULTS:
        raise
    except Exception as exc:
        faults = getattr(choice.module, "KERNEL_FAULTS", ())
        if choice.name == PORTABLE or (choice.verified and not isinstance(exc, faults)):
            raise
        return _fall_back(family, device_type, choice, call, exc)
    choice.verified = True
    return result


def _fall_back(
    family: str,
    device_type: str,
    choice: _Choice,
    call: Callable[[ModuleType], _T],
    cause: Exception,
) -> _T:
    """Rerun ``call`` on the portable kernel and, when that succeeds, make it the choice."""
    portable = importlib.import_module(_families[family].portable)
    # Raised here (chained to ``cause``), the portable kernel's error leaves the choice as it is.
    result = call(portable)
    with _lock:
        if _choices.get((family, device_type)) is choice:
            _fallback_warning(family, device_type, choice.name, cause)
            _choices[(family, device_type)] = _Choice(PORTABLE, portable, verified=True)
    return result


def set_kernel(name: str | None, device_type: str = "cpu") -> None:
    """Force kernel ``name`` (see :func:`kernel_names`) on ``device_type`` for every family, or
    with ``None`` return to the environment's choice. Applies to the whole process."""
    if name is not None:
        if not isinstance(name, str) or name.lower() not in kernel_names(device_type):
            raise ValueError(
                f"name must be one of {', '.join(kernel_names(device_type))} for device "
                f"{device_type!r}, got {name!r}"
            )
        name = name.lower()
    with _lock:
        if name is None:
            _overrides.pop(device_type, None)
        else:
            _overrides[device_type] = name
        for key in [k for k in _choices if k[1] == device_type]:
            del _choices[key]


@contextlib.contextmanager
def use_kernel(name: str, device_type: str = "cpu") -> Iterator[None]:
    """Run every operator family on ``device_type`` with kernel ``name`` inside the block.

    The choice is process-wide (autograd may run the backward pass on another thread), so do
    not nest it across threads.

    Example:
        >>> import torch
        >>> from deformconv import deform_conv2d
        >>> x, w = torch.rand(1, 2, 5, 5), torch.rand(3, 2, 3, 3)
        >>> with use_kernel("portable"):
        ...     deform_conv2d(x, torch.zeros(1, 18, 3, 3), w).shape
        torch.Size([1, 3, 3, 3])
    """
    with _lock:
        previous = _overrides.get(device_type)
    set_kernel(name, device_type)
    try:
        yield
    finally:
        set_kernel(previous, device_type)
