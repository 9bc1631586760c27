"""Modules over the functional operators, one family per file."""

from deformconv.nn.dcnv3 import DCNv3
from deformconv.nn.dcnv4 import DCNv4
from deformconv.nn.deform_conv import DeformableConv2d, DeformConv2d
from deformconv.nn.depthwise import DepthwiseConv2d
from deformconv.nn.param_groups import offset_param_groups
from deformconv.nn.separable import DeformableSeparableConv2d, SeparableConv2d
from deformconv.nn.spatial import SpatiallySeparableConv2d

__all__ = [
    "DCNv3",
    "DCNv4",
    "DeformConv2d",
    "DeformableConv2d",
    "DeformableSeparableConv2d",
    "DepthwiseConv2d",
    "SeparableConv2d",
    "SpatiallySeparableConv2d",
    "offset_param_groups",
]
