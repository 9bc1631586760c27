"""Module inspection: an existing convolution layer described as a
:class:`~deformconv.tools.conv_spec.ConvSpec`, for
:func:`~deformconv.tools.model_cost.model_cost` and the factorizations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deformconv._validation import Pair
from deformconv.nn.deform_conv import DeformConv2d
from deformconv.nn.depthwise import DepthwiseConv2d
from deformconv.nn.separable import DeformableSeparableConv2d, SeparableConv2d
from deformconv.nn.spatial import SpatiallySeparableConv2d
from deformconv.tools.conv_spec import ConvSpec

__all__ = ["spec_from_module"]


def spec_from_module(module: nn.Module) -> ConvSpec:
    """Describe a convolution layer as a :class:`~deformconv.tools.conv_spec.ConvSpec`.

    Understands ``nn.Conv2d`` (and :class:`~deformconv.nn.depthwise.DepthwiseConv2d`),
    ``nn.ConvTranspose2d``, the separable layers of :mod:`deformconv.nn`, deformconv's
    ``DeformableConv2d`` and ``DeformConv2d`` and torchvision's ``DeformConv2d``. A layer whose
    offsets come from outside (``DeformConv2d``) is described as deformable v1 with one offset
    group; :func:`~deformconv.tools.model_cost.model_cost` corrects both from the offsets and
    mask it is called with.

    Args:
        module: the layer.

    Returns:
        Its :class:`~deformconv.tools.conv_spec.ConvSpec`.

    Raises:
        TypeError: for any other module.

    Example:
        >>> spec_from_module(SeparableConv2d(16, 32, 3, bias=False))
        ConvSpec(kind='separable', in_channels=16, out_channels=32, kernel_size=(3, 3), bias=False)
    """
    if isinstance(module, SeparableConv2d):
        dw = module.depthwise
        return ConvSpec(
            "separable",
            dw.in_channels,
            module.out_channels,
            **_geometry(dw),
            depth_multiplier=dw.depth_multiplier,
            bias=module.pointwise.bias is not None,
        )
    if isinstance(module, DeformableSeparableConv2d):
        dw = module.depthwise
        return ConvSpec(
            "deformable_separable",
            dw.in_channels,
            module.out_channels,
            **_geometry(dw),
            depth_multiplier=module.depth_multiplier,
            bias=module.pointwise.bias is not None,
            offset_groups=dw.offset_groups,
            modulated=dw.modulated,
        )
    if isinstance(module, SpatiallySeparableConv2d):
        padding = module.padding if module.padding == "same" else _spatial_padding(module)
        return ConvSpec(
            "spatial",
            module.in_channels,
            module.out_channels,
            **{**_geometry(module), "padding": padding},
            bias=module.horizontal.bias is not None,
            per_channel=module.per_channel,
            mid_channels=module.mid_channels,
        )
    if isinstance(module, DepthwiseConv2d):
        return ConvSpec(
            "depthwise",
            module.in_channels,
            module.out_channels,
            **_geometry(module),
            depth_multiplier=module.depth_multiplier,
            bias=module.bias is not None,
        )
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        transposed = isinstance(module, nn.ConvTranspose2d)
        return ConvSpec(
            "transposed" if transposed else "conv",
            module.in_channels,
            module.out_channels,
            **_geometry(module),
            groups=module.groups,
            output_padding=module.output_padding if transposed else 0,  # type: ignore[arg-type]
            bias=module.bias is not None,
        )
    if isinstance(module, DeformConv2d) or _is_torchvision_deform_conv(module):
        # Layers that predict their own offsets (DeformableConv2d and the compat classes) hold
        # the branch named conv_offset, and say offset_groups and modulated as it does.
        own_branch = hasattr(module, "conv_offset")
        return ConvSpec(
            "deformable",
            module.in_channels,  # type: ignore[arg-type]
            module.out_channels,  # type: ignore[arg-type]
            **_geometry(module),
            groups=module.groups,  # type: ignore[arg-type]
            bias=module.bias is not None,
            offset_groups=module.offset_groups if own_branch else 1,  # type: ignore[arg-type]
            modulated=module.modulated if own_branch else False,  # type: ignore[arg-type]
            offset_branch=own_branch,
        )
    raise TypeError(
        "module must be a 2-D convolution layer (nn.Conv2d, nn.ConvTranspose2d, a deformconv.nn "
        f"layer or torchvision.ops.DeformConv2d), got {type(module).__name__}"
    )


def _geometry(layer: nn.Module) -> dict[str, Any]:
    """A layer's ``kernel_size``, ``stride``, ``padding`` and ``dilation``, as ConvSpec takes them."""
    return {name: getattr(layer, name) for name in ("kernel_size", "stride", "padding", "dilation")}


def _spatial_padding(module: SpatiallySeparableConv2d) -> Pair:
    """The ``(ph, pw)`` split between the vertical pass (rows) and the horizontal one (columns)."""
    return module.vertical.padding[0], module.horizontal.padding[1]  # type: ignore[index, return-value]


def _is_torchvision_deform_conv(module: nn.Module) -> bool:
    """``module`` is a ``torchvision.ops.DeformConv2d`` (torchvision is optional, so the class
    is matched by name instead of imported)."""
    cls = type(module)
    return any(
        c.__name__ == "DeformConv2d" and c.__module__.startswith("torchvision.")
        for c in cls.__mro__
    )


@contextlib.contextmanager
def _inspection_run(model: nn.Module, handles: list[RemovableHandle]) -> Iterator[None]:
    """Context of one inspection run of ``model``: eval mode and no gradients inside; on the way
    out, even on an error, the hooks in ``handles`` are removed and every module's training flag
    is put back as it was."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
