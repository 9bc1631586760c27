"""Bad arguments to deform_conv2d get errors that name the argument and the expected shape."""

from __future__ import annotations

import pytest
import torch

from deformconv import deform_conv2d


def _args(**changes):
    args = {
        "input": torch.randn(2, 4, 8, 8),
        "offset": torch.randn(2, 18, 8, 8),
        "weight": torch.randn(6, 4, 3, 3),
        "bias": torch.randn(6),
        "stride": 1,
        "padding": 1,
        "dilation": 1,
        "mask": torch.rand(2, 9, 8, 8),
    }
    args.update(changes)
    return args


def test_valid_arguments_pass() -> None:
    assert deform_conv2d(**_args()).shape == (2, 6, 8, 8)


@pytest.mark.parametrize(
    "changes,error,pattern",
    [
        (
            {"offset": torch.randn(2, 17, 8, 8)},
            ValueError,
            r"offset.shape\[1\] must be a positive multiple of 2 \* kernel_height \* kernel_width = 18, got 17",
        ),
        (
            {"offset": torch.randn(2, 0, 8, 8)},
            ValueError,
            r"offset.shape\[1\] must be a positive multiple of .* got 0",
        ),
        (
            {"offset": torch.randn(2, 54, 8, 8), "mask": None},
            ValueError,
            r"offset groups \(3 = offset.shape\[1\] 54 / 18\) must divide in_channels \(4\)",
        ),
        (
            {"offset": torch.randn(2, 18, 7, 8)},
            ValueError,
            r"offset must have shape \(2, 18, 8, 8\), got \(2, 18, 7, 8\)",
        ),
        (
            {"offset": torch.randn(3, 18, 8, 8)},
            ValueError,
            r"offset must have shape \(2, 18, 8, 8\), got \(3, 18, 8, 8\)",
        ),
        (
            {"offset": torch.randn(18, 8, 8)},
            ValueError,
            r"offset must be 4-D .* got shape \(18, 8, 8\)",
        ),
        (
            {"mask": torch.rand(2, 9, 8, 7)},
            ValueError,
            r"mask must have shape \(2, 9, 8, 8\) .* got \(2, 9, 8, 7\)",
        ),
        (
            {"mask": torch.rand(2, 18, 8, 8)},
            ValueError,
            r"mask must have shape \(2, 9, 8, 8\) .* got \(2, 18, 8, 8\)",
        ),
        (
            {"weight": torch.randn(6, 3, 3, 3)},
            ValueError,
            r"weight.shape\[1\] \(3\) must divide in_channels \(4\)",
        ),
        (
            {"weight": torch.randn(5, 2, 3, 3), "bias": None},
            ValueError,
            r"out_channels \(weight.shape\[0\] = 5\) must be divisible by groups \(2",
        ),
        ({"bias": torch.randn(5)}, ValueError, r"bias must have shape \(6,\), got \(5\)"),
        (
            {"input": torch.randn(4, 8, 8)},
            ValueError,
            r"input must be 4-D \(batch, in_channels, height, width\), got shape \(4, 8, 8\)",
        ),
        (
            {"weight": torch.randn(6, 4, 9)},
            ValueError,
            r"weight must be 4-D .* got shape \(6, 4, 9\)",
        ),
        (
            {"weight": torch.randn(6, 4, 11, 11), "padding": 1},
            ValueError,
            r"kernel \(11, 11\) with dilation \(1, 1\) is larger than the padded input \(10, 10\)",
        ),
        (
            {"dilation": 5, "padding": 0},
            ValueError,
            r"kernel \(3, 3\) with dilation \(5, 5\) is larger than the padded input \(8, 8\)",
        ),
        ({"stride": 0}, ValueError, r"stride must be >= 1, got 0"),
        ({"padding": -1}, ValueError, r"padding must be >= 0, got -1"),
        ({"dilation": (1, 2, 3)}, TypeError, r"dilation must be an int or a pair of ints"),
        ({"stride": 1.5}, TypeError, r"stride must be an int or a pair of ints, got 1.5"),
        ({"input": [[1.0]]}, TypeError, r"input must be a torch.Tensor, got list"),
        ({"mask": "ones"}, TypeError, r"mask must be a torch.Tensor, got str"),
        (
            {"offset": torch.randn(2, 18, 8, 8, dtype=torch.float64)},
            TypeError,
            r"offset must have the input's dtype torch.float32, got torch.float64",
        ),
        (
            {"input": torch.ones(2, 4, 8, 8, dtype=torch.int64)},
            TypeError,
            r"input must have a floating-point dtype, got torch.int64",
        ),
        (
            {"weight": torch.randn(6, 4, 3, 3, device="meta")},
            ValueError,
            r"weight must be on the input's device cpu, got meta",
        ),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_arguments(changes: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        deform_conv2d(**_args(**changes))
