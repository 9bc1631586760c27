"""The CUDA kernel choice when Triton fails: simulated compile, resource and launch failures.

The dispatcher (deformconv.ops._dispatch) is asked for the "cuda" kernels of the real
``deform_conv2d`` family, with CPU tensors: the Triton kernels then run under the interpreter, and
the failures a GPU can produce are injected where Triton raises them, at the launch. Expected
behaviour (issue 11, point 6): a failure is reported once with a KernelFallbackWarning naming
the cause and DEFORMCONV_CUDA_KERNEL, and the portable kernel takes over, never silently.
"""

from __future__ import annotations

import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from deformconv.ops import KernelFallbackWarning, _dispatch, _portable, _triton  # noqa: E402
from deformconv.ops._launch import KernelLaunchError  # noqa: E402


@pytest.fixture
def fresh(monkeypatch):
    """A fresh choice for every (family, device), the environment's default."""
    monkeypatch.setattr(_dispatch, "_choices", {})
    monkeypatch.delenv("DEFORMCONV_CUDA_KERNEL", raising=False)


def _tensors(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 5, generator=gen, dtype=dtype)
    offset = torch.randn(1, 18, 3, 3, generator=gen, dtype=dtype)
    weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=dtype)
    return x, offset, None, weight, None, (1, 1), (0, 0), (1, 1)


def _forward(kernels):
    return kernels.forward(*_tensors())


class _Failing:
    """A Triton kernel whose launch raises ``error`` (what Triton raises for that failure)."""

    __name__ = "im2col_kernel"

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getitem__(self, grid):
        def run(*args, **meta):
            raise self.error

        return run


TRITON_FAILURES = {
    "compile": CompilationError("def im2col_kernel(...)", None, "unsupported layout"),
    "shared-memory": OutOfResources(232_448, 101_376, "shared memory"),
    # Triton's launcher refuses a pointer with a ValueError; _launch makes it a launch error.
    "pointer": ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)"),
    "cuda-launch": RuntimeError("Triton Error [CUDA]: invalid argument"),
}


def test_triton_failures_are_kernel_faults_and_never_argument_errors() -> None:
    faults = _triton.KERNEL_FAULTS
    for cls in (CompilationError, OutOfResources, KernelLaunchError):
        assert issubclass(cls, faults), cls
    # _dispatch re-raises ValueError/TypeError (and out-of-memory) as the caller's fault.
    for cls in faults:
        assert not issubclass(cls, (ValueError, TypeError, torch.OutOfMemoryError)), cls


@pytest.mark.parametrize("failure", list(TRITON_FAILURES), ids=list(TRITON_FAILURES))
def test_a_triton_failure_on_first_use_falls_back_with_one_warning(
    fresh, monkeypatch, failure
) -> None:
    monkeypatch.setattr(_triton, "im2col_kernel", _Failing(TRITON_FAILURES[failure]))
    with pytest.warns(KernelFallbackWarning) as record:
        first = _dispatch.run("deform_conv2d", "cuda", _forward)
        second = _dispatch.run("deform_conv2d", "cuda", _forward)
    assert len(record) == 1
    message = str(record[0].message)
    assert "triton kernel for deform_conv2d on cuda failed" in message
    assert "DEFORMCONV_CUDA_KERNEL=portable" in message
    expected_cause = (
        "KernelLaunchError" if failure == "pointer" else type(TRITON_FAILURES[failure]).__name__
    )
    assert expected_cause in message
    assert _dispatch.active_kernel("cuda") == "portable"
    reference = _portable.forward(*_tensors())
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(second, reference, rtol=0, atol=0)


@pytest.mark.parametrize("failure", ["compile", "shared-memory"])
def test_a_compile_failure_after_successful_calls_still_falls_back(
    fresh, monkeypatch, failure
) -> None:
    # A new dtype or shape compiles a new specialisation, which may fail after earlier calls
    # (bfloat16 atomics on an old GPU, say): Triton's errors fall back whenever they happen.
    assert _dispatch.run("deform_conv2d", "cuda", _forward) is not None
    assert _dispatch.active_kernel("cuda") == "triton"
    monkeypatch.setattr(_triton, "im2col_kernel", _Failing(TRITON_FAILURES[failure]))
    with pytest.warns(KernelFallbackWarning, match=type(TRITON_FAILURES[failure]).__name__):
        out = _dispatch.run("deform_conv2d", "cuda", _forward)
    torch.testing.assert_close(out, _portable.forward(*_tensors()), rtol=0, atol=0)
    assert _dispatch.active_kernel("cuda") == "portable"


def test_other_errors_after_successful_calls_propagate(fresh, monkeypatch) -> None:
    assert _dispatch.run("deform_conv2d", "cuda", _forward) is not None
    monkeypatch.setattr(_triton, "im2col_kernel", _Failing(RuntimeError("CUDA error: a bug")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="a bug"):
            _dispatch.run("deform_conv2d", "cuda", _forward)
    assert _dispatch.active_kernel("cuda") == "triton"


def test_when_the_portable_kernel_fails_too_its_error_propagates_and_nothing_changes(
    fresh, monkeypatch
) -> None:
    # A sticky CUDA error (or a cuBLAS setting) breaks every kernel: not the fast kernel's fault.
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(_triton, "im2col_kernel", _Failing(sticky))

    def portable_forward(*args):
        raise sticky

    monkeypatch.setattr(_portable, "forward", portable_forward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="illegal memory access"):
            _dispatch.run("deform_conv2d", "cuda", _forward)
    assert _dispatch.active_kernel("cuda") == "triton"


def test_a_triton_module_that_fails_to_import_falls_back(fresh, monkeypatch) -> None:
    real_import = _dispatch.importlib.import_module

    def failing_import(name, *args):
        if name == "deformconv.ops._triton":
            raise RuntimeError("triton: 0 active drivers ([]). There should only be one.")
        return real_import(name, *args)

    monkeypatch.setattr(_dispatch.importlib, "import_module", failing_import)
    with pytest.warns(KernelFallbackWarning, match="DEFORMCONV_CUDA_KERNEL=portable") as record:
        assert _dispatch.active_kernel("cuda") == "portable"
    assert "RuntimeError: triton: 0 active drivers" in str(record[0].message)


@pytest.mark.parametrize("value", ["cudnn", "numba", "triton2"])
def test_unknown_cuda_kernel_values_are_refused(fresh, monkeypatch, value) -> None:
    monkeypatch.setenv("DEFORMCONV_CUDA_KERNEL", value)
    with pytest.raises(
        ValueError,
        match=f"DEFORMCONV_CUDA_KERNEL must be one of auto, triton, portable, got '{value}'",
    ):
        _dispatch.active_kernel("cuda")


@pytest.mark.parametrize(("value", "expected"), [("portable", "portable"), ("Triton", "triton")])
def test_cuda_kernel_values_pick_the_kernel(fresh, monkeypatch, value, expected) -> None:
    monkeypatch.setenv("DEFORMCONV_CUDA_KERNEL", value)
    assert _dispatch.active_kernel("cuda") == expected
