"""mmcv's deformable convolution, exactly: ``mmcv.ops.DeformConv2d``, ``DeformConv2dPack``,
``ModulatedDeformConv2d``, ``ModulatedDeformConv2dPack`` and the functions ``deform_conv2d`` and
``modulated_deform_conv2d``, with mmcv's argument names, order and defaults, parameter names,
initialisation, forward signatures and numbers (``mmcv/ops/deform_conv.py`` and
``mmcv/ops/modulated_deform_conv.py``), running on deformconv's operator: CPU and CUDA, forward
and backward, under autocast and ``torch.compile``.

Swap ``from mmcv.ops import ModulatedDeformConv2dPack`` for
``from deformconv.compat.mmcv import ModulatedDeformConv2dPack``: a checkpoint loads through the
ordinary ``load_state_dict`` (the legacy ``conv_offset_mask.`` keys too, by mmcv's version rule),
and outputs and gradients are mmcv's, including its mask ``sigmoid(logit)``, which starts at 0.5.

What differs from mmcv, on purpose:

- ``im2col_step`` is accepted, checked and stored but changes nothing: deformconv's kernels walk
  the batch in chunks chosen by the workspace budget
  (:func:`deformconv.ops.set_workspace_budget`), so any batch size works (mmcv asserts that
  ``im2col_step`` divides the batch).
- Bad arguments raise a ``ValueError`` or ``TypeError`` that names the argument, where mmcv
  asserts; an input with the wrong number of channels is refused before the offset branch runs.
- ``DeformConv2d`` has a ``bias`` attribute that is ``None`` (mmcv's has none at all).
- Checkpoints whose offset branch sits beside the layer (``conv2_offset.weight`` for ``conv2``,
  mmdetection 1.x) need their keys renamed to ``conv2.conv_offset.weight``: mmcv's rule for them
  never fires under PyTorch 2, whose ``load_state_dict`` shows a layer only its own keys.

mmcv's offset gradient is kept too: a tap that samples exactly on row or column -1 (every
border tap of a padded layer whose offsets are zero, as at initialisation) gets no offset
gradient in mmcv's kernels, and gets the gradient towards the image in torchvision's and in
:func:`deformconv.deform_conv2d`; these layers and functions follow mmcv.

As in mmcv, the functions cast ``input`` to ``offset``'s dtype and ``weight`` (``mask``,
``bias``) to the input's, mmcv's way of mixing float16 offsets with float32 layers; under
``torch.autocast`` every tensor is cast to the autocast dtype anyway.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from deformconv._validation import check_divisor, check_int
from deformconv.compat._common import check_group_counts, without_edge_gradient
from deformconv.nn.deform_conv import DeformConv2d as _DeformConv2d
from deformconv.ops.deform_conv import deform_conv2d as _deform_conv2d

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "deform_conv2d",
    "modulated_deform_conv2d",
]

IntPair = int | tuple[int, int]


def _same_dtypes(offset: Tensor, input: Tensor, *others: Tensor | None) -> list[Any]:
    """mmcv's casts: ``input`` to ``offset``'s dtype, then the others to the input's."""
    if not all(
        isinstance(t, Tensor) for t in (offset, input, *(o for o in others if o is not None))
    ):
        return [input, *others]  # deformconv.deform_conv2d names what is not a tensor
    input = input.type_as(offset)
    return [input, *(None if t is None else t.type_as(input) for t in others)]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
    bias: bool = False,
    im2col_step: int = 32,
) -> Tensor:
    """mmcv's ``deform_conv2d`` (``DeformConv2dFunction.apply``): deformable convolution v1.

    Args:
        input (Tensor[B, C_in, H, W]): the input.
        offset (Tensor[B, 2 * deform_groups * kh * kw, H_out, W_out]): ``(dy, dx)`` per tap.
        weight (Tensor[C_out, C_in / groups, kh, kw]): the convolution's weight.
        stride: int or pair.
        padding: int or pair.
        dilation: int or pair.
        groups: weight groups; must be ``C_in / weight.shape[1]``.
        deform_groups: offset groups; must match ``offset.shape[1]``.
        bias: must be ``False``, as in mmcv.
        im2col_step: accepted and ignored (see the module docstring).

    Returns:
        Tensor[B, C_out, H_out, W_out]

    Example:
        >>> x = torch.rand(2, 4, 6, 6)
        >>> out = deform_conv2d(x, torch.zeros(2, 18, 6, 6), torch.rand(5, 4, 3, 3), 1, 1)
        >>> out.shape
        torch.Size([2, 5, 6, 6])
    """
    if bias is not False:
        raise ValueError(f"bias must be False, as mmcv's deform_conv2d has none; got {bias!r}")
    check_int(im2col_step, "im2col_step")
    check_group_counts(input, offset, None, weight, groups, deform_groups, "deform_groups")
    input, weight = _same_dtypes(offset, input, weight)
    offset = without_edge_gradient(offset, weight, stride, padding, dilation)
    return _deform_conv2d(input, offset, weight, stride=stride, padding=padding, dilation=dilation)


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """mmcv's ``modulated_deform_conv2d`` (``ModulatedDeformConv2dFunction.apply``): DCNv2.

    Args:
        input (Tensor[B, C_in, H, W]): the input.
        offset (Tensor[B, 2 * deform_groups * kh * kw, H_out, W_out]): ``(dy, dx)`` per tap.
        mask (Tensor[B, deform_groups * kh * kw, H_out, W_out]): modulation of each tap.
        weight (Tensor[C_out, C_in / groups, kh, kw]): the convolution's weight.
        bias (Tensor[C_out], optional): added to the output.
        stride: int or pair.
        padding: int or pair.
        dilation: int or pair.
        groups: weight groups; must be ``C_in / weight.shape[1]``.
        deform_groups: offset groups; must match ``offset.shape[1]``.

    Returns:
        Tensor[B, C_out, H_out, W_out]

    Example:
        >>> x = torch.rand(1, 2, 5, 5)
        >>> offset, mask = torch.zeros(1, 8, 6, 6), torch.full((1, 4, 6, 6), 0.5)
        >>> modulated_deform_conv2d(x, offset, mask, torch.ones(1, 2, 2, 2), None, 1, 1).shape
        torch.Size([1, 1, 6, 6])
    """
    check_group_counts(input, offset, mask, weight, groups, deform_groups, "deform_groups")
    input, weight, bias, mask = _same_dtypes(offset, input, weight, bias, mask)
    offset = without_edge_gradient(offset, weight, stride, padding, dilation)
    return _deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _deform_groups(deformable_groups: int | None, deform_groups: int, cls: str) -> int:
    """mmcv's deprecated spelling ``deformable_groups``, accepted with its warning."""
    if deformable_groups is None:
        return deform_groups
    if deform_groups != 1:
        raise ValueError(
            f"give deform_groups only: deformable_groups is its deprecated name, got "
            f"deform_groups={deform_groups} and deformable_groups={deformable_groups}"
        )
    warnings.warn(
        f'"deformable_groups" is deprecated in {cls}, please use "deform_groups" instead',
        DeprecationWarning,
        stacklevel=3,
    )
    return deformable_groups


def _offset_branch(layer: _MmcvLayer, per_tap: int) -> nn.Conv2d:
    """mmcv's ``conv_offset``: ``per_tap`` channels per tap and offset group (2 for offsets,
    3 with the mask logits), with the layer's geometry and a bias."""
    kh, kw = layer.kernel_size
    return nn.Conv2d(
        layer.in_channels,
        layer.deform_groups * per_tap * kh * kw,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=True,
    )


class _MmcvLayer(_DeformConv2d):
    """What mmcv's two layers share: ``deform_groups`` and the attributes of ``nn.Conv2d`` that
    mmcv adds."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
        groups: int,
        deform_groups: int,
        bias: bool,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.deform_groups = check_divisor(
            deform_groups, "deform_groups", in_channels, "in_channels"
        )
        # mmcv sets these "to enable compatibility with nn.Conv2d"
        self.transposed = False
        self.output_padding = (0,)

    @property
    def offset_groups(self) -> int:
        """``deform_groups`` under deformconv's name."""
        return self.deform_groups

    def extra_repr(self) -> str:
        return super().extra_repr() + f", deform_groups={self.deform_groups}"


class DeformConv2d(_MmcvLayer):
    """mmcv's ``DeformConv2d``: deformable convolution v1 whose offsets come from the caller.

    No bias; the weight starts as ``kaiming_uniform_(nonlinearity="relu")``, as in mmcv.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: int or pair.
        stride: int or pair (default 1).
        padding: int or pair (default 0).
        dilation: int or pair (default 1).
        groups: weight groups; must divide both channel counts.
        deform_groups: offset groups; must divide ``in_channels``.
        bias: must be false, as in mmcv.
        im2col_step: accepted and stored; changes nothing (see the module docstring).
        deformable_groups: mmcv's deprecated name of ``deform_groups`` (keyword only).

    Shape:
        - x: ``(B, in_channels, H, W)``
        - offset: ``(B, 2 * deform_groups * kh * kw, H_out, W_out)``
        - output: ``(B, out_channels, H_out, W_out)``

    Example:
        >>> layer = DeformConv2d(4, 6, 3, padding=1, deform_groups=2)
        >>> layer(torch.rand(2, 4, 8, 8), torch.zeros(2, 36, 8, 8)).shape
        torch.Size([2, 6, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
        *,
        deformable_groups: int | None = None,
    ) -> None:
        deform_groups = _deform_groups(deformable_groups, deform_groups, type(self).__name__)
        if bias:
            raise ValueError(f"bias={bias!r} is not supported in DeformConv2d (mmcv's has none)")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deform_groups,
            False,
        )
        self.im2col_step = check_int(im2col_step, "im2col_step")

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input(x)
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
            False,
            self.im2col_step,
        )


class DeformConv2dPack(DeformConv2d):
    """mmcv's ``DeformConv2dPack`` (registered there as ``"DCN"``): DCNv1 that predicts its own
    offsets with a zero-initialised convolution ``conv_offset`` of the layer's geometry.

    Same arguments as :class:`DeformConv2d`. A new layer is the plain convolution (offsets 0).

    Shape:
        - x: ``(B, in_channels, H, W)``
        - output: ``(B, out_channels, H_out, W_out)``

    Example:
        >>> layer = DeformConv2dPack(4, 6, 3, padding=1)
        >>> sorted(layer.state_dict())
        ['conv_offset.bias', 'conv_offset.weight', 'weight']
        >>> x = torch.rand(1, 4, 8, 8)
        >>> plain = torch.nn.functional.conv2d(x, layer.weight, padding=1)
        >>> torch.allclose(layer(x), plain, atol=1e-5)
        True
    """

    _version = 2
    modulated = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = _offset_branch(self, 2)
        self.init_offset()

    def init_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input(x)
        return super().forward(x, self.conv_offset(x))


class ModulatedDeformConv2d(_MmcvLayer):
    """mmcv's ``ModulatedDeformConv2d``: DCNv2 whose offsets and mask come from the caller.

    The weight starts uniform in ``±1 / sqrt(in_channels * kh * kw)`` and the bias at zero
    (mmcv's ``init_weights``).

    Args:
        in_channels: as :class:`DeformConv2d`.
        out_channels: as :class:`DeformConv2d`.
        kernel_size: as :class:`DeformConv2d`.
        stride: as :class:`DeformConv2d`.
        padding: as :class:`DeformConv2d`.
        dilation: as :class:`DeformConv2d`.
        groups: as :class:`DeformConv2d`.
        deform_groups: offset groups; must divide ``in_channels``.
        bias: learn a bias (default ``True``).
        deformable_groups: mmcv's deprecated name of ``deform_groups`` (keyword only).

    Shape:
        - x: ``(B, in_channels, H, W)``
        - offset: ``(B, 2 * deform_groups * kh * kw, H_out, W_out)``
        - mask: ``(B, deform_groups * kh * kw, H_out, W_out)``
        - output: ``(B, out_channels, H_out, W_out)``

    Example:
        >>> layer = ModulatedDeformConv2d(4, 6, 3, padding=1)
        >>> x, offset, mask = torch.rand(2, 4, 8, 8), torch.zeros(2, 18, 8, 8), torch.ones(2, 9, 8, 8)
        >>> layer(x, offset, mask).shape
        torch.Size([2, 6, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool | str = True,
        *,
        deformable_groups: int | None = None,
    ) -> None:
        deform_groups = _deform_groups(deformable_groups, deform_groups, type(self).__name__)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deform_groups,
            bool(bias),
        )

    def reset_parameters(self) -> None:
        self.init_weights()

    def init_weights(self) -> None:
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input(x)
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
        )


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2dPack`` (registered there as ``"DCNv2"``): DCNv2 that
    predicts its offsets and mask with a zero-initialised convolution ``conv_offset``.

    Same arguments as :class:`ModulatedDeformConv2d`. The branch's ``3 * deform_groups * kh * kw``
    channels are split in three: the first two thirds are the offsets, the last the mask logits,
    and the mask is ``sigmoid(logit)``, so a new layer computes half the plain convolution (plus
    the bias). ``load_state_dict`` also takes the legacy keys ``conv_offset_mask.weight`` and
    ``conv_offset_mask.bias`` of state_dicts saved before mmcv's version 2 of the layer.

    Shape:
        - x: ``(B, in_channels, H, W)``
        - output: ``(B, out_channels, H_out, W_out)``

    Example:
        >>> layer = ModulatedDeformConv2dPack(4, 6, 3, padding=1)
        >>> x = torch.rand(1, 4, 8, 8)
        >>> half = torch.nn.functional.conv2d(x, layer.weight, padding=1) / 2 + layer.bias.view(6, 1, 1)
        >>> torch.allclose(layer(x), half, atol=1e-5)
        True
        >>> legacy = {k.replace("conv_offset.", "conv_offset_mask."): v
        ...           for k, v in layer.state_dict().items()}
        >>> ModulatedDeformConv2dPack(4, 6, 3, padding=1).load_state_dict(legacy)
        <All keys matched successfully>
    """

    _version = 2
    modulated = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = _offset_branch(self, 3)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        # The first call comes from the parent's constructor, before the branch exists.
        if hasattr(self, "conv_offset"):
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input(x)
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return super().forward(x, offset, mask)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        if version is None or version < 2:
            # Before version 2 the branch was called conv_offset_mask (mmdetection 1.x).
            for name in ("weight", "bias"):
                new, old = f"{prefix}conv_offset.{name}", f"{prefix}conv_offset_mask.{name}"
                if new not in state_dict and old in state_dict:
                    state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
