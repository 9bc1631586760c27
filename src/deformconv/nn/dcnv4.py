"""The DCNv4 layer (Xiong et al. 2024, "Efficient Deformable ConvNets: Rethinking Dynamic and
Sparse Operator for Vision Applications").

:class:`DCNv4` has the constructor arguments, submodules, parameter names, initialisation and
forward contract of ``DCNv4`` in the DCNv4 package (``DCNv4_op/DCNv4/modules/dcnv4.py``), so its
checkpoints (FlashInternImage) load with ``load_state_dict`` unchanged and give the same
outputs, on any device and without compiling anything. Upstream's CUDA operator needs 3x3 kernels
and a group width that is a multiple of 16; this layer takes any kernel size and group width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from deformconv._validation import check_int
from deformconv.nn.dcnv3 import _center_feature_scale, _check_same_size, _init_core
from deformconv.ops.dcnv3 import dcnv4

__all__ = ["DCNv4"]

# Keyword arguments InternImage-style model code passes to any core operator; upstream's DCNv4
# takes and ignores them (**kwargs), and so does this layer. Any other name is an error.
_IGNORED = ("act_layer", "norm_layer")


class DCNv4(nn.Module):
    """DCNv4: a value projection, offsets and mask predicted together by one linear layer
    (``offset_mask``, optionally after a depthwise convolution), the DCNv4 core (no softmax)
    and an output projection.

    Args:
        channels: channels ``C`` of input and output.
        kernel_size: kernel of the core (any size).
        stride: of the core; with ``pad`` and ``dilation`` it must keep the spatial size (the
            offsets are predicted per input pixel, as upstream).
        pad: zero padding of the core.
        dilation: spacing of the core's kernel points.
        group: groups of channels with their own offsets and mask (any group width).
        offset_scale: scale of the dilation grid and of the offsets.
        dw_kernel_size: when set, ``offset_mask`` reads a depthwise convolution of the input.
        center_feature_scale: blend the core's output with the projected input by a learned
            gate computed from the core's output (as upstream).
        remove_center: drop the centre point (odd kernels).
        output_bias: give ``output_proj`` a bias.
        without_pointwise: no ``value_proj`` / ``output_proj``.
        **kwargs: ``act_layer`` and ``norm_layer`` are accepted and ignored, as upstream.

    Shape:
        - input: ``(N, L, C)`` with ``L = H * W``, and ``shape=(H, W)`` (default: square,
          ``H = W = int(L ** 0.5)``).
        - output: ``(N, L, C)``.

    The ``offset_mask`` layer's width is the ``group * P * 3`` offsets and mask values rounded
    up to a multiple of 8, as upstream. It starts at zero, so the core's output (offsets 0,
    mask 0) is zero at initialisation.

    Example:
        >>> layer = DCNv4(channels=32, group=2)
        >>> x = torch.rand(2, 6 * 5, 32)
        >>> layer(x, shape=(6, 5)).shape
        torch.Size([2, 30, 32])
        >>> layer.offset_mask.out_features  # 2 groups * 9 points * 3 = 54, rounded up to 56
        56
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - set(_IGNORED))
        if unknown:
            raise TypeError(f"DCNv4 got unexpected keyword arguments: {', '.join(unknown)}")
        points = _init_core(
            self, channels, kernel_size, stride, pad, dilation, group, offset_scale,
            center_feature_scale, remove_center,
        )  # fmt: skip
        self.dw_kernel_size = dw_kernel_size
        self.without_pointwise = without_pointwise

        self.K = group * points
        if dw_kernel_size is not None:
            check_int(dw_kernel_size, "dw_kernel_size")
            self.offset_mask_dw = nn.Conv2d(
                channels,
                channels,
                dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
            )
        self.offset_mask = nn.Linear(channels, int(math.ceil((self.K * 3) / 8) * 8))
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        self._reset_parameters()
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))

    def _reset_parameters(self) -> None:
        """Upstream's initialisation (the name FlashInternImage's model code calls)."""
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.zeros_(self.output_proj.bias)

    def _shape(self, input: Tensor, shape: tuple[int, int] | None) -> tuple[int, int]:
        if input.dim() != 3 or input.shape[2] != self.channels:
            raise ValueError(
                f"input must have shape (N, L, {self.channels}), got {tuple(input.shape)}"
            )
        length = input.shape[1]
        if shape is None:
            side = int(length**0.5)
            height, width = side, side
        else:
            height, width = (check_int(v, "shape") for v in shape)
        if height * width != length:
            raise ValueError(
                f"shape (H, W) must have H * W = L = {length}, got {(height, width)}"
                + ("" if shape is not None else " (L is not a square: pass shape)")
            )
        return height, width

    def forward(self, input: Tensor, shape: tuple[int, int] | None = None) -> Tensor:
        height, width = self._shape(input, shape)
        n, length, channels = input.shape
        _check_same_size(self, height, width)
        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(n, height, width, -1)
        if self.dw_kernel_size is not None:
            planes = input.view(n, height, width, channels).permute(0, 3, 1, 2)
            offset_mask_input = self.offset_mask_dw(planes).permute(0, 2, 3, 1).view(n, length, -1)
        else:
            offset_mask_input = input
        offset_mask = self.offset_mask(offset_mask_input).reshape(n, height, width, -1)
        x_proj = x
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        x = dcnv4(
            x, offset_mask, k, k, s, s, p, p, d, d, self.group, self.group_channels,
            self.offset_scale, 256, bool(self.remove_center),
        )  # fmt: skip
        if self.center_feature_scale:
            scale = _center_feature_scale(
                x,
                self.center_feature_scale_proj_weight,
                self.center_feature_scale_proj_bias,
                self.group_channels,
            )
            x = x * (1 - scale) + x_proj * scale
        x = x.view(n, length, -1)
        return x if self.without_pointwise else self.output_proj(x)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}, "
            f"offset_scale={self.offset_scale}"
        )
