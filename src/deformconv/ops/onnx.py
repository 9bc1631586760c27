"""ONNX export of deformable convolution as the standard ``DeformConv`` operator (opset 19), and
of DCNv3/DCNv4 as ``GridSample`` (opset 16) with reshapes and elementwise operators.

``torch.onnx.export(..., dynamo=True)`` does not know the custom operator
``deformconv::deform_conv2d``; :func:`onnx_translation_table` tells it, and :func:`export_onnx`
is ``torch.onnx.export`` with that table and opset 19 filled in. The exported graph runs in ONNX
Runtime (and any runtime that implements ``DeformConv``) with no custom operator library.
Needs the ``onnx`` extra: ``pip install "deformconv[onnx]"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["export_onnx", "onnx_translation_table"]

OPSET = 19


def onnx_translation_table() -> dict[Any, Callable[..., Any]]:
    """The ``custom_translation_table`` entry for ``torch.onnx.export(dynamo=True)``.

    Example:
        >>> table = onnx_translation_table()
        >>> sorted(str(op) for op in table)
        ['deformconv.dcnv3.default', 'deformconv.dcnv4.default', 'deformconv.deform_conv2d.default']
    """
    try:
        from onnxscript import opset19 as op
    except ImportError as error:
        raise ImportError(
            "ONNX export needs onnxscript and onnx: pip install 'deformconv[onnx]'"
        ) from error

    def deform_conv2d(
        input,
        offset,
        mask,
        weight,
        bias,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dilation_h: int,
        dilation_w: int,
    ):
        kh, kw = weight.shape[2], weight.shape[3]
        return op.DeformConv(
            input,
            weight,
            offset,
            bias,
            mask,
            dilations=[dilation_h, dilation_w],
            group=input.shape[1] // weight.shape[1],
            kernel_shape=[kh, kw],
            offset_group=offset.shape[1] // (2 * kh * kw),
            pads=[pad_h, pad_w, pad_h, pad_w],
            strides=[stride_h, stride_w],
        )

    return {torch.ops.deformconv.deform_conv2d.default: deform_conv2d, **_dcnv_translations(op)}


def _dcnv_translations(op: Any) -> dict[Any, Callable[..., Any]]:
    """DCNv3 and DCNv4 as the graph of their grid_sample formulation (InternImage's
    ``dcnv3_core_pytorch``): per group, ``GridSample`` (bilinear, zeros outside, align_corners
    0) of the input at every point, times the mask, summed over the points. The sampling grid
    is the offsets times a constant plus a constant (the regular points, normalised), so the
    input's height and width and the output's must be static; the batch may be dynamic."""
    import numpy as np
    from onnxscript import ir

    from deformconv.ops._dcnv3_geometry import operator_sampling

    def const(array: np.ndarray, like: Any) -> Any:
        return op.Constant(value=ir.tensor(array.astype(like.dtype.numpy())))

    def ints(*values: int) -> Any:
        return op.Constant(value_ints=list(values))

    def core(input, offsets, masks, s):
        """offsets (N, Q, G, P, 2) and masks (N, Q, G, P) reshaped; output (N, Ho, Wo, C)."""
        g, d, p, q = s.group, s.group_channels, s.points, s.pixels
        planes = op.Reshape(input, ints(-1, s.height, s.width, g, d))
        planes = op.Reshape(
            op.Transpose(planes, perm=[0, 3, 4, 1, 2]), ints(-1, d, s.height, s.width)
        )
        tap_x, tap_y = (np.asarray(t, dtype=np.float64) for t in s.taps())
        ys = np.repeat(np.arange(s.out_h) * s.stride_h + s.origin_y, s.out_w)
        xs = np.tile(np.arange(s.out_w) * s.stride_w + s.origin_x, s.out_h)
        base = np.stack(
            (xs[:, None] + tap_x * s.offset_scale, ys[:, None] + tap_y * s.offset_scale), axis=-1
        )[None]  # (1, Q, P, 2): the regular points, (x, y) pairs as the offsets
        size = np.array([s.width, s.height], dtype=np.float64)
        # grid_sample's frame (align_corners=False): pixel k of n sits at (2k + 1) / n - 1.
        grid = op.Transpose(offsets, perm=[0, 2, 1, 3, 4])
        grid = op.Reshape(grid, ints(-1, q, p, 2))
        grid = op.Add(
            op.Mul(grid, const(2 * s.offset_scale / size, input)),
            const((2 * base + 1) / size - 1, input),
        )
        samples = op.GridSample(
            planes, grid, mode="bilinear", padding_mode="zeros", align_corners=0
        )
        weights = op.Reshape(op.Transpose(masks, perm=[0, 2, 1, 3]), ints(-1, 1, q, p))
        out = op.ReduceSum(op.Mul(samples, weights), ints(3), keepdims=0)
        out = op.Transpose(op.Reshape(out, ints(-1, g * d, q)), perm=[0, 2, 1])
        return op.Reshape(out, ints(-1, s.out_h, s.out_w, g * d))

    def sampling(input, offset, params, packed):
        return operator_sampling(input.shape[1], input.shape[2], offset.shape[3], params, packed)

    def dcnv3(input, offset, mask, *params):
        s = sampling(input, offset, params, packed=False)
        g, p, q = s.group, s.points, s.pixels
        offsets = op.Reshape(offset, ints(-1, q, g, p, 2))
        return core(input, offsets, op.Reshape(mask, ints(-1, q, g, p)), s)

    def dcnv4(input, offset_mask, *params):
        s = sampling(input, offset_mask, params, packed=True)
        g, p, q = s.group, s.points, s.pixels
        used = op.Slice(offset_mask, ints(0), ints(3 * g * p), ints(3))
        groups = op.Reshape(used, ints(-1, q, g, 3 * p))
        offsets = op.Reshape(op.Slice(groups, ints(0), ints(2 * p), ints(3)), ints(-1, q, g, p, 2))
        masks = op.Slice(groups, ints(2 * p), ints(3 * p), ints(3))
        return core(input, offsets, masks, s)

    return {torch.ops.deformconv.dcnv3.default: dcnv3, torch.ops.deformconv.dcnv4.default: dcnv4}


def export_onnx(model: torch.nn.Module, args: tuple[Any, ...], f: Any = None, **kwargs: Any):
    """``torch.onnx.export(model, args, f, dynamo=True, opset_version=19, ...)`` that maps
    deformable convolution to ONNX ``DeformConv``.

    Args:
        model: the module to export (put it in ``eval()`` mode first for inference graphs).
        args: example inputs.
        f: optional path to write the ``.onnx`` file to.
        **kwargs: further ``torch.onnx.export`` arguments (``dynamic_shapes``, ...); an
            ``opset_version`` below 19 is refused, since ``DeformConv`` arrived in opset 19.

    Returns:
        (torch.onnx.ONNXProgram): the exported program.
    """
    opset = kwargs.pop("opset_version", OPSET)
    if opset < OPSET:
        raise ValueError(f"opset_version must be >= {OPSET} (ONNX DeformConv), got {opset}")
    table = {**onnx_translation_table(), **kwargs.pop("custom_translation_table", {})}
    return torch.onnx.export(
        model,
        args,
        f,
        dynamo=True,
        opset_version=opset,
        custom_translation_table=table,
        verbose=kwargs.pop("verbose", False),
        **kwargs,
    )
