"""What a GPU enforces and Triton's interpreter does not, checked on the Triton kernels' host code.

The host code runs on fake CUDA tensors (tests/fake_cuda.py: shapes, strides and devices, no
memory) with the kernels replaced by recorders, so shapes far too large to run (batch 1024 with 4
offset groups and a 5x5 kernel, a single image of 2**31 elements) are launched "on cuda:N" and
every recorded launch is checked against:

- CUDA's grid limits: at most 2**31 - 1 programs on axis 0 and 65,535 on axes 1 and 2 (CUDA C++
  Programming Guide, "Features and Technical Specifications", maximum x-, y- and z-dimension of a
  grid of thread blocks), written out here independently of deformconv.ops._launch;
- coverage: the launches of one call enumerate every (image, offset group, tap, channel block,
  pixel block) exactly once;
- index width: a launch touching a tensor of 2**31 - 2**16 elements or more runs the int64
  variant, and small shapes keep int32;
- devices: every launch happens while its tensors' device is the current CUDA device.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from determinism import deterministic_algorithms
from fake_cuda import FakeCuda

pytest.importorskip("triton")

from deformconv.ops import _launch, _triton, output_size
from deformconv.ops._workspace import workspace_budget

CUDA_MAX_GRID = (2**31 - 1, 65_535, 65_535)
INT32_SAFE = 2**31 - 2**16
KERNELS = ["im2col_kernel", "col2im_kernel", "scatter_plan_kernel"]

# name, batch, in channels, out channels, offset groups, kernel, size, padding, budget (bytes)
LARGE = [
    # The example: axis 1 of the old grid was batch * offset groups * taps = 102,400.
    ("batch1024-og4-5x5", 1024, 8, 8, 4, (5, 5), (8, 8), 2, None),
    # 65,536 images of 256x256 in one chunk: axis 0 alone needs 2.4e9 programs, so the launch
    # is split over images; the columns (6e11 elements) need int64 offsets.
    ("axis0-split", 65536, 16, 16, 4, (3, 3), (256, 256), 1, 2**62),
    # One image of 2**31 elements: int64 within a single image.
    ("image-2^31", 2, 2**15, 4, 1, (1, 1), (256, 256), 0, None),
    # A common training shape: chunks stay small, int32 suffices.
    ("resnet-stage", 32, 256, 256, 8, (3, 3), (56, 56), 1, None),
]


def _tensors(cuda, batch, channels, out_channels, groups, kernel, size, padding, device):
    out_h, out_w = output_size(*size, kernel, (1, 1), (padding, padding), (1, 1))
    taps = kernel[0] * kernel[1]
    return (
        cuda.tensor(batch, channels, *size, device=device),
        cuda.tensor(batch, 2 * groups * taps, out_h, out_w, device=device),
        cuda.tensor(batch, groups * taps, out_h, out_w, device=device),
        cuda.tensor(out_channels, channels, *kernel, device=device),
        cuda.tensor(out_channels, device=device),
    ), ((1, 1), (padding, padding), (1, 1))


def _run_all(cuda, tensors, params):
    """Forward, backward with atomics and the deterministic backward; their launches."""
    calls = {}
    start = len(cuda.launches)
    out = _triton.forward(*tensors, *params)
    calls["forward"] = cuda.launches[start:]
    for deterministic in (False, True):
        start = len(cuda.launches)
        with deterministic_algorithms(deterministic):
            _triton.backward(torch.empty_like(out), *tensors, *params)
        calls["deterministic" if deterministic else "backward"] = cuda.launches[start:]
    return calls


EXPECTED_IMAGES = {
    "forward": lambda b: {"im2col_kernel": b},
    "backward": lambda b: {"im2col_kernel": b, "col2im_kernel": b},
    "deterministic": lambda b: {
        "im2col_kernel": b,
        "col2im_kernel": b,
        "scatter_plan_kernel": 4 * b,
    },
}


def _expected_programs(launch, channels, groups, taps, pixels):
    """Programs a launch must have: one per (image, group, tap, [channel block], pixel block)."""
    images = launch.args[0].shape[0]
    per_image = groups * taps * math.ceil(pixels / launch.meta["BLOCK_P"])
    if launch.kernel != "col2im_kernel":  # col2im loops over the channel blocks itself
        per_image *= math.ceil(channels // groups / launch.meta["BLOCK_C"])
    return images * per_image


@pytest.fixture(params=LARGE, ids=[c[0] for c in LARGE])
def large(request, monkeypatch):
    """A LARGE case, its fake tensors and the launches of its three calls, on fake cuda:0."""
    _, batch, channels, out_channels, groups, kernel, size, padding, budget = request.param
    with FakeCuda(monkeypatch, _triton, KERNELS) as cuda:
        tensors, params = _tensors(
            cuda, batch, channels, out_channels, groups, kernel, size, padding, "cuda:0"
        )
        with workspace_budget(budget) if budget else contextlib.nullcontext():
            calls = _run_all(cuda, tensors, params)
    return request.param, tensors, calls


def test_every_launch_fits_cuda_grid_limits_and_covers_the_work(large) -> None:
    case, tensors, calls = large
    name, batch, channels, _, groups, kernel, *_ = case
    taps = kernel[0] * kernel[1]
    pixels = tensors[1].shape[2] * tensors[1].shape[3]
    if name == "batch1024-og4-5x5":
        assert batch * groups * taps > CUDA_MAX_GRID[1]  # the layout this replaces overflowed
    for call, launches in calls.items():
        assert launches, call
        for launch in launches:
            grid = launch.grid
            assert 1 <= len(grid) <= 3, (call, grid)
            for size_, limit in zip(grid, CUDA_MAX_GRID, strict=False):
                assert 1 <= size_ <= limit, (call, launch.kernel, grid)
            assert grid[0] == _expected_programs(launch, channels, groups, taps, pixels)
        # Each kernel's launches cover the whole batch once (the deterministic backward's
        # scatter plan once per bilinear corner).
        images = {}
        for launch in launches:
            images[launch.kernel] = images.get(launch.kernel, 0) + launch.args[0].shape[0]
        assert images == EXPECTED_IMAGES[call](batch), call
    if name == "axis0-split":
        assert len([la for la in calls["forward"] if la.kernel == "im2col_kernel"]) >= 2


def test_int64_indexing_exactly_where_an_offset_can_pass_int32(large) -> None:
    (name, *_), _, calls = large
    for launches in calls.values():
        for launch in launches:
            largest = max(a.numel() for a in launch.args if isinstance(a, torch.Tensor))
            if largest >= INT32_SAFE:
                assert launch.meta["INDEX_64"], (launch.kernel, largest)
    flags = {launch.meta["INDEX_64"] for launches in calls.values() for launch in launches}
    if name in ("axis0-split", "image-2^31"):
        assert True in flags
    else:
        assert flags == {False}  # no needless 64-bit arithmetic


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_tensors_on_a_non_current_device_launch_on_their_own_device(
    monkeypatch, deterministic
) -> None:
    with FakeCuda(monkeypatch, _triton, KERNELS) as cuda:
        tensors, params = _tensors(cuda, 2, 4, 4, 2, (3, 3), (6, 6), 1, "cuda:1")
        assert torch.cuda.current_device() == 0
        out = _triton.forward(*tensors, *params)
        with deterministic_algorithms(deterministic):
            grads = _triton.backward(torch.empty_like(out), *tensors, *params)
    assert cuda.entered == [torch.device("cuda:1")] * 2  # one guard per call
    assert cuda.launches
    for launch in cuda.launches:
        assert launch.current_device == 1, launch.kernel
        devices = {a.device for a in launch.args if isinstance(a, torch.Tensor)}
        assert devices == {torch.device("cuda:1")}, launch.kernel
    assert {t.device for t in (out, *grads)} == {torch.device("cuda:1")}


def test_a_launch_on_the_wrong_device_is_refused(monkeypatch) -> None:
    with FakeCuda(monkeypatch, _triton, KERNELS) as cuda:
        x = cuda.tensor(4, device="cuda:1")
        with pytest.raises(_launch.KernelLaunchError, match=r"cuda:1 reached a launch on cuda:0"):
            _launch.launch(_triton.im2col_kernel, (1,), x)
        with torch.cuda.device(x.device):
            _launch.launch(_triton.im2col_kernel, (1,), x)
    assert len(cuda.launches) == 1


def test_device_guard_enters_the_tensors_device_only_for_cuda(monkeypatch) -> None:
    with FakeCuda(monkeypatch, _triton, []) as cuda:
        with _launch.device_guard(cuda.tensor(1, device="cuda:3")):
            assert torch.cuda.current_device() == 3
        with _launch.device_guard(cuda.tensor(1, device="cpu")):
            pass
    assert cuda.entered == [torch.device("cuda:3")]


@pytest.mark.parametrize(
    ("grid", "axis"),
    [((2**31,), 0), ((1, 65_536), 1), ((1, 1, 65_536), 2), ((0,), 0)],
    ids=["x", "y", "z", "empty"],
)
def test_grids_beyond_cuda_limits_are_refused(grid, axis) -> None:
    with pytest.raises(_launch.GridLimitError, match=f"grid axis {axis} must be between 1"):
        _launch.check_grid(grid)
    assert _launch.check_grid((2**31 - 1, 65_535, 65_535)) == CUDA_MAX_GRID


def test_split_rows_covers_every_row_once_within_the_limit() -> None:
    for rows, per_row, limit in [(1024, 36_864, 2**31 - 1), (10, 3, 7), (5, 7, 7), (1, 1, 1)]:
        ranges = _launch.split_rows(rows, per_row, limit)
        assert [r for start, stop in ranges for r in range(start, stop)] == list(range(rows))
        assert all((stop - start) * per_row <= limit for start, stop in ranges)
    with pytest.raises(_launch.GridLimitError, match="one row needs 8 programs"):
        _launch.split_rows(2, 8, limit=7)


def test_needs_int64_counts_the_memory_a_view_spans() -> None:
    # A transposed or sliced view spans its base's memory, not its element count.
    base = torch.empty(4, 1000)
    assert _launch.extent(base[:, :1]) == 3001
    assert _launch.extent(base.t()) == 4000
    assert not _launch.needs_int64(base, 2**31 - 1 - 2**16)
    assert _launch.needs_int64(base, 2**31 - 2**16)


def test_triton_value_errors_become_kernel_launch_errors() -> None:
    class Refusing:
        __name__ = "refusing_kernel"

        def __init__(self, error):
            self.error = error

        def __getitem__(self, grid):
            def run(*args, **meta):
                raise self.error

            return run

    # What Triton's launcher raises for a pointer it cannot use: a ValueError, which the
    # dispatcher would otherwise take for a bad argument and never fall back on.
    refused = ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")
    with pytest.raises(_launch.KernelLaunchError, match="refusing_kernel: ValueError: Pointer"):
        _launch.launch(Refusing(refused), (1,))
    with pytest.raises(RuntimeError, match="CUDA error") as info:
        _launch.launch(Refusing(RuntimeError("CUDA error: invalid argument")), (1,))
    assert type(info.value) is RuntimeError
