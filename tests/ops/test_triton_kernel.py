"""The Triton (CUDA) kernel against the portable kernel. Without a GPU the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1``, set by the root conftest.py before any Triton
function is defined), on small shapes; with a GPU they run on it.

The interpreter checks the arithmetic, not what only a GPU enforces (grid limits, devices, index
width): tests/ops/test_triton_launch.py checks those on the host code, for shapes too large to run.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from deform_reference import deform_conv2d_naive  # noqa: E402
from deformconv.ops import _launch, _portable, _triton, output_size  # noqa: E402
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


# float16/bfloat16 run natively (loaded and stored in their dtype, computed in float32) and are
# compared with the float32 portable kernel on the same, already rounded, inputs. Tolerance:
# |got - expected| <= TOL * max|expected|, about 4 units in the last place of float16 (2**-11)
# and 2.5 of bfloat16 (2**-8); measured under the interpreter: at most 5.5e-4 and 8.6e-3.
LOW_PRECISION_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _assert_close_relative(got, expected, tol, name):
    assert got.dtype != torch.float32, name
    scale = float(expected.abs().max())
    err = float((got.float() - expected).abs().max())
    assert err <= tol * max(scale, 1e-6), f"{name}: max |error| {err:.3g} > {tol} * {scale:.3g}"


# Every case but the slow 5x5 one (the interpreter runs one program at a time).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [0, 1, 2, 4], ids=lambda i: f"case{i}")
def test_low_precision_runs_natively_and_matches_float32_portable(case, dtype) -> None:
    tensors, params = _make(CASES[case], dtype)
    as_f32 = [None if t is None else t.float() for t in tensors]
    tol = LOW_PRECISION_TOL[dtype]
    out = _triton.forward(*tensors, *params)
    assert out.dtype == dtype
    _assert_close_relative(out, _portable.forward(*as_f32, *params), tol, "output")
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = _triton.backward(upstream, *tensors, *params)
    ref_grads = _portable.backward(upstream.float(), *as_f32, *params)
    for name, got, expected in zip(
        ("input", "offset", "mask", "weight", "bias"), grads, ref_grads, strict=True
    ):
        if expected is None:
            assert got is None, name
        else:
            assert got.dtype == dtype, name
            _assert_close_relative(got, expected, tol, name)


def test_low_precision_makes_no_float32_copy_of_the_input(monkeypatch) -> None:
    # Native low precision: the kernels receive the float16 tensors themselves. The operator
    # copies to float32 only for kernel modules without NATIVE_LOW_PRECISION (ops/_precision.py).
    from deformconv.ops._precision import needs_float32

    assert _triton.NATIVE_LOW_PRECISION and not needs_float32(_triton, torch.float16)
    seen = []
    real = _launch.launch

    def spy(kernel, grid, *args, **meta):
        seen.extend(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(_launch, "launch", spy)
    tensors, params = _make(CASES[0], torch.float16)
    out = _triton.forward(*tensors, *params)
    _triton.backward(torch.ones_like(out), *tensors, *params)
    # Every tensor a kernel reads is float16, except the float32 input-gradient accumulator.
    assert set(seen) == {torch.float16, torch.float32}
    assert seen.count(torch.float32) == 1


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_triton_reads_any_input_layout(layout) -> None:
    tensors, params = _make(CASES[1], torch.float64)
    x = tensors[0]
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        wide = x.new_full((*x.shape[:3], 2 * x.shape[3]), float("nan"))
        wide[..., ::2] = x
        x = wide[..., ::2]  # every other column of a wider tensor: width stride 2
        assert not x.is_contiguous()
    moved = [x, *tensors[1:]]
    torch.testing.assert_close(
        _triton.forward(*moved, *params), _portable.forward(*tensors, *params), rtol=0, atol=1e-10
    )
    upstream = torch.ones_like(_portable.forward(*tensors, *params))
    for got, expected in zip(
        _triton.backward(upstream, *moved, *params),
        _portable.backward(upstream, *tensors, *params),
        strict=True,
    ):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_int64_indexing_path_gives_the_same_results(monkeypatch) -> None:
    # A GPU takes the int64 path only when a tensor can be addressed past 2**31 elements, far
    # too large for these tests; lowering the threshold runs that path on small tensors.
    flags = []
    real = _launch.launch

    def spy(kernel, grid, *args, **meta):
        flags.append(meta["INDEX_64"])
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(_launch, "launch", spy)
    tensors, params = _make(CASES[1], torch.float64)
    out32 = _triton.forward(*tensors, *params)
    upstream = torch.randn(out32.shape, dtype=torch.float64)
    grads32 = _triton.backward(upstream, *tensors, *params)
    assert flags and not any(flags)
    flags.clear()
    monkeypatch.setattr(_launch, "INDEX_LIMIT", 0)
    out64 = _triton.forward(*tensors, *params)
    grads64 = _triton.backward(upstream, *tensors, *params)
    assert flags and all(flags)
    torch.testing.assert_close(out64, out32, rtol=0, atol=0)
    for got, expected in zip(grads64, grads32, strict=True):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_launches_split_over_images_give_the_same_results(monkeypatch) -> None:
    # On a GPU a launch is split over images when its grid would pass 2**31 - 1 programs; a
    # limit of one image's programs makes every image its own launch here.
    tensors, params = _make(CASES[0], torch.float64)
    batch = tensors[0].shape[0]
    launches = []
    real = _launch.launch

    def spy(kernel, grid, *args, **meta):
        launches.append((kernel.__name__, grid[0]))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(_launch, "launch", spy)
    whole = _triton.forward(*tensors, *params)
    upstream = torch.randn(whole.shape, dtype=torch.float64)
    whole_grads = _triton.backward(upstream, *tensors, *params)
    assert all(kernel != "im2col_kernel" or programs % batch == 0 for kernel, programs in launches)
    per_image = max(programs for _, programs in launches) // batch
    launches.clear()
    monkeypatch.setattr(_launch, "MAX_GRID_X", per_image)
    split = _triton.forward(*tensors, *params)
    assert [k for k, _ in launches] == ["im2col_kernel"] * batch
    split_grads = _triton.backward(upstream, *tensors, *params)
    assert all(programs <= per_image for _, programs in launches)
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    for got, expected in zip(split_grads, whole_grads, strict=True):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
