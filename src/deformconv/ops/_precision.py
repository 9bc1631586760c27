"""Reduced precision for every operator family: which kernels need float32 copies, and autocast.

float16 and bfloat16 tensors reach a kernel module as they are when the module sets
``NATIVE_LOW_PRECISION = True`` (it loads and stores them itself, accumulating in float32);
otherwise the operator copies them to float32 and casts the results back.

Under ``torch.autocast`` an operator behaves as ``F.conv2d`` does: its floating-point tensors on
the autocast device (float64 excepted) are cast to the autocast dtype in force, and the kernels
return that dtype. ``torch.library.register_autocast`` would fix one dtype per device at
registration; the rule registered here reads the dtype of the autocast region it runs in.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_library = torch.library.Library("deformconv", "IMPL")


def needs_float32(kernels: ModuleType, dtype: torch.dtype) -> bool:
    """Whether ``kernels`` needs tensors of ``dtype`` copied to float32 first."""
    return dtype in LOW_PRECISION and not getattr(kernels, "NATIVE_LOW_PRECISION", False)


def _eligible(t: Tensor, device_type: str) -> bool:
    return t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64


def autocast_will_cast(*tensors: Tensor) -> bool:
    """Whether autocast, on for these tensors' device, will cast them all to one dtype (so a
    dtype mismatch between them is not the caller's error)."""
    device_type = tensors[0].device.type
    return (
        device_type in _AUTOCAST_KEYS
        and torch.is_autocast_enabled(device_type)
        and all(_eligible(t, device_type) for t in tensors)
    )


def register_autocast(name: str) -> None:
    """Give the custom operator ``deformconv::<name>`` its autocast rule on CPU and CUDA."""
    op = getattr(torch.ops.deformconv, name).default
    for device_type, key in _AUTOCAST_KEYS.items():

        def kernel(*args, device_type=device_type):
            dtype = torch.get_autocast_dtype(device_type)
            cast = [
                a.to(dtype) if isinstance(a, Tensor) and _eligible(a, device_type) else a
                for a in args
            ]
            with torch.autocast(device_type, enabled=False):
                return op(*cast)

        _library.impl(name, kernel, key)
