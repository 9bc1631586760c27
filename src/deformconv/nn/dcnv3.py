"""The DCNv3 layer of InternImage (Wang et al. 2023, "InternImage: Exploring Large-Scale Vision
Foundation Models with Deformable Convolutions").

:class:`DCNv3` has the constructor arguments, submodules, parameter names, initialisation and
forward contract of ``DCNv3`` in InternImage's ``ops_dcnv3/modules/dcnv3.py`` (and of its
``DCNv3_pytorch`` twin), so InternImage checkpoints load with ``load_state_dict`` unchanged and
give the same outputs, on any device and without compiling anything. Unlike upstream's CUDA
operator it takes any kernel size and group width (upstream's CUDA kernel prefers powers of 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformconv._validation import check_int
from deformconv.ops import output_size
from deformconv.ops.dcnv3 import dcnv3

__all__ = ["DCNv3"]

_ACTIVATIONS = {
    "ReLU": lambda: nn.ReLU(inplace=True),
    "SiLU": lambda: nn.SiLU(inplace=True),
    "GELU": nn.GELU,
}


class _ToChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def _norm(channels: int, kind: str) -> nn.Sequential:
    """Upstream's ``build_norm_layer(channels, kind, 'channels_first', 'channels_last')``: the
    positions of the norm in the Sequential (``1`` for LN, ``0`` for BN) are in the state_dict
    keys (``dw_conv.1.1.weight`` or ``dw_conv.1.0.running_mean``)."""
    if kind == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    if kind == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), _ToChannelsLast())
    raise ValueError(f"norm_layer must be 'LN' or 'BN', got {kind!r}")


def _activation(kind: str) -> nn.Module:
    if kind not in _ACTIVATIONS:
        raise ValueError(f"act_layer must be one of {', '.join(_ACTIVATIONS)}, got {kind!r}")
    return _ACTIVATIONS[kind]()


def _init_core(
    layer: nn.Module,
    channels: int,
    kernel_size: int,
    stride: int,
    pad: int,
    dilation: int,
    group: int,
    offset_scale: float,
    center_feature_scale: bool,
    remove_center: bool,
) -> int:
    """Check the arguments the DCNv3 and DCNv4 layers share and set them as upstream's
    attributes; returns ``P``, the points per group.

    Example:
        >>> layer = nn.Module()
        >>> _init_core(layer, 64, 3, 1, 1, 1, 4, 1.0, False, True), layer.group_channels
        (8, 16)
    """
    check_int(channels, "channels")
    check_int(group, "group")
    check_int(kernel_size, "kernel_size")
    if channels % group != 0:
        raise ValueError(f"channels must be divisible by group, got {channels} and {group}")
    if not isinstance(remove_center, bool | int) or remove_center not in (0, 1):
        raise TypeError(f"remove_center must be a bool, got {remove_center!r}")
    if remove_center and (kernel_size % 2 == 0 or kernel_size == 1):
        raise ValueError(
            f"remove_center needs an odd kernel_size of 3 or more, got kernel_size={kernel_size}"
        )
    layer.offset_scale = offset_scale
    layer.channels = channels
    layer.kernel_size = kernel_size
    layer.stride = check_int(stride, "stride")
    layer.pad = check_int(pad, "pad", 0)
    layer.dilation = check_int(dilation, "dilation")
    layer.group = group
    layer.group_channels = channels // group
    layer.center_feature_scale = center_feature_scale
    layer.remove_center = int(remove_center)
    return kernel_size * kernel_size - int(remove_center)


def _check_same_size(layer: nn.Module, height: int, width: int) -> None:
    """The layers predict one set of offsets per input pixel (as upstream), so their core must
    keep the spatial size."""
    k, s, p, d = layer.kernel_size, layer.stride, layer.pad, layer.dilation
    out_h, out_w = output_size(height, width, (k, k), (s, s), (p, p), (d, d))
    if (out_h, out_w) != (height, width):
        raise ValueError(
            f"{type(layer).__name__} predicts offsets for every input pixel, so kernel_size={k}, "
            f"stride={s}, pad={p}, dilation={d} must keep the size of its input, but turn "
            f"{height}x{width} into {out_h}x{out_w} (use stride 1 and pad = dilation * "
            "(kernel_size - 1) // 2 with an odd kernel)"
        )


def _center_feature_scale(x: Tensor, weight: Tensor, bias: Tensor, group_channels: int) -> Tensor:
    """Upstream's ``CenterFeatureScaleModule``: a sigmoid gate per group, repeated over the
    group's channels: ``(N, H, W, C) -> (N, H, W, group * group_channels)``."""
    scale = F.linear(x, weight, bias).sigmoid()
    return scale[..., None].repeat(1, 1, 1, 1, group_channels).flatten(-2)


class DCNv3(nn.Module):
    """InternImage's DCNv3 layer: input projection, offsets and a per-group softmax mask predicted
    from a depthwise convolution of the input, the DCNv3 core, output projection.

    Args:
        channels: channels ``C`` of input and output.
        kernel_size: kernel of the core (any size; upstream's CUDA operator takes any odd one).
        dw_kernel_size: kernel of the depthwise convolution (default ``kernel_size``).
        stride: of the core; with ``pad`` and ``dilation`` it must keep the spatial size (the
            offsets are predicted per input pixel, as upstream).
        pad: zero padding of the core.
        dilation: spacing of the core's kernel points.
        group: groups of channels with their own offsets and mask (``C % group == 0``; any
            group width ``C / group``).
        offset_scale: scale of the dilation grid and of the offsets.
        act_layer: ``"GELU"``, ``"ReLU"`` or ``"SiLU"``, after the depthwise convolution.
        norm_layer: ``"LN"`` or ``"BN"``, after the depthwise convolution.
        center_feature_scale: blend the output with the projected input by a learned gate
            (InternImage-H/G).
        remove_center: drop the centre point (odd kernels; InternImage-H/G).

    Shape:
        - input: ``(N, H, W, C)``, channels-last.
        - output: ``(N, H, W, C)``.

    At initialisation the offset and mask branches are zero, so every point starts on the regular
    grid with the uniform mask ``1 / P``.

    Example:
        >>> layer = DCNv3(channels=32, group=2)
        >>> x = torch.rand(2, 7, 7, 32)
        >>> layer(x).shape
        torch.Size([2, 7, 7, 32])
        >>> sorted(k for k in layer.state_dict() if not k.startswith("dw_conv"))[:4]
        ['input_proj.bias', 'input_proj.weight', 'mask.bias', 'mask.weight']
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
    ) -> None:
        super().__init__()
        points = _init_core(
            self, channels, kernel_size, stride, pad, dilation, group, offset_scale,
            center_feature_scale, remove_center,
        )  # fmt: skip
        dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
        self.dw_kernel_size = check_int(dw_kernel_size, "dw_kernel_size")

        self.dw_conv = nn.Sequential(
            nn.Conv2d(
                channels,
                channels,
                kernel_size=dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
            ),
            _norm(channels, norm_layer),
            _activation(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))

    def _reset_parameters(self) -> None:
        """Upstream's initialisation (the name InternImage's model code calls)."""
        for branch in (self.offset, self.mask):
            nn.init.zeros_(branch.weight)
            nn.init.zeros_(branch.bias)
        for proj in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def offsets_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(offset, mask, dw)`` that the layer feeds its core for ``input`` (N, H, W, C):
        offset ``(N, H, W, group * P * 2)``, the softmax mask ``(N, H, W, group * P)`` and the
        depthwise branch's features ``(N, H, W, C)``."""
        n, h, w, _ = input.shape
        dw = self.dw_conv(input.permute(0, 3, 1, 2))
        mask = F.softmax(self.mask(dw).reshape(n, h, w, self.group, -1), -1)
        return self.offset(dw), mask.reshape(n, h, w, -1), dw

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4 or input.shape[3] != self.channels:
            raise ValueError(
                f"input must have shape (N, H, W, {self.channels}) (channels-last), got "
                f"{tuple(input.shape)}"
            )
        _check_same_size(self, input.shape[1], input.shape[2])
        x = self.input_proj(input)
        x_proj = x
        offset, mask, dw = self.offsets_and_mask(input)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        x = dcnv3(
            x, offset, mask.type(x.dtype), k, k, s, s, p, p, d, d, self.group,
            self.group_channels, self.offset_scale, bool(self.remove_center),
        )  # fmt: skip
        if self.center_feature_scale:
            scale = _center_feature_scale(
                dw,
                self.center_feature_scale_proj_weight,
                self.center_feature_scale_proj_bias,
                self.group_channels,
            )
            x = x * (1 - scale) + x_proj * scale
        return self.output_proj(x)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}, "
            f"offset_scale={self.offset_scale}"
        )
