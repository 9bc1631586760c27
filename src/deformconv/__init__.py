"""deformconv: deformable convolution (v1 and v2) and the convolution family for PyTorch.

``deformconv.deform_conv2d`` is a drop-in for ``torchvision.ops.deform_conv2d`` and
``deformconv.DeformConv2d`` for ``torchvision.ops.DeformConv2d``.
"""

from deformconv import nn, ops
from deformconv.nn import (
    DeformableConv2d,
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2dPack,
)
from deformconv.ops import deform_conv2d

__version__ = "0.1.0"

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformableConv2d",
    "ModulatedDeformConv2dPack",
    "__version__",
    "deform_conv2d",
    "nn",
    "ops",
]
