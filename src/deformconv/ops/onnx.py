"""ONNX export of deformable convolution as the standard ``DeformConv`` operator (opset 19).

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
        >>> list(table) == [torch.ops.deformconv.deform_conv2d.default]
        True
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

    return {torch.ops.deformconv.deform_conv2d.default: deform_conv2d}


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
        The ``torch.onnx.ONNXProgram``.
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
