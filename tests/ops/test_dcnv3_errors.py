"""Bad arguments to dcnv3 and dcnv4 get a ValueError or TypeError that names the argument, the
expected shape or range and what was received."""

from __future__ import annotations

import pytest
import torch

from deformconv.ops import dcnv3, dcnv4

ARGS = (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)  # kernel_h ... remove_center


def _v3(**changes):
    tensors = {
        "input": torch.zeros(2, 6, 6, 8),
        "offset": torch.zeros(2, 6, 6, 36),
        "mask": torch.zeros(2, 6, 6, 18),
    }
    names = ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h",
             "dilation_w", "group", "group_channels", "offset_scale", "remove_center")  # fmt: skip
    kwargs = dict(zip(names, ARGS, strict=True))
    for k, v in changes.items():
        (tensors if k in tensors else kwargs)[k] = v
    return dcnv3(**tensors, **kwargs)


def _v4(offset_mask=None, **changes):
    om = torch.zeros(2, 6, 6, 56) if offset_mask is None else offset_mask
    args = list(ARGS)
    names = ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h",
             "dilation_w", "group", "group_channels", "offset_scale", "remove_center")  # fmt: skip
    for k, v in changes.items():
        args[names.index(k)] = v
    return dcnv4(torch.zeros(2, 6, 6, 8), om, *args[:-1], 256, args[-1])


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (
            dict(input=torch.zeros(2, 6, 6, 9)),
            ValueError,
            r"input.shape\[3\] \(channels\) must equal group \* group_channels = 2 \* 4 = 8, got 9",
        ),
        (
            dict(input=torch.zeros(2, 8, 6, 6)),
            ValueError,
            r"input.shape\[3\] \(channels\) must equal group \* group_channels = 2 \* 4 = 8, got 6",
        ),
        (
            dict(input=torch.zeros(6, 6, 8)),
            ValueError,
            r"input must be 4-D channels-last \(batch, height, width, group \* group_channels\), "
            r"got shape \(6, 6, 8\)",
        ),
        (
            dict(offset=torch.zeros(2, 6, 6, 18)),
            ValueError,
            r"offset must have shape \(2, 6, 6, 36\) \(batch, out_height, out_width, group \* P \* "
            r"2 = 2 \* 9 \* 2\), got \(2, 6, 6, 18\)",
        ),
        (
            dict(mask=torch.zeros(2, 6, 6, 9)),
            ValueError,
            r"mask must have shape \(2, 6, 6, 18\) \(batch, out_height, out_width, group \* P = 2 "
            r"\* 9\), got \(2, 6, 6, 9\)",
        ),
        (dict(mask=torch.zeros(2, 5, 6, 18)), ValueError, r"mask must have shape \(2, 6, 6, 18\)"),
        (
            dict(remove_center=True, kernel_h=2, kernel_w=2),
            ValueError,
            r"remove_center needs a square kernel of odd size, 3x3 or larger .* got kernel_h=2, "
            r"kernel_w=2",
        ),
        (
            dict(remove_center=True, kernel_h=3, kernel_w=5),
            ValueError,
            r"remove_center needs a square kernel .* got kernel_h=3, kernel_w=5",
        ),
        (
            dict(remove_center=True, kernel_h=1, kernel_w=1),
            ValueError,
            r"remove_center needs a square kernel of odd size, 3x3 or larger",
        ),
        (
            dict(remove_center=2),
            TypeError,
            r"remove_center must be a bool \(or 0 or 1\), got int 2",
        ),
        (dict(kernel_h=0), ValueError, r"kernel_h must be a positive int, got 0"),
        (dict(stride_w=1.5), TypeError, r"stride_w must be an int, got float 1.5"),
        (dict(pad_h=-1), ValueError, r"pad_h must be an int >= 0, got -1"),
        (dict(group=0), ValueError, r"group must be a positive int, got 0"),
        (dict(offset_scale="1"), TypeError, r"offset_scale must be a float, got str '1'"),
        (dict(offset_scale=float("nan")), ValueError, r"offset_scale must be finite, got nan"),
        (
            dict(kernel_h=9, kernel_w=9, pad_h=0, pad_w=0),
            ValueError,
            r"kernel \(9, 9\) with dilation \(1, 1\) does not fit the 6x6 input padded by 0 rows",
        ),
        (
            dict(offset=torch.zeros(2, 6, 6, 36, dtype=torch.float64)),
            TypeError,
            r"offset must have the input's dtype torch.float32, got torch.float64",
        ),
        (dict(mask=[0.0]), TypeError, r"mask must be a torch.Tensor, got list"),
        (
            dict(input=torch.zeros(2, 6, 6, 8, dtype=torch.int64)),
            TypeError,
            r"input must have a floating-point dtype, got torch.int64",
        ),
    ],
)
def test_dcnv3_refuses(changes: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _v3(**changes)


@pytest.mark.parametrize(
    "offset_mask, changes, message",
    [
        (
            torch.zeros(2, 6, 6, 48),
            {},
            r"offset_mask must have shape \(2, 6, 6, 54\) or wider in the last dimension \(batch, "
            r"out_height, out_width, at least group \* P \* 3 = 2 \* 9 \* 3 = 54\), got \(2, 6, 6, 48\)",
        ),
        (torch.zeros(2, 5, 6, 56), {}, r"offset_mask must have shape \(2, 6, 6, 54\) or wider"),
        (torch.zeros(2, 6, 6), {}, r"offset_mask must have shape \(2, 6, 6, 54\) or wider"),
        (
            None,
            dict(remove_center=True, kernel_h=4, kernel_w=4),
            r"remove_center needs a square kernel of odd size",
        ),
        (None, dict(group=3), r"input.shape\[3\] \(channels\) must equal group \* group_channels"),
    ],
)
def test_dcnv4_refuses(offset_mask, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _v4(offset_mask, **changes)


def test_dcnv4_checks_im2col_step() -> None:
    with pytest.raises(ValueError, match=r"im2col_step must be a positive int, got 0"):
        dcnv4(torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 56), *ARGS[:-1], 0, False)


def test_dcnv4_accepts_any_width_from_the_packed_minimum() -> None:
    """Upstream pads the width to a multiple of 8 for its CUDA kernel; any wider width works."""
    for width in (54, 55, 56, 64):
        assert _v4(torch.zeros(2, 6, 6, width)).shape == (2, 6, 6, 8)
