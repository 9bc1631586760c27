"""deformconv: deformable convolution (v1 and v2) and the convolution family for PyTorch.

``deformconv.deform_conv2d`` is a drop-in for ``torchvision.ops.deform_conv2d`` and
``deformconv.DeformConv2d`` for ``torchvision.ops.DeformConv2d``; ``deformconv.DeformConv2dPack``
and ``deformconv.ModulatedDeformConv2dPack`` are mmcv's layers, exactly
(:mod:`deformconv.compat.mmcv`, beside detectron2's in :mod:`deformconv.compat.detectron2`).
"""

from deformconv import compat, nn, ops
from deformconv.compat.mmcv import DeformConv2dPack, ModulatedDeformConv2dPack
from deformconv.nn import DeformableConv2d, DeformConv2d
from deformconv.ops import deform_conv2d

__version__ = "0.1.0"

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformableConv2d",
    "ModulatedDeformConv2dPack",
    "__version__",
    "compat",
    "deform_conv2d",
    "nn",
    "ops",
]
