"""Run a Triton kernel module's host code "on CUDA" without a GPU and without running kernels.

Tensors are PyTorch fake tensors on ``cuda:N`` (``FakeTensorMode``: shapes, strides, dtypes and
devices, no memory), ``torch.cuda.device`` and ``torch.cuda.current_device`` are replaced by a
bookkeeping stand-in, and the Triton kernels by recorders. What a GPU would enforce and Triton's
interpreter does not (grid limits, the device a launch runs on) is then checked on the recorded
launches, for shapes far too large to run.

Usage (pytest)::

    def test_something(monkeypatch):
        with FakeCuda(monkeypatch, _triton, ["im2col_kernel", "col2im_kernel"]) as cuda:
            x = cuda.tensor(1024, 8, 8, 8, device="cuda:1")
            ...  # call the module's forward / backward
        for launch in cuda.launches: ...
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


@dataclass
class Launch:
    """One recorded launch: which kernel, its grid, arguments and constexprs, and the current
    CUDA device (``None`` outside any ``torch.cuda.device`` block) when it was launched."""

    kernel: str
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]
    current_device: int | None


class _Recorder:
    def __init__(self, name: str, owner: FakeCuda) -> None:
        self.__name__ = name
        self._owner = owner

    def __getitem__(self, grid):
        def run(*args, **meta):
            self._owner.launches.append(
                Launch(self.__name__, tuple(grid), args, meta, self._owner.guarded_device)
            )

        return run


@dataclass
class FakeCuda:
    """Context manager: fake CUDA tensors, device bookkeeping and recorded launches."""

    monkeypatch: Any
    module: ModuleType
    kernels: list[str]
    launches: list[Launch] = field(default_factory=list)
    entered: list[torch.device] = field(default_factory=list)
    _stack: list[int] = field(default_factory=list)
    _mode: FakeTensorMode | None = None

    @property
    def guarded_device(self) -> int | None:
        return self._stack[-1] if self._stack else None

    def __enter__(self) -> FakeCuda:
        owner = self

        @contextlib.contextmanager
        def device(dev):
            dev = torch.device(dev)
            owner.entered.append(dev)
            owner._stack.append(dev.index or 0)
            try:
                yield
            finally:
                owner._stack.pop()

        self.monkeypatch.setattr(torch.cuda, "device", device)
        # Outside any guard the current device is cuda:0, as in a fresh process.
        self.monkeypatch.setattr(torch.cuda, "current_device", lambda: self.guarded_device or 0)
        for name in self.kernels:
            self.monkeypatch.setattr(self.module, name, _Recorder(name, self))
        self._mode = FakeTensorMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)

    @staticmethod
    def tensor(*shape: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A fake tensor (shape, dtype and device; no data) of ``shape``."""
        return torch.empty(shape, device=device, dtype=dtype)
