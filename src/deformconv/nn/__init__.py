"""Modules over the functional operators, one family per file."""

from deformconv.nn.deform_conv import (
    DeformableConv2d,
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2dPack,
)
from deformconv.nn.param_groups import offset_param_groups

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformableConv2d",
    "ModulatedDeformConv2dPack",
    "offset_param_groups",
]
