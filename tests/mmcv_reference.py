"""mmcv's DeformConv2dPack and ModulatedDeformConv2dPack forward, written from mmcv's source
(mmcv/ops/deform_conv.py, mmcv/ops/modulated_deform_conv.py) with torchvision's operator: the
independent reference for loading mmcv checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision


def mmcv_pack_forward(
    state_dict: dict, x: torch.Tensor, stride, padding, dilation, modulated: bool
) -> torch.Tensor:
    """The output of an mmcv Pack layer holding ``state_dict`` (keys ``weight``, optional
    ``bias``, ``conv_offset.weight``, ``conv_offset.bias``) for input ``x``."""
    sd = state_dict
    out = F.conv2d(x, sd["conv_offset.weight"], sd["conv_offset.bias"], stride, padding, dilation)
    if not modulated:
        return torchvision.ops.deform_conv2d(x, out, sd["weight"], None, stride, padding, dilation)
    o1, o2, logits = torch.chunk(out, 3, dim=1)
    return torchvision.ops.deform_conv2d(
        x,
        torch.cat((o1, o2), dim=1),
        sd["weight"],
        sd.get("bias"),
        stride,
        padding,
        dilation,
        mask=torch.sigmoid(logits),
    )
