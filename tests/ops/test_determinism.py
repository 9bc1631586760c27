"""The Triton backward under ``torch.use_deterministic_algorithms(True)``: a path without atomics.

By default the input gradient is summed with atomic additions (``col2im_kernel`` with
``INPUT_GRAD``), whose order, and so last bits, vary between runs on a GPU, as in torchvision's
CUDA kernel. In deterministic mode the kernels write every contribution and its destination and
``Tensor.scatter_add_`` sums them, which PyTorch documents as deterministic on CUDA in that mode
(``torch.use_deterministic_algorithms``: "torch.Tensor.scatter_add_() when called on a CUDA
tensor"). The kernels run under Triton's interpreter without a GPU; the reference is the
portable kernel (plain PyTorch) and, once, the naive loop of tests/deform_reference.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deform_reference import deform_conv2d_naive
from deformconv.ops import _launch, _portable, _triton, output_size
from deformconv.ops._workspace import workspace_budget
from determinism import deterministic_algorithms as deterministic


def _case(dtype, batch=1, channels=4, groups=2, kernel=(3, 3), size=(6, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = output_size(*size, kernel, (1, 1), (1, 1), (1, 1))
    taps = kernel[0] * kernel[1]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    tensors = [
        rand(batch, channels, *size),
        # Large offsets: many taps of different pixels land on the same input pixels, where
        # atomic additions would race.
        rand(batch, 2 * groups * taps, out_h, out_w, scale=3.0),
        torch.sigmoid(rand(batch, groups * taps, out_h, out_w)),
        rand(5, channels, *kernel),
        rand(5),
    ]
    upstream = rand(batch, 5, out_h, out_w)
    return tensors, ((1, 1), (1, 1), (1, 1)), upstream


@pytest.fixture
def launches(monkeypatch):
    """Every launch's kernel name and constexprs (the kernels still run)."""
    seen = []
    real = _launch.launch

    def spy(kernel, grid, *args, **meta):
        seen.append((kernel.__name__, meta))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(_launch, "launch", spy)
    return seen


def _uses_atomics(seen) -> bool:
    return any(name == "col2im_kernel" and meta["INPUT_GRAD"] for name, meta in seen)


def test_default_backward_uses_atomics(launches) -> None:
    tensors, params, upstream = _case(torch.float64)
    with deterministic(False):
        _triton.backward(upstream, *tensors, *params)
    assert _uses_atomics(launches)
    assert "scatter_plan_kernel" not in {name for name, _ in launches}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_deterministic_backward_has_no_atomics_and_matches_portable(launches, dtype) -> None:
    tensors, params, upstream = _case(dtype)
    with deterministic():
        grads = _triton.backward(upstream, *tensors, *params)
    assert not _uses_atomics(launches)
    assert [name for name, _ in launches].count("scatter_plan_kernel") == 4  # one per corner
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name, got, expected in zip(
        ("input", "offset", "mask", "weight", "bias"),
        grads,
        _portable.backward(upstream, *tensors, *params),
        strict=True,
    ):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=name)


def test_deterministic_backward_is_bit_identical_from_run_to_run() -> None:
    tensors, params, upstream = _case(torch.float32, seed=3)
    with deterministic():
        first = _triton.backward(upstream, *tensors, *params)
        second = _triton.backward(upstream, *tensors, *params)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_deterministic_input_gradient_matches_the_naive_loop() -> None:
    # The input gradient of a linear map is its transpose: <grad, f(e_i)> for every basis
    # vector e_i of the input, with f the naive loop of tests/deform_reference.py.
    tensors, params, upstream = _case(torch.float64, batch=1, channels=2, groups=1, size=(4, 5))
    x, off, mask, w, _ = tensors
    with deterministic():
        grad_input = _triton.backward(upstream, *tensors, *params)[0]
    s, p, d = params
    expected = torch.zeros_like(x)
    for i in range(x.numel()):
        basis = torch.zeros(x.numel(), dtype=x.dtype)
        basis[i] = 1
        out = deform_conv2d_naive(
            basis.view_as(x).numpy(), off.numpy(), w.numpy(), None, s, p, d, mask.numpy()
        )
        expected.view(-1)[i] = (torch.from_numpy(out) * upstream).sum()
    torch.testing.assert_close(grad_input, expected, rtol=1e-10, atol=1e-10)


def test_deterministic_backward_in_chunks_and_split_launches(monkeypatch) -> None:
    tensors, params, upstream = _case(torch.float64, batch=2, channels=2, groups=1)
    with deterministic():
        whole = _triton.backward(upstream, *tensors, *params)
        with workspace_budget(1):  # one image per chunk
            chunked = _triton.backward(upstream, *tensors, *params)
        monkeypatch.setattr(_launch, "MAX_GRID_X", 9)  # taps x pixel blocks of one image
        split = _triton.backward(upstream, *tensors, *params)
    for a, b, c in zip(whole, chunked, split, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_deterministic_low_precision_matches_float32_portable(dtype) -> None:
    tensors, params, upstream = _case(dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]  # as in test_triton_kernel.py
    with deterministic():
        grads = _triton.backward(upstream, *tensors, *params)
    as_f32 = [t.float() for t in tensors]
    expected = _portable.backward(upstream.float(), *as_f32, *params)
    for got, ref in zip(grads, expected, strict=True):
        assert got.dtype == dtype
        assert float((got.float() - ref).abs().max()) <= tol * float(ref.abs().max())
