"""The Numba CPU kernel, called directly: parity with torchvision and the portable kernel for the
output and every gradient, tiling under any workspace budget, determinism, non-finite offsets,
and its selection by the dispatcher."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from deformconv.ops import _cpu, _portable, active_kernel, output_size, use_kernel, workspace_budget

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
NAMES = ("input", "offset", "mask", "weight", "bias")


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


def _assert_same(ours, theirs, dtype, what=""):
    tol = TOLERANCE[dtype]
    out, grads = ours
    ref_out, ref_grads = theirs
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol, msg=f"{what} output")
    for name, g, ref in zip(NAMES, grads, ref_grads, strict=True):
        if ref is None:
            assert g is None, name
            continue
        assert g.dtype == ref.dtype and g.is_contiguous(), name
        torch.testing.assert_close(g, ref, rtol=tol, atol=tol, msg=f"{what} grad {name}")


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
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_torchvision(case: dict, dtype: torch.dtype) -> None:
    tensors, grad_out, params = _case(dtype=dtype, **case)
    ours = _kernel(_cpu, tensors, grad_out, params)
    _assert_same(ours, _torchvision(tensors, grad_out, params), dtype)


@pytest.mark.parametrize("case", [CASES[k] for k in ("3x3", "groups3_offset_groups2", "5x5")])
def test_matches_the_portable_kernel(case: dict) -> None:
    tensors, grad_out, params = _case(dtype=torch.float64, **case)
    ours = _kernel(_cpu, tensors, grad_out, params)
    _assert_same(ours, _kernel(_portable, tensors, grad_out, params), torch.float64)


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
    ours = _kernel(_cpu, tensors, grad_out, params)
    _assert_same(ours, _torchvision(tensors, grad_out, params), dtype)


@pytest.mark.parametrize(
    "budget",
    [1, 400, 1500, 2**20],
    ids=["one-pixel-tiles", "partial-image-tiles", "multi-image-tiles", "default-like"],
)
def test_any_workspace_budget_gives_the_same_result(budget: int) -> None:
    """Tiles of part of an image, of several images with a remainder, or of the whole batch."""
    tensors, grad_out, params = _case(batch=3, channels=3, size=(5, 4), dtype=torch.float32)
    reference = _torchvision(tensors, grad_out, params)
    with workspace_budget(budget):
        ours = _kernel(_cpu, tensors, grad_out, params)
    _assert_same(ours, reference, torch.float32, what=f"budget {budget}")


def test_columns_and_cached_buffers_stay_within_the_budget() -> None:
    """Each tile's columns fit the budget, and so does what a thread keeps cached between calls."""
    tensors, grad_out, params = _case(batch=4, channels=8, size=(16, 16), dtype=torch.float32)
    budget = 16 * 2**10
    t = [tensors[name] for name in NAMES]
    cached = {}

    def run() -> None:
        with workspace_budget(budget):
            call = _cpu._Call(t[0], t[1], t[2], t[3], *params)
            rows = max(n1 - n0 for n0, n1 in call.tiles)
            cached["tile"] = rows * call.lay.row_size * 4
            _kernel(_cpu, tensors, grad_out, params)
        cached["kept"] = sum(b.numel() * b.element_size() for b in _cpu._workspace.buffers.values())

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert 0 < cached["tile"] <= budget
    assert cached["kept"] <= budget


def test_two_backward_passes_are_bit_identical() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tensors, grad_out, params = _case(
            batch=3,
            channels=64,
            out_channels=8,
            size=(12, 12),
            offset_groups=2,
            dtype=torch.float32,
        )
        first = _kernel(_cpu, tensors, grad_out, params)[1]
        second = _kernel(_cpu, tensors, grad_out, params)[1]
    finally:
        torch.set_num_threads(previous)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("min_channels", [1, 8, 64])
def test_any_scatter_split_gives_the_same_gradients(monkeypatch, min_channels: int) -> None:
    # The input-gradient scatter splits each image's channels among tasks; how finely is a
    # tuning choice. Every split must give torchvision's gradients, and the same bits (each
    # element's sum runs in the same order whichever task owns it).
    tensors, grad_out, params = _case(
        batch=1, channels=130, out_channels=3, size=(6, 5), offset_groups=2, dtype=torch.float32
    )
    reference = _kernel(_cpu, tensors, grad_out, params)
    monkeypatch.setattr(_cpu, "_MIN_CHANNEL_BLOCK", min_channels)
    monkeypatch.setattr(_cpu, "_CHANNEL_BLOCK", max(min_channels, 4))
    lay = _cpu._Call(
        tensors["input"], tensors["offset"], tensors["mask"], tensors["weight"], *params
    ).lay
    assert _cpu._scatter_chunk(lay, lay.pixels) == max(min_channels, 4)  # the split happens
    ours = _kernel(_cpu, tensors, grad_out, params)
    _assert_same(ours, _torchvision(tensors, grad_out, params), torch.float32)
    for name, a, b in zip(NAMES, ours[1], reference[1], strict=True):
        assert torch.equal(a, b), name


def test_any_memory_layout_is_accepted() -> None:
    tensors, grad_out, params = _case(batch=2, channels=6, size=(6, 7))
    reference = _kernel(_cpu, tensors, grad_out, params)
    strided = {
        "input": tensors["input"].contiguous(memory_format=torch.channels_last),
        "offset": tensors["offset"].transpose(2, 3).contiguous().transpose(2, 3),
        "mask": tensors["mask"][:, :, :, :].contiguous(memory_format=torch.channels_last),
        "weight": tensors["weight"].contiguous(memory_format=torch.channels_last),
        "bias": tensors["bias"],
    }
    ours = _kernel(_cpu, strided, grad_out.contiguous(memory_format=torch.channels_last), params)
    _assert_same(ours, reference, torch.float64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_offsets_read_zero_and_get_zero_gradient(bad: float) -> None:
    tensors, grad_out, params = _case(batch=2, channels=4, size=(6, 6))
    poisoned = dict(tensors)
    poisoned["offset"] = tensors["offset"].clone()
    poisoned["offset"][1, 8, 2, 3] = bad  # tap 4 (vertical), image 1, output pixel (2, 3)
    poisoned["offset"][0, 3, 0, 0] = bad  # tap 1 (horizontal), image 0, output pixel (0, 0)
    far = dict(tensors)
    far["offset"] = poisoned["offset"].nan_to_num(nan=1e6, posinf=1e6, neginf=-1e6)
    out, grads = _kernel(_cpu, poisoned, grad_out, params)
    ref_out, ref_grads = _kernel(_cpu, far, grad_out, params)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, g, ref in zip(NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=0, atol=0, msg=name)
    assert grads[1][1, 8:10, 2, 3].abs().sum() == 0 and grads[1][0, 2:4, 0, 0].abs().sum() == 0
    assert grads[2][1, 4, 2, 3] == 0 and grads[2][0, 1, 0, 0] == 0


def test_the_dispatcher_runs_this_kernel_on_cpu_unless_told_otherwise() -> None:
    assert active_kernel("cpu") == "numba"
    with use_kernel("portable", "cpu"):
        assert active_kernel("cpu") == "portable"
    assert active_kernel("cpu") == "numba"
