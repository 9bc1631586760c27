"""Exact deformable-convolution layers of other libraries, on deformconv's operator.

One module per library, each holding only that library's names, defaults and layouts:

- :mod:`deformconv.compat.mmcv`: ``DeformConv2d``, ``DeformConv2dPack``,
  ``ModulatedDeformConv2d``, ``ModulatedDeformConv2dPack``, ``deform_conv2d`` and
  ``modulated_deform_conv2d`` of ``mmcv.ops``;
- :mod:`deformconv.compat.detectron2`: ``DeformConv`` and ``ModulatedDeformConv`` of
  ``detectron2.layers``.

torchvision needs no such module: :func:`deformconv.deform_conv2d` and
:class:`deformconv.DeformConv2d` are its drop-ins.
"""

from deformconv.compat import detectron2, mmcv

__all__ = ["detectron2", "mmcv"]
