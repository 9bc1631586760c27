"""Kernel selection: resolved once per (family, device), environment values checked, and a fast
kernel that cannot load or fails on its first call replaced by the portable one with one warning.

The families registered here are private to the tests and point at throwaway modules, so the
real operators' choices are untouched.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from deformconv.ops import KernelFallbackWarning, _dispatch, active_kernel, kernel_names, use_kernel


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def family(monkeypatch):
    """A family "testfam" with a portable module and a fast CPU module named "numba"."""
    calls = {"fast": 0, "portable": 0}

    def fast(x):
        calls["fast"] += 1
        return x + 1

    def portable(x):
        calls["portable"] += 1
        return x + 1

    monkeypatch.setitem(sys.modules, "_dc_test_fast", _module("_dc_test_fast", run=fast))
    monkeypatch.setitem(
        sys.modules, "_dc_test_portable", _module("_dc_test_portable", run=portable)
    )
    monkeypatch.delenv("DEFORMCONV_CPU_KERNEL", raising=False)
    _dispatch.register("testfam", "_dc_test_portable", {"cpu": ("numba", "_dc_test_fast")})
    yield calls
    _dispatch._families.pop("testfam")
    for key in [k for k in _dispatch._choices if k[0] == "testfam"]:
        del _dispatch._choices[key]


def test_the_fast_kernel_runs_and_is_resolved_once(family, monkeypatch) -> None:
    assert active_kernel("cpu", "testfam") == "numba"
    assert _dispatch.run("testfam", "cpu", lambda m: m.run(1)) == 2
    # The choice is cached: a later environment change does not move it.
    monkeypatch.setenv("DEFORMCONV_CPU_KERNEL", "portable")
    assert active_kernel("cpu", "testfam") == "numba"
    assert family == {"fast": 1, "portable": 0}


def test_environment_variable_picks_the_portable_kernel(family, monkeypatch) -> None:
    monkeypatch.setenv("DEFORMCONV_CPU_KERNEL", "Portable")
    assert active_kernel("cpu", "testfam") == "portable"
    assert _dispatch.run("testfam", "cpu", lambda m: m.run(1)) == 2
    assert family == {"fast": 0, "portable": 1}


def test_unknown_environment_value_is_an_error_listing_the_valid_ones(family, monkeypatch) -> None:
    monkeypatch.setenv("DEFORMCONV_CPU_KERNEL", "cuda-fast")
    with pytest.raises(ValueError, match=r"DEFORMCONV_CPU_KERNEL must be one of auto, numba, "):
        active_kernel("cpu", "testfam")


def test_a_module_that_fails_to_import_for_any_reason_falls_back_once(family, monkeypatch) -> None:
    # Not an ImportError: Numba's cache locator raises RuntimeError on a read-only install.
    def failing_import(name, *args):
        if name == "_dc_test_fast":
            raise RuntimeError("cannot cache function: no locator available")
        return real_import(name, *args)

    real_import = _dispatch.importlib.import_module
    monkeypatch.setattr(_dispatch.importlib, "import_module", failing_import)
    with pytest.warns(KernelFallbackWarning) as record:
        assert active_kernel("cpu", "testfam") == "portable"
        assert _dispatch.run("testfam", "cpu", lambda m: m.run(1)) == 2
        assert active_kernel("cpu", "testfam") == "portable"
    assert len(record) == 1
    message = str(record[0].message)
    assert "RuntimeError: cannot cache function" in message
    assert "DEFORMCONV_CPU_KERNEL=portable" in message
    assert family == {"fast": 0, "portable": 1}


def test_a_kernel_failing_on_first_call_falls_back_with_one_warning(family, monkeypatch) -> None:
    def broken(x):
        raise RuntimeError("Triton compilation failed: out of resources: shared memory")

    monkeypatch.setattr(sys.modules["_dc_test_fast"], "run", broken)
    with pytest.warns(KernelFallbackWarning, match="out of resources") as record:
        assert _dispatch.run("testfam", "cpu", lambda m: m.run(1)) == 2
        assert _dispatch.run("testfam", "cpu", lambda m: m.run(1)) == 2
    assert len(record) == 1
    assert active_kernel("cpu", "testfam") == "portable"
    assert family["portable"] == 2


def test_after_a_successful_call_errors_propagate(family, monkeypatch) -> None:
    assert _dispatch.run("testfam", "cpu", lambda m: m.run(1)) == 2

    def broken(x):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(sys.modules["_dc_test_fast"], "run", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="a real bug"):
            _dispatch.run("testfam", "cpu", lambda m: m.run(1))
    assert active_kernel("cpu", "testfam") == "numba"


@pytest.mark.parametrize("error", [ValueError("bad offset"), torch.OutOfMemoryError("oom")])
def test_argument_and_memory_errors_never_trigger_the_fallback(family, monkeypatch, error) -> None:
    def broken(x):
        raise error

    monkeypatch.setattr(sys.modules["_dc_test_fast"], "run", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error)):
            _dispatch.run("testfam", "cpu", lambda m: m.run(1))
    assert active_kernel("cpu", "testfam") == "numba"


def test_use_kernel_overrides_and_restores(family) -> None:
    with use_kernel("portable", "cpu"):
        assert active_kernel("cpu", "testfam") == "portable"
        assert active_kernel("cpu") == "portable"
    assert active_kernel("cpu", "testfam") == "numba"
    assert active_kernel("cpu") == "numba"


def test_use_kernel_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"name must be one of auto, portable for device 'mps'"):
        _dispatch.set_kernel("numba", "mps")
    assert kernel_names("cuda") == ("auto", "triton", "portable")


def test_active_kernel_refuses_unknown_families() -> None:
    with pytest.raises(ValueError, match="family must be one of"):
        active_kernel("cpu", "deform_conv3d")


def test_the_operator_falls_back_when_its_cpu_kernel_fails_on_first_call(monkeypatch) -> None:
    from deformconv import deform_conv2d
    from deformconv.ops import _cpu

    def broken(*args):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(_dispatch, "_choices", {})
    monkeypatch.delenv("DEFORMCONV_CPU_KERNEL", raising=False)
    monkeypatch.setattr(_cpu, "forward", broken)
    x, w = torch.rand(1, 2, 5, 5, dtype=torch.float64), torch.rand(3, 2, 3, 3, dtype=torch.float64)
    offset = torch.zeros(1, 18, 3, 3, dtype=torch.float64)
    with pytest.warns(KernelFallbackWarning, match="numba kernel for deform_conv2d on cpu"):
        out = deform_conv2d(x, offset, w)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w))
    assert active_kernel("cpu") == "portable"
