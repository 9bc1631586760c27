"""The Triton (CUDA) kernel against the portable kernel. Without a GPU the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1``, set by the root conftest.py before any Triton
function is defined), on small shapes; with a GPU they run on it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from deform_reference import deform_conv2d_naive  # noqa: E402
from deformconv.ops import _portable, _triton, output_size  # noqa: E402
from deformconv.ops._workspace import workspace_budget  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # batch, channels, out, groups, offset groups, kernel, stride, padding, dilation, size, mask
    (2, 4, 6, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), (5, 6), True),
    (1, 4, 4, 2, 2, (3, 2), (2, 1), (0, 1), (1, 2), (9, 7), True),
    (3, 6, 3, 1, 3, (1, 1), (1, 1), (0, 0), (1, 1), (5, 5), False),
    (1, 4, 4, 2, 2, (5, 5), (2, 2), (1, 1), (1, 1), (6, 6), True),
    (1, 2, 2, 1, 1, (2, 3), (1, 3), (2, 0), (2, 1), (6, 11), False),
]


def _make(case, dtype, seed=0):
    b, c, o, g, og, k, s, p, d, hw, has_mask = case
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = output_size(*hw, k, s, p, d)
    taps = k[0] * k[1]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    tensors = (
        rand(b, c, *hw),
        rand(b, 2 * og * taps, out_h, out_w, scale=2.0),
        torch.sigmoid(rand(b, og * taps, out_h, out_w)) if has_mask else None,
        rand(o, c // g, *k),
        rand(o),
    )
    return [None if t is None else t.to(DEVICE) for t in tensors], (s, p, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_matches_portable(case, dtype) -> None:
    tensors, params = _make(case, dtype)
    out = _triton.forward(*tensors, *params)
    ref = _portable.forward(*tensors, *params)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = _triton.backward(upstream, *tensors, *params)
    ref_grads = _portable.backward(upstream, *tensors, *params)
    for name, got, expected in zip(
        ("input", "offset", "mask", "weight", "bias"), grads, ref_grads, strict=True
    ):
        if expected is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=name)


def test_triton_matches_naive_reference() -> None:
    tensors, (s, p, d) = _make(CASES[1], torch.float64, seed=4)
    out = _triton.forward(*tensors, s, p, d)
    x, off, mask, w, b = (None if t is None else t.cpu().numpy() for t in tensors)
    expected = deform_conv2d_naive(x, off, w, b, s, p, d, mask)
    torch.testing.assert_close(out.cpu(), torch.from_numpy(expected), rtol=1e-10, atol=1e-10)


def test_triton_chunks_the_batch_within_the_budget() -> None:
    tensors, params = _make(CASES[0], torch.float64)
    whole = _triton.forward(*tensors, *params)
    with workspace_budget(1):  # one image at a time
        chunked = _triton.forward(*tensors, *params)
        upstream = torch.ones_like(whole)
        chunked_grads = _triton.backward(upstream, *tensors, *params)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    for got, expected in zip(
        chunked_grads, _triton.backward(upstream, *tensors, *params), strict=True
    ):
        torch.testing.assert_close(got, expected)


def test_triton_non_finite_offsets_read_zero() -> None:
    tensors, params = _make(CASES[0], torch.float32)
    x, off, mask, w, b = tensors
    poisoned = off.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    poisoned[1, 3, 2, 2] = float("inf")
    silenced = mask.clone()
    silenced[0, 0, 0, 0] = 0
    silenced[1, 1, 2, 2] = 0
    out = _triton.forward(x, poisoned, mask, w, b, *params)
    torch.testing.assert_close(out, _portable.forward(x, off, silenced, w, b, *params))
    grads = _triton.backward(torch.ones_like(out), x, poisoned, mask, w, b, *params)
    assert all(torch.isfinite(g).all() for g in grads)
