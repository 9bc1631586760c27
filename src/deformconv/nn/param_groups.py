"""Optimizer parameter groups with a separate learning rate for offset branches.

Detection codebases train the offset (and mask) branches of deformable layers with a smaller
learning rate than the rest of the network (mmdetection's ``dcn_offset_lr_mult``, typically 0.1),
because large early offset updates destabilise training.

An offset branch is the ``conv_offset`` convolution of a deformable layer that predicts its own
offsets: :class:`~deformconv.nn.deform_conv.DeformableConv2d` and mmcv's ``DeformConv2dPack`` and
``ModulatedDeformConv2dPack`` of :mod:`deformconv.compat.mmcv` (mmcv's name for it, which
mmdetection's rule also goes by).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deformconv.nn.deform_conv import DeformConv2d

__all__ = ["offset_param_groups"]


def offset_param_groups(
    model: nn.Module, lr: float, offset_lr_mult: float = 0.1, **options: Any
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into the rest and the offset branches.

    Args:
        model: any module; the ``conv_offset`` branches of its deformable layers (see the module
            docstring) form the second group.
        lr: learning rate of the first group.
        offset_lr_mult: factor applied to ``lr`` for the offset branches.
        **options: other per-group options (``weight_decay``, ...) given to both groups.

    Returns:
        A list for ``torch.optim`` constructors: ``[{"params": rest, "lr": lr},
        {"params": offsets, "lr": lr * offset_lr_mult}]`` (the second omitted if empty).

    Example:
        >>> import torch
        >>> from deformconv.nn import DeformableConv2d
        >>> model = torch.nn.Sequential(DeformableConv2d(3, 8, 3), torch.nn.ReLU())
        >>> groups = offset_param_groups(model, lr=0.1)
        >>> [len(g["params"]) for g in groups], groups[1]["lr"]
        ([2, 2], 0.010000000000000002)
        >>> optimizer = torch.optim.SGD(groups, lr=0.1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not offset_lr_mult >= 0:
        raise ValueError(f"offset_lr_mult must be >= 0, got {offset_lr_mult!r}")
    offset_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, DeformConv2d) and isinstance(getattr(m, "conv_offset", None), nn.Module)
        for p in m.conv_offset.parameters()
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    rest = [p for p in trainable if id(p) not in offset_ids]
    offsets = [p for p in trainable if id(p) in offset_ids]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr, **options}]
    if offsets:
        groups.append({"params": offsets, "lr": lr * offset_lr_mult, **options})
    return groups
