"""Modules over the functional operators, one family per file."""

from deformconv.nn.deform_conv import (
    DeformableConv2d,
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2dPack,
)
from deformconv.nn.depthwise import DepthwiseConv2d
from deformconv.nn.param_groups import offset_param_groups
from deformconv.nn.separable import DeformableSeparableConv2d, SeparableConv2d
from deformconv.nn.spatial import SpatiallySeparableConv2d

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformableConv2d",
    "DeformableSeparableConv2d",
    "DepthwiseConv2d",
    "ModulatedDeformConv2dPack",
    "SeparableConv2d",
    "SpatiallySeparableConv2d",
    "offset_param_groups",
]
