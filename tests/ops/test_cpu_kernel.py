"""The Numba CPU kernel, called directly, on both of its paths (fused and unfused): parity with
torchvision and the portable kernel for the output and every gradient, agreement of the two
paths, tiling under any workspace budget, determinism, non-finite offsets, the private oneDNN
call and its fallback, the release of its buffers, concurrent calls from two threads under
every Numba threading layer, and its selection by the dispatcher.

The expected values come from ``torchvision.ops.deform_conv2d`` (its CPU kernel,
torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp) and from deformconv's portable kernel, which
shares no code with the Numba kernel (plain PyTorch ``grid_sample``-style gathers).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from deformconv.ops import (
    _buffers,
    _cpu,
    _numba,
    _portable,
    active_kernel,
    output_size,
    use_kernel,
    workspace_budget,
)
from deformconv.ops._cpu_layout import Layout, Prologue, chunk_columns

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
NAMES = ("input", "offset", "mask", "weight", "bias")
PATHS = {"fused": True, "unfused": False}


def _case(
    batch=2,
    channels=4,
    out_channels=6,
    size=(7, 8),
    kernel=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    groups=1,
    offset_groups=1,
    mask=True,
    bias=True,
    dtype=torch.float64,
    seed=0,
):
    """Random tensors and parameters of one call, offsets ``randn * 2`` as in the benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = output_size(*size, kernel, stride, padding, dilation)
    taps = kernel[0] * kernel[1]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    tensors = {
        "input": rand(batch, channels, *size),
        "offset": rand(batch, 2 * offset_groups * taps, out_h, out_w, scale=2.0),
        "mask": torch.sigmoid(rand(batch, offset_groups * taps, out_h, out_w)) if mask else None,
        "weight": rand(out_channels, channels // groups, *kernel),
        "bias": rand(out_channels) if bias else None,
    }
    grad_out = rand(batch, out_channels, out_h, out_w)
    return tensors, grad_out, (stride, padding, dilation)


def _torchvision(tensors, grad_out, params):
    leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in tensors.items()}
    stride, padding, dilation = params
    out = torchvision.ops.deform_conv2d(
        leaves["input"],
        leaves["offset"],
        leaves["weight"],
        leaves["bias"],
        stride=stride,
        padding=padding,
        dilation=dilation,
        mask=leaves["mask"],
    )
    out.backward(grad_out)
    return out.detach(), tuple(None if v is None else v.grad for v in leaves.values())


def _kernel(module, tensors, grad_out, params):
    t = [tensors[name] for name in NAMES]
    out = module.forward(*t, *params)
    gi, go, gm, gw, gb = module.backward(grad_out, *t, *params)
    return out, (gi, go, gm, gw, gb)


def _path(fused, tensors, grad_out, params):
    """Forward and backward of the CPU kernel on one path, whatever its rule would pick."""
    t = [tensors[name] for name in NAMES]
    out = _cpu.forward_path(fused, *t, *params)
    return out, _cpu.backward_path(fused, grad_out, *t, *params)


def _assert_same(ours, theirs, dtype, what="", tol=None):
    tol = TOLERANCE[dtype] if tol is None else tol
    out, grads = ours
    ref_out, ref_grads = theirs
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol, msg=f"{what} output")
    for name, g, ref in zip(NAMES, grads, ref_grads, strict=True):
        if ref is None:
            assert g is None, name
            continue
        assert g.dtype == ref.dtype and g.is_contiguous(), name
        torch.testing.assert_close(g, ref, rtol=tol, atol=tol, msg=f"{what} grad {name}")


def _assert_bitwise(first, second, what=""):
    pairs = zip((first[0], *first[1]), (second[0], *second[1]), strict=True)
    for name, (a, b) in zip(("output", *NAMES), pairs, strict=True):
        if a is None:
            assert b is None, f"{what} {name}"
            continue
        assert torch.equal(a, b), f"{what} {name}"


CASES = {
    "3x3": {},
    "stride2": {"stride": (2, 2), "size": (9, 8)},
    "dilation2": {"dilation": (2, 2), "padding": (2, 2)},
    "offset_groups4": {"channels": 8, "offset_groups": 4},
    "groups2": {"channels": 8, "out_channels": 4, "groups": 2},
    "groups2_offset_groups4": {"channels": 8, "groups": 2, "offset_groups": 4},
    "groups3_offset_groups2": {"channels": 6, "groups": 3, "offset_groups": 2},
    "1x1": {"kernel": (1, 1), "padding": (0, 0)},
    "5x5": {"kernel": (5, 5), "padding": (2, 2), "size": (9, 9)},
    "2x3_nonsquare": {"kernel": (2, 3), "stride": (1, 2), "padding": (1, 0), "dilation": (2, 1)},
    "v1_no_bias": {"mask": False, "bias": False},
    "one_pixel_output": {"size": (3, 3), "padding": (0, 0)},
    "batch1_wide_channels": {"batch": 1, "channels": 40, "out_channels": 3},
    # More output pixels than one fused tile holds, with a partial last tile, and output
    # channels that are not a multiple of the 4 x 4 blocks.
    "many_pixels": {"batch": 1, "size": (19, 17), "out_channels": 7},
}


@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_torchvision(case: dict, dtype: torch.dtype, path: str) -> None:
    tensors, grad_out, params = _case(dtype=dtype, **case)
    ours = _path(PATHS[path], tensors, grad_out, params)
    _assert_same(ours, _torchvision(tensors, grad_out, params), dtype)


@pytest.mark.parametrize("case", [CASES[k] for k in ("3x3", "groups3_offset_groups2", "5x5")])
def test_matches_the_portable_kernel(case: dict) -> None:
    tensors, grad_out, params = _case(dtype=torch.float64, **case)
    ours = _kernel(_cpu, tensors, grad_out, params)
    _assert_same(ours, _kernel(_portable, tensors, grad_out, params), torch.float64)


# Small versions of the benchmark's shapes (benchmarks/bench_cpu.py), each on both paths.
BENCHMARK_LIKE = {
    "narrow_c": {"batch": 4, "channels": 32, "out_channels": 32, "size": (10, 10)},
    "video_8_offset_groups": {
        "batch": 1,
        "channels": 64,
        "out_channels": 64,
        "size": (9, 16),
        "offset_groups": 8,
    },
    "dilated_4_offset_groups": {
        "batch": 2,
        "channels": 96,
        "out_channels": 96,
        "size": (8, 8),
        "padding": (2, 2),
        "dilation": (2, 2),
        "offset_groups": 4,
    },
    "5x5_stride2": {
        "batch": 2,
        "channels": 48,
        "out_channels": 64,
        "size": (12, 12),
        "kernel": (5, 5),
        "stride": (2, 2),
        "padding": (2, 2),
    },
}


@pytest.mark.parametrize("case", list(BENCHMARK_LIKE.values()), ids=list(BENCHMARK_LIKE))
def test_fused_and_unfused_paths_agree(case: dict) -> None:
    """Same inputs, both paths: float32 results within 1e-5 of each other, and float64 results
    within 1e-10 of torchvision's on both."""
    tensors, grad_out, params = _case(dtype=torch.float32, **case)
    fused = _path(True, tensors, grad_out, params)
    unfused = _path(False, tensors, grad_out, params)
    # Relative to the size of each result: the sums run over up to 2,400 terms.
    pairs = zip((fused[0], *fused[1]), (unfused[0], *unfused[1]), strict=True)
    for name, (a, b) in zip(("output", *NAMES), pairs, strict=True):
        if a is None:
            assert b is None, name
            continue
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=name)
    tensors64, grad64, params = _case(dtype=torch.float64, **case)
    reference = _torchvision(tensors64, grad64, params)
    for fused_path in (True, False):
        _assert_same(_path(fused_path, tensors64, grad64, params), reference, torch.float64)


@settings(max_examples=25, deadline=None)
@given(
    data=st.fixed_dictionaries(
        {
            "batch": st.integers(1, 3),
            "kernel": st.tuples(st.integers(1, 5), st.integers(1, 5)),
            "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
            "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
            "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
            "extra": st.tuples(st.integers(0, 4), st.integers(0, 4)),
            "groups": st.sampled_from([1, 2]),
            "offset_groups": st.sampled_from([1, 2, 4]),
            "channels_per_group": st.integers(1, 3),
            "out_per_group": st.integers(1, 3),
            "mask": st.booleans(),
            "bias": st.booleans(),
            "seed": st.integers(0, 2**16),
        }
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_hypothesis_configurations_match_torchvision(data: dict, dtype: torch.dtype) -> None:
    kernel, dilation, padding = data["kernel"], data["dilation"], data["padding"]
    # The smallest input with a non-empty output, plus a few pixels.
    size = tuple(
        max(dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i], 1) + data["extra"][i]
        for i in range(2)
    )
    tensors, grad_out, params = _case(
        batch=data["batch"],
        channels=math.lcm(data["groups"], data["offset_groups"]) * data["channels_per_group"],
        out_channels=data["groups"] * data["out_per_group"],
        size=size,
        kernel=kernel,
        stride=data["stride"],
        padding=padding,
        dilation=dilation,
        groups=data["groups"],
        offset_groups=data["offset_groups"],
        mask=data["mask"],
        bias=data["bias"],
        dtype=dtype,
        seed=data["seed"],
    )
    reference = _torchvision(tensors, grad_out, params)
    for fused in (True, False):
        _assert_same(_path(fused, tensors, grad_out, params), reference, dtype, what=f"{fused}")


def test_the_rule_fuses_narrow_layers_and_not_wide_ones() -> None:
    """The documented rule (docs/performance.md): fused while one weight group's weight fits
    ``FUSED_WEIGHT_BYTES`` (forward) or ``FUSED_BACKWARD_WEIGHT_BYTES`` (backward). Narrow and
    grouped layers fuse; ResNet-50's wide stages do not (forward: 128 channels and up;
    backward: 256 and up)."""

    def layout(channels: int, kernel: int = 3, groups: int = 1) -> Layout:
        return Layout(2, channels, 8, 8, 8, 8, kernel, kernel, groups, 1)

    for channels, forward, backward in [(32, True, True), (64, True, True), (128, False, True)]:
        assert _cpu.fused_path(layout(channels), channels, 4) == forward, channels
        assert _cpu.fused_path(layout(channels), channels, 4, backward=True) == backward
    assert not _cpu.fused_path(layout(256), 256, 4)
    assert not _cpu.fused_path(layout(256), 256, 4, backward=True)
    assert _cpu.fused_path(layout(256, groups=8), 256, 4)
    assert not _cpu.fused_path(layout(256, kernel=5), 256, 4)
    assert _cpu.fused_path(layout(64), 64, 8) and not _cpu.fused_path(layout(96), 96, 8)  # f64
    # The fused backward keeps a weight-gradient sum per thread: they must fit the budget.
    assert _cpu.fused_path(layout(64), 64, 4, backward=True, threads=4)
    with workspace_budget(2**20):
        assert not _cpu.fused_path(layout(64), 64, 4, backward=True, threads=4)
    tensors, _, params = _case(channels=8, dtype=torch.float32)
    t = [tensors[name] for name in NAMES]
    assert torch.equal(_cpu.forward(*t, *params), _cpu.forward_path(True, *t, *params))


def test_chunks_cover_every_channel_once_within_one_offset_and_weight_group() -> None:
    for layout in (
        Layout(1, 12, 5, 5, 5, 5, 3, 3, 3, 2),  # weight-group boundaries inside offset groups
        Layout(1, 64, 5, 5, 5, 5, 3, 3, 1, 1),  # one image, one run: split for two threads
    ):
        chunks = layout.chunks(min_tasks=2)
        owner = np.zeros(layout.channels, dtype=int)
        for first, length, group, weight_group in zip(
            chunks.first, chunks.length, chunks.group, chunks.weight_group, strict=True
        ):
            owner[first : first + length] += 1
            per_group = layout.channels // layout.offset_groups
            assert first // per_group == (first + length - 1) // per_group == group
            cg = layout.group_channels
            assert first // cg == (first + length - 1) // cg == weight_group
        assert (owner == 1).all()
        assert layout.batch * len(chunks.first) >= 2
        index = chunk_columns(layout, chunks)
        assert sorted(index[0]) == list(range(layout.taps * layout.group_channels))


@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS))
@pytest.mark.parametrize(
    "budget",
    [1, 400, 1500, 2**20],
    ids=["one-pixel-tiles", "partial-image-tiles", "multi-image-tiles", "default-like"],
)
def test_any_workspace_budget_gives_the_same_result(budget: int, path: str) -> None:
    """Tiles of part of an image, of several images with a remainder, or of the whole batch."""
    tensors, grad_out, params = _case(batch=3, channels=3, size=(5, 4), dtype=torch.float32)
    reference = _torchvision(tensors, grad_out, params)
    with workspace_budget(budget):
        ours = _path(PATHS[path], tensors, grad_out, params)
    _assert_same(ours, reference, torch.float32, what=f"budget {budget}")


def test_unfused_columns_and_cached_buffers_stay_within_the_budget() -> None:
    """Each unfused tile's columns fit the budget, and so does what a thread keeps cached
    between calls (measured in a fresh thread, whose pool starts empty)."""
    tensors, grad_out, params = _case(batch=4, channels=8, size=(16, 16), dtype=torch.float32)
    budget = 16 * 2**10
    t = [tensors[name] for name in NAMES]
    seen = {}

    def run() -> None:
        with workspace_budget(budget):
            layout = Prologue(t[0], t[1], t[2], t[3], *params).layout
            tiles = layout.tiles(4, min(_cpu.TILE_BYTES, budget))
            seen["tile"] = max(n1 - n0 for n0, n1 in tiles) * layout.row_size * 4
            for fused in (True, False):
                _path(fused, tensors, grad_out, params)
            seen["kept"] = _buffers.cpu_buffers.kept_bytes()

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert 0 < seen["tile"] <= budget
    assert 0 < seen["kept"] <= budget


DETERMINISM_CASES = {
    "many_tasks": {"batch": 3, "channels": 64, "out_channels": 8, "size": (12, 12)},
    "split_runs": {"batch": 1, "channels": 64, "out_channels": 8, "size": (12, 12)},
    "offset_groups": {"batch": 3, "channels": 64, "out_channels": 8, "offset_groups": 2},
}


@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS))
@pytest.mark.parametrize("case", list(DETERMINISM_CASES.values()), ids=list(DETERMINISM_CASES))
def test_two_backward_passes_are_bit_identical(case: dict, path: str) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tensors, grad_out, params = _case(dtype=torch.float32, **case)
        first = _path(PATHS[path], tensors, grad_out, params)
        second = _path(PATHS[path], tensors, grad_out, params)
    finally:
        torch.set_num_threads(previous)
    _assert_bitwise(first, second, path)


@pytest.mark.parametrize("min_channels", [1, 8, 64])
def test_any_unfused_scatter_split_gives_the_same_gradients(monkeypatch, min_channels: int) -> None:
    # The input-gradient scatter splits each image's channels among tasks; how finely is a
    # tuning choice. Every split must give torchvision's gradients, and the same bits (each
    # element's sum runs in the same order whichever task owns it).
    tensors, grad_out, params = _case(
        batch=1, channels=130, out_channels=3, size=(6, 5), offset_groups=2, dtype=torch.float32
    )
    reference = _path(False, tensors, grad_out, params)
    monkeypatch.setattr(_cpu, "MIN_CHANNEL_BLOCK", min_channels)
    monkeypatch.setattr(_cpu, "CHANNEL_BLOCK", max(min_channels, 4))
    layout = Prologue(
        tensors["input"], tensors["offset"], tensors["mask"], tensors["weight"], *params
    ).layout
    assert _cpu._scatter_chunk(layout, layout.pixels, 2) == max(min_channels, 4)  # it splits
    ours = _path(False, tensors, grad_out, params)
    _assert_same(ours, _torchvision(tensors, grad_out, params), torch.float32)
    _assert_bitwise(ours, reference)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_any_fused_chunking_gives_torchvisions_gradients(monkeypatch, threads: int) -> None:
    """The fused backward cuts runs into chunks (and tasks into slots) by the thread count;
    every cut gives torchvision's gradients."""
    tensors, grad_out, params = _case(
        batch=1, channels=48, out_channels=5, size=(7, 6), offset_groups=2, dtype=torch.float64
    )
    monkeypatch.setattr(_cpu, "parallel_launch", lambda: _fixed_threads(threads))
    ours = _path(True, tensors, grad_out, params)
    _assert_same(ours, _torchvision(tensors, grad_out, params), torch.float64)


class _fixed_threads:
    """A stand-in for :func:`deformconv.ops._numba.parallel_launch` that reports ``threads``
    (the kernels still run on Numba's threads; only the chunking and the slots change)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> int:
        import numba

        self.inner = _numba.parallel_launch()
        # Never more threads than reported: the scratch buffers have one slot per thread.
        numba.set_num_threads(min(self.threads, self.inner.__enter__()))
        return self.threads

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)


@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS))
def test_any_memory_layout_is_accepted(path: str) -> None:
    tensors, grad_out, params = _case(batch=2, channels=6, size=(6, 7))
    reference = _path(PATHS[path], tensors, grad_out, params)
    strided = {
        "input": tensors["input"].contiguous(memory_format=torch.channels_last),
        "offset": tensors["offset"].transpose(2, 3).contiguous().transpose(2, 3),
        "mask": tensors["mask"][:, :, :, :].contiguous(memory_format=torch.channels_last),
        "weight": tensors["weight"].contiguous(memory_format=torch.channels_last),
        "bias": tensors["bias"],
    }
    grad_strided = grad_out.contiguous(memory_format=torch.channels_last)
    ours = _path(PATHS[path], strided, grad_strided, params)
    _assert_same(ours, reference, torch.float64)


@pytest.mark.parametrize("path", list(PATHS), ids=list(PATHS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_offsets_read_zero_and_get_zero_gradient(bad: float, path: str) -> None:
    tensors, grad_out, params = _case(batch=2, channels=4, size=(6, 6))
    poisoned = dict(tensors)
    poisoned["offset"] = tensors["offset"].clone()
    poisoned["offset"][1, 8, 2, 3] = bad  # tap 4 (vertical), image 1, output pixel (2, 3)
    poisoned["offset"][0, 3, 0, 0] = bad  # tap 1 (horizontal), image 0, output pixel (0, 0)
    far = dict(tensors)
    far["offset"] = poisoned["offset"].nan_to_num(nan=1e6, posinf=1e6, neginf=-1e6)
    out, grads = _path(PATHS[path], poisoned, grad_out, params)
    ref_out, ref_grads = _path(PATHS[path], far, grad_out, params)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, g, ref in zip(NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=0, atol=0, msg=name)
    assert grads[1][1, 8:10, 2, 3].abs().sum() == 0 and grads[1][0, 2:4, 0, 0].abs().sum() == 0
    assert grads[2][1, 4, 2, 3] == 0 and grads[2][0, 1, 0, 0] == 0


def test_without_the_private_onednn_call_the_public_one_gives_the_same_result(
    monkeypatch,
) -> None:
    """``torch.ops.mkldnn._linear_pointwise`` is private: when it is missing, or fails at a
    call, the unfused path contracts with ``F.linear`` instead, for the rest of the process."""
    tensors, grad_out, params = _case(channels=8, dtype=torch.float32)
    reference = _torchvision(tensors, grad_out, params)
    t = [tensors[name] for name in NAMES]
    monkeypatch.setattr(_cpu, "_onednn_linear", None)
    _assert_same(_path(False, tensors, grad_out, params), reference, torch.float32)

    def broken(*args):
        raise RuntimeError("mkldnn: this build has no such operator")

    monkeypatch.setattr(_cpu, "_onednn_linear", broken)
    out = _cpu.forward_path(False, *t, *params)
    torch.testing.assert_close(out, reference[0], rtol=1e-5, atol=1e-5)
    assert _cpu._onednn_linear is None  # not tried again


def test_the_private_onednn_call_is_found_where_torch_has_it() -> None:
    has = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert (_cpu._private_onednn_linear() is not None) == has


def test_release_cpu_buffers_frees_what_the_kernel_keeps() -> None:
    """After a call the kernel keeps its scratch buffers (reused by the next call); releasing
    drops them in every thread, and the next call allocates again and still gives the same
    result."""
    from deformconv.ops import release_cpu_buffers

    tensors, grad_out, params = _case(channels=8, dtype=torch.float32)
    first = _path(True, tensors, grad_out, params)
    assert _buffers.cpu_buffers.kept_bytes() > 0
    assert release_cpu_buffers() > 0
    assert _buffers.cpu_buffers.kept_bytes() == 0
    assert release_cpu_buffers() == 0
    _assert_bitwise(_path(True, tensors, grad_out, params), first)


def test_kept_bytes_follow_reuse_growth_and_the_budget() -> None:
    """The pool keeps a running count of its bytes: a reused buffer is not counted twice, a
    grown one replaces the smaller, and a buffer that would pass the budget is handed out but
    not kept."""
    from deformconv.ops import workspace_budget

    pool = _buffers.BufferPool()
    with workspace_budget(1024):
        pool.get("a", 16, torch.float32)
        pool.get("a", 8, torch.float32)
        assert pool.kept_bytes() == 64
        pool.get("a", 32, torch.float32)
        assert pool.kept_bytes() == 128
        pool.get("b", 16, torch.float64)
        assert pool.kept_bytes() == 256
        pool.get("c", 200, torch.float32)  # 800 more bytes would pass the 1024-byte budget
        assert pool.kept_bytes() == 256
        assert pool.get("c", 4, torch.float32).numel() == 4
        assert pool.kept_bytes() == 272
    assert pool.release() == 272
    assert pool.kept_bytes() == 0


def test_each_thread_keeps_its_own_buffers_until_it_ends() -> None:
    pool = _buffers.BufferPool()
    mine = pool.get("cols", 16, torch.float32)
    seen = {}

    def other() -> None:
        theirs = pool.get("cols", 16, torch.float32)
        seen["distinct"] = theirs.data_ptr() != mine.data_ptr()
        seen["kept"] = pool.kept_bytes()

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    del worker
    assert seen == {"distinct": True, "kept": 64}
    assert pool.release() == 64  # the other thread's buffers went with it


def test_parallel_launch_sets_numbas_threads_to_torchs() -> None:
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with _numba.parallel_launch() as threads:
            import numba

            assert threads == numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_the_first_kernel_call_keeps_torchs_thread_count() -> None:
    """Numba's OpenMP layer sets the process's OpenMP thread count when it starts; deformconv
    puts PyTorch's back (checked in a fresh process, where Numba has not started yet)."""
    script = textwrap.dedent(
        """
        import torch
        from deformconv import deform_conv2d
        torch.set_num_threads(1)
        deform_conv2d(torch.rand(1, 2, 5, 5), torch.zeros(1, 18, 3, 3), torch.rand(3, 2, 3, 3))
        print(torch.get_num_threads())
        """
    )
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "1"


_CONCURRENT = textwrap.dedent(
    """
    import sys, threading
    import numba, torch
    from deformconv import deform_conv2d
    from deformconv.ops import _numba

    torch.set_num_threads(2)
    # A narrow layer (fused path) and a wide one (unfused path), each forward and backward.
    SHAPES = [(2, 16, 16, 9, 2), (2, 128, 128, 6, 1)]

    def run(seed):
        batch, channels, out_channels, size, groups = SHAPES[seed % 2]
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, channels, size, size, generator=gen, requires_grad=True)
        offset = (torch.randn(batch, 18 * groups, size, size, generator=gen) * 2).requires_grad_()
        mask = torch.rand(batch, 9 * groups, size, size, generator=gen, requires_grad=True)
        weight = torch.randn(out_channels, channels, 3, 3, generator=gen, requires_grad=True)
        out = deform_conv2d(x, offset, weight, padding=1, mask=mask)
        grads = torch.autograd.grad(out, [x, offset, mask, weight], torch.ones_like(out))
        return [out.detach(), *grads]

    seeds = list(range(8))
    expected = {seed: run(seed) for seed in seeds}  # one thread, one call at a time
    got, errors = {}, []
    start = threading.Barrier(2)

    def worker(mine):
        try:
            start.wait()
            for _ in range(3):
                for seed in mine:
                    got.setdefault(seed, []).append(run(seed))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seeds[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for seed in seeds:
        for result in got[seed]:
            for a, b in zip(result, expected[seed]):
                assert torch.equal(a, b), seed
    print(_numba.threading_layer())
    """
)


def _available_layers() -> list[str]:
    layers = ["workqueue"]
    for layer, module in (("omp", "numba.np.ufunc.omppool"), ("tbb", "numba.np.ufunc.tbbpool")):
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
        if probe.returncode == 0:
            layers.append(layer)
    return layers


@pytest.mark.slow
@pytest.mark.parametrize("layer", _available_layers())
def test_two_threads_give_the_results_of_one(layer: str) -> None:
    """Two Python threads calling the operator at the same time get exactly what one thread
    gets, under every threading layer Numba can load here. (The workqueue layer is not
    thread-safe: without the launch lock of deformconv.ops._numba the process aborts with
    "Numba workqueue threading layer is terminating: Concurrent access has been detected".)"""
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", _CONCURRENT], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == layer


def test_the_dispatcher_runs_this_kernel_on_cpu_unless_told_otherwise() -> None:
    assert active_kernel("cpu") == "numba"
    with use_kernel("portable", "cpu"):
        assert active_kernel("cpu") == "portable"
    assert active_kernel("cpu") == "numba"
