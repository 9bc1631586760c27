"""The three DCNv3/DCNv4 kernels against each other: the Numba CPU kernel and the Triton kernel
(on a GPU when there is one, else in Triton's interpreter, ``TRITON_INTERPRET=1``, on small
shapes) against the portable kernel, which tests/ops/test_dcnv3.py checks against the grid_sample
reference. Also: the CPU backward is bit-identical from run to run, the portable kernel's memory
is bounded by the workspace budget, the Triton launches stay within CUDA's grid limits and take
their int64 path, and the dispatcher's choice."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dcnv_cases import Case, tensors, upstream_grad
from deformconv.ops import (
    _dcnv3_cpu,
    _dcnv3_portable,
    _launch,
    active_kernel,
    dcnv3,
    use_kernel,
    workspace_budget,
)
from deformconv.ops._dcnv3_geometry import Sampling, make_sampling

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _sampling(case: Case, packed: bool, width: int) -> Sampling:
    pad = case.pad if packed else case.pad[::-1]
    return make_sampling(
        case.height, case.width, case.kernel, case.stride, pad, case.dilation, case.group,
        case.group_channels, case.offset_scale, case.remove_center, packed, width,
    )  # fmt: skip


def _call(case: Case, dtype: torch.dtype, packed: bool, device: str = "cpu", seed: int = 0):
    """``(offset, mask, sampling)`` of a case's tensors, and its input and upstream gradient."""
    t = {k: v.to(device) for k, v in tensors(case, dtype, packed, seed).items()}
    offset = t["offset_mask"] if packed else t["offset"]
    mask = offset if packed else t["mask"]
    s = _sampling(case, packed, offset.shape[-1])
    shape = (case.batch, s.out_h, s.out_w, s.channels)
    grad = upstream_grad(torch.empty(shape, dtype=dtype), seed=seed + 1).to(device)
    return t["input"], offset, mask, s, grad


def _both(module, x, offset, mask, s, grad):
    return module.forward(x, offset, mask, s), module.backward(grad, x, offset, mask, s)


def _assert_close(got, expected, dtype, what: str = "") -> None:
    tol = TOLERANCE.get(dtype, 2e-2)
    out, grads = got
    ref, ref_grads = expected
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=tol, atol=tol, msg=f"{what} output")
    for name, g, r in zip(("input", "offset", "mask"), grads, ref_grads, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype and g.is_contiguous(), name
        torch.testing.assert_close(g.cpu(), r.cpu(), rtol=tol, atol=tol, msg=f"{what} {name}")


CPU_CASES = [
    Case(2, 7, 8, 4, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
    Case(3, 9, 6, 3, 5, (3, 3), (2, 1), (2, 1), (2, 1), 0.6, True),
    Case(1, 6, 7, 1, 40, (5, 5), (1, 2), (2, 2), (1, 1), 1.3, False),  # channel runs split
    Case(2, 5, 5, 2, 3, (2, 3), (1, 1), (0, 1), (1, 2), 1.0, False, contiguous=False),
    Case(1, 4, 4, 8, 1, (1, 1), (1, 1), (0, 0), (1, 1), 2.0, False),
]


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_numba_kernel_matches_portable(case: Case, dtype: torch.dtype, packed: bool) -> None:
    args = _call(case, dtype, packed)
    _assert_close(_both(_dcnv3_cpu, *args), _both(_dcnv3_portable, *args), dtype)


def test_numba_backward_is_bit_identical_from_run_to_run() -> None:
    for case in (CPU_CASES[0], CPU_CASES[2]):
        x, offset, mask, s, grad = _call(case, torch.float32, packed=False, seed=3)
        first = _dcnv3_cpu.backward(grad, x, offset, mask, s)
        for _ in range(3):
            again = _dcnv3_cpu.backward(grad, x, offset, mask, s)
            for a, b in zip(first, again, strict=True):
                assert torch.equal(a, b)


def test_numba_backward_splits_work_for_the_threads(monkeypatch) -> None:
    """Whole images per task; with fewer images than threads, blocks of groups (the same bits);
    with fewer (image, group) pairs than threads, runs of channels whose partial offset and mask
    gradients are summed (the same numbers)."""
    case = Case(2, 6, 7, 4, 40, (3, 3), (1, 2), (1, 1), (1, 1), 1.3, False)
    x, offset, mask, s, grad = _call(case, torch.float64, packed=False)
    assert _dcnv3_cpu._split(s, 2, threads=2) == (4, 40)
    assert _dcnv3_cpu._split(s, 2, threads=4) == (2, 40)
    assert _dcnv3_cpu._split(s, 1, threads=16) == (1, 10)
    results = {}
    for split in ((4, 40), (1, 40), (3, 40), (1, 10)):
        monkeypatch.setattr(_dcnv3_cpu, "_split", lambda *args, split=split: split)
        results[split] = _dcnv3_cpu.backward(grad, x, offset, mask, s)
    for split in ((1, 40), (3, 40)):
        for a, b in zip(results[split], results[(4, 40)], strict=True):
            assert torch.equal(a, b), split
    for a, b in zip(results[(1, 10)], results[(4, 40)], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_portable_kernel_walks_the_batch_within_the_budget(monkeypatch) -> None:
    case = Case(5, 6, 6, 2, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False)
    args = _call(case, torch.float64, packed=False)
    whole = _both(_dcnv3_portable, *args)
    chunks = []
    real = _dcnv3_portable.batch_chunks

    def spy(batch, per_image):
        chunks.append(real(batch, per_image))
        return chunks[-1]

    monkeypatch.setattr(_dcnv3_portable, "batch_chunks", spy)
    per_image = 6 * 6 * 8 * 8
    with workspace_budget(2 * 4 * per_image):
        chunked = _both(_dcnv3_portable, *args)
    assert all(len(c) > 1 for c in chunks)
    _assert_close(chunked, whole, torch.float64)


def test_dispatcher_runs_the_numba_kernel_on_cpu() -> None:
    assert active_kernel("cpu", "dcnv3") == "numba"
    x, offset, mask, _, _ = _call(CPU_CASES[0], torch.float64, packed=False)
    args = (x, offset, mask, *CPU_CASES[0].args())
    with use_kernel("portable", "cpu"):
        assert active_kernel("cpu", "dcnv3") == "portable"
        portable = dcnv3(*args)
    torch.testing.assert_close(dcnv3(*args), portable, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Triton (interpreter without a GPU: a few small cases, it runs each program in Python).

triton = pytest.importorskip("triton")
from deformconv.ops import _dcnv3_triton  # noqa: E402

TRITON_CASES = [
    Case(2, 5, 6, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1), 0.8, False),
    Case(1, 6, 5, 1, 40, (3, 3), (2, 1), (2, 1), (1, 2), 1.0, True),  # two channel blocks
    Case(1, 4, 5, 3, 2, (1, 2), (1, 1), (0, 1), (1, 1), 1.0, False, contiguous=False),
]


@pytest.mark.parametrize(
    "case, dtype, packed",
    [
        (TRITON_CASES[0], torch.float32, False),
        (TRITON_CASES[0], torch.float64, True),
        (TRITON_CASES[1], torch.float64, False),
        (TRITON_CASES[2], torch.float32, True),
    ],
    ids=["dcnv3-f32", "dcnv4-f64", "dcnv3-f64-rc-wide", "dcnv4-f32-strided"],
)
def test_triton_kernel_matches_portable(case: Case, dtype: torch.dtype, packed: bool) -> None:
    args = _call(case, dtype, packed, device=DEVICE)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    _assert_close(_both(_dcnv3_triton, *args), _both(_dcnv3_portable, *cpu_args), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_computes_low_precision_in_float32(dtype: torch.dtype) -> None:
    """Loads and stores the tensors' dtype, computes in float32: against the float32 portable
    kernel on the same rounded values, within one low-precision rounding."""
    x, offset, mask, s, grad = _call(TRITON_CASES[0], torch.float32, False, device=DEVICE)
    low = [t.to(dtype) for t in (x, offset, mask, grad)]
    out, grads = _both(_dcnv3_triton, low[0], low[1], low[2], s, low[3])
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref = _both(_dcnv3_portable, *(t.float().cpu() for t in low[:3]), s, low[3].float().cpu())
    _assert_close((out.float(), [g.float() for g in grads]), ref, dtype)


def test_triton_deterministic_mode_avoids_atomics_and_agrees() -> None:
    args = _call(TRITON_CASES[0], torch.float64, packed=True, device=DEVICE)
    atomic = _dcnv3_triton.backward(args[-1], *args[:-1])
    torch.use_deterministic_algorithms(True)
    try:
        first = _dcnv3_triton.backward(args[-1], *args[:-1])
        second = _dcnv3_triton.backward(args[-1], *args[:-1])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(atomic, first, second, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        assert torch.equal(b, c)


def test_triton_int64_path_gives_the_same_numbers(monkeypatch) -> None:
    args = _call(TRITON_CASES[2], torch.float64, packed=False, device=DEVICE)
    expected = _both(_dcnv3_triton, *args)
    seen = []
    real = _launch.launch

    def spy(kernel, grid, *a, **meta):
        seen.append(meta["INDEX_64"])
        return real(kernel, grid, *a, **meta)

    monkeypatch.setattr(_launch, "INDEX_LIMIT", 16)
    monkeypatch.setattr(_dcnv3_triton._launch, "launch", spy)
    _assert_close(_both(_dcnv3_triton, *args), expected, torch.float64)
    assert seen and all(seen)


def test_triton_grids_stay_within_cuda_limits_for_large_shapes() -> None:
    """Batch 2**20 of 64x64 pixels with 32 groups needs 2**20 * 32 * 128 programs: the launches
    are split so that each grid fits (checked without running them)."""
    s = make_sampling(64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 32, 16)
    launches = list(_dcnv3_triton._launches(2**20, s))
    assert len(launches) > 1
    assert launches[0][0] == 0 and launches[-1][1] == 2**20
    for start, stop, grid in launches:
        assert _launch.check_grid(grid) == grid
        assert grid[0] == (stop - start) * 32 * 128
