"""Deformable convolution v1 and v2 (Dai et al. 2017; Zhu et al. 2019), a drop-in for
``torchvision.ops.deform_conv2d``.

The public :func:`deform_conv2d` validates its arguments and calls the custom operator
``torch.ops.deformconv.deform_conv2d``. That operator has a fake (meta) implementation and a
registered autograd formula whose backward is the custom operator
``torch.ops.deformconv.deform_conv2d_backward``, so both run under ``torch.compile(fullgraph=True)``,
``torch.export`` and ONNX export. Each device gets its kernel through the dispatcher: the portable
PyTorch kernel by default (any device), the Numba kernel on CPU when Numba is available and the
Triton kernels on CUDA (which take float16 and bfloat16 natively; see docs/cuda.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from deformconv._validation import to_pair
from deformconv.ops import _dispatch, _portable
from deformconv.ops._geometry import output_size
from deformconv.ops._precision import (
    LOW_PRECISION,
    autocast_will_cast,
    needs_float32,
    register_autocast,
)
from deformconv.ops._workspace import get_workspace_budget, workspace_budget

__all__ = ["deform_conv2d"]

Pair = tuple[int, int]


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> None:
    named = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input.dim() != 4:
        raise ValueError(
            f"input must be 4-D (batch, in_channels, height, width), got shape {_shape(input)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            "weight must be 4-D (out_channels, in_channels / groups, kernel_height, kernel_width), "
            f"got shape {_shape(weight)}"
        )
    if not input.dtype.is_floating_point:
        raise TypeError(f"input must have a floating-point dtype, got {input.dtype}")
    for name, t in named.items():
        if t is None or name == "input":
            continue
        if t.dtype != input.dtype and not autocast_will_cast(input, t):
            raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name} must be on the input's device {input.device}, got {t.device}")

    batch, channels, height, width = input.shape
    out_channels, cpg, kh, kw = weight.shape
    if min(kh, kw) < 1 or cpg < 1:
        raise ValueError(f"weight must have non-empty kernel and channels, got {_shape(weight)}")
    if channels % cpg != 0:
        raise ValueError(
            f"weight.shape[1] ({cpg}) must divide in_channels ({channels}): weight groups are "
            f"in_channels / weight.shape[1]; got weight {_shape(weight)} for input {_shape(input)}"
        )
    groups = channels // cpg
    if out_channels % groups != 0:
        raise ValueError(
            f"out_channels (weight.shape[0] = {out_channels}) must be divisible by groups "
            f"({groups} = in_channels {channels} / weight.shape[1] {cpg})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(f"bias must have shape ({out_channels},), got {_shape(bias)}")

    out_h, out_w = output_size(height, width, (kh, kw), stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"kernel ({kh}, {kw}) with dilation {dilation} is larger than the padded input "
            f"({height + 2 * padding[0]}, {width + 2 * padding[1]}) (input {height}x{width}, "
            f"padding {padding}); the output would be {out_h}x{out_w}"
        )

    taps = kh * kw
    if offset.dim() != 4:
        raise ValueError(
            f"offset must be 4-D (batch, 2 * offset_groups * {kh} * {kw}, {out_h}, {out_w}), "
            f"got shape {_shape(offset)}"
        )
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise ValueError(
            f"offset.shape[1] must be a positive multiple of 2 * kernel_height * kernel_width "
            f"= {2 * taps}, got {offset.shape[1]}"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if channels % offset_groups != 0:
        raise ValueError(
            f"offset groups ({offset_groups} = offset.shape[1] {offset.shape[1]} / {2 * taps}) "
            f"must divide in_channels ({channels})"
        )
    expected = (batch, 2 * offset_groups * taps, out_h, out_w)
    if tuple(offset.shape) != expected:
        raise ValueError(f"offset must have shape {expected}, got {_shape(offset)}")
    if mask is not None:
        expected = (batch, offset_groups * taps, out_h, out_w)
        if mask.dim() != 4 or tuple(mask.shape) != expected:
            raise ValueError(
                f"mask must have shape {expected} (batch, offset_groups * kernel_height * "
                f"kernel_width, out_height, out_width), got {_shape(mask)}"
            )


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    r"""Deformable convolution v1 (``mask=None``) or v2 (with ``mask``), as torchvision computes it.

    Every kernel tap of every output pixel samples the input bilinearly at its regular position
    plus a learned offset (zeros outside the image), optionally scaled by a modulation mask; the
    convolution then runs over the sampled values. Weight groups are ``in_channels /
    weight.shape[1]`` and offset groups ``offset.shape[1] / (2 * kernel_height * kernel_width)``.

    Args:
        input (Tensor[batch, in_channels, in_height, in_width]): input feature map.
        offset (Tensor[batch, 2 * offset_groups * kh * kw, out_height, out_width]): per
            offset group ``g`` and tap ``k = i * kw + j`` (``K = kh * kw`` taps of the
            ``kernel_height x kernel_width`` kernel), channel ``2 * (g * K + k)`` is the vertical
            offset and the next one the horizontal offset.
        weight (Tensor[out_channels, in_channels / groups, kh, kw]): the convolution's weight.
        bias (Tensor[out_channels], optional): added to every output pixel.
        stride (int or (int, int)): default 1.
        padding (int or (int, int)): zero padding on each side, default 0.
        dilation (int or (int, int)): spacing between kernel taps, default 1.
        mask (Tensor[batch, offset_groups * kh * kw, out_height, out_width], optional):
            modulation of each tap (v2).

    Returns:
        Tensor[batch, out_channels, out_height, out_width]

    Non-finite offsets never read outside the input: a tap whose sampling position is NaN or
    infinite contributes zero, like a tap outside the image, and receives zero offset gradient.

    Example:
        >>> input = torch.rand(2, 4, 10, 10)
        >>> weight = torch.rand(8, 4, 3, 3)
        >>> offset = torch.zeros(2, 2 * 3 * 3, 8, 8)
        >>> mask = torch.ones(2, 3 * 3, 8, 8)
        >>> out = deform_conv2d(input, offset, weight, mask=mask)
        >>> out.shape
        torch.Size([2, 8, 8, 8])
        >>> torch.allclose(out, torch.nn.functional.conv2d(input, weight), atol=1e-5)
        True
    """
    s = to_pair(stride, "stride", 1)
    p = to_pair(padding, "padding", 0)
    d = to_pair(dilation, "dilation", 1)
    _check(input, offset, weight, bias, mask, s, p, d)
    return torch.ops.deformconv.deform_conv2d(
        input, offset, mask, weight, bias, s[0], s[1], p[0], p[1], d[0], d[1]
    )


# --------------------------------------------------------------------------------------------
# The custom operators. Arguments arrive validated by deform_conv2d.


def _pairs(params: Sequence[int]) -> tuple[Pair, Pair, Pair]:
    """``(stride, padding, dilation)`` from the operators' six ints."""
    return tuple(params[0:2]), tuple(params[2:4]), tuple(params[4:6])


def _run_forward(
    kernels: ModuleType,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    params: Sequence[int],
) -> Tensor:
    """Shared preparation of every device's forward: empty batches and low precision."""
    stride, padding, dilation = _pairs(params)
    out_h, out_w = offset.shape[-2:]
    if input.shape[0] == 0:
        return input.new_zeros((0, weight.shape[0], out_h, out_w))
    dtype = input.dtype
    if needs_float32(kernels, dtype):
        up = [None if t is None else t.float() for t in (input, offset, mask, weight, bias)]
        return kernels.forward(*up, stride, padding, dilation).to(dtype)
    return kernels.forward(input, offset, mask, weight, bias, stride, padding, dilation)


def _run_backward(
    kernels: ModuleType,
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    params: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared preparation of every device's backward; absent mask or bias get empty gradients."""
    stride, padding, dilation = _pairs(params)
    dtype = input.dtype
    if input.shape[0] == 0:
        grads = (
            torch.zeros_like(input),
            torch.zeros_like(offset),
            None if mask is None else torch.zeros_like(mask),
            torch.zeros_like(weight),
            None if bias is None else torch.zeros_like(bias),
        )
    elif needs_float32(kernels, dtype):
        up = [
            None if t is None else t.float() for t in (grad_out, input, offset, mask, weight, bias)
        ]
        grads = kernels.backward(*up, stride, padding, dilation)
        grads = tuple(None if g is None else g.to(dtype) for g in grads)
    else:
        grads = kernels.backward(
            grad_out, input, offset, mask, weight, bias, stride, padding, dilation
        )
    gi, go, gm, gw, gb = grads
    return (
        gi,
        go,
        input.new_empty(0) if gm is None else gm,
        gw,
        input.new_empty(0) if gb is None else gb,
    )


@torch.library.custom_op("deformconv::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
) -> Tensor:
    params = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    return _run_forward(_portable, input, offset, mask, weight, bias, params)


@_deform_conv2d_op.register_fake
def _deform_conv2d_fake(
    input, offset, mask, weight, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w
):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


@torch.library.custom_op("deformconv::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    return _run_backward(_portable, grad_out, input, offset, mask, weight, bias, params)


@_deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(
    grad_out,
    input,
    offset,
    mask,
    weight,
    bias,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(offset, memory_format=torch.contiguous_format),
        input.new_empty(0)
        if mask is None
        else torch.empty_like(mask, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        input.new_empty(0) if bias is None else torch.empty_like(bias),
    )


def _setup_context(ctx, inputs, output) -> None:
    input, offset, mask, weight, bias, *params = inputs
    ctx.save_for_backward(input, offset, mask, weight, bias)
    ctx.params = params
    # Autograd may run the backward on another thread (CUDA's device threads), where the
    # forward's workspace_budget(...) context is not in force: carry the budget over.
    ctx.workspace_budget = get_workspace_budget()


def _backward(ctx, grad_out: Tensor):
    input, offset, mask, weight, bias = ctx.saved_tensors
    with workspace_budget(ctx.workspace_budget):
        gi, go, gm, gw, gb = torch.ops.deformconv.deform_conv2d_backward(
            grad_out.contiguous(), input, offset, mask, weight, bias, *ctx.params
        )
    return (
        gi,
        go,
        None if mask is None else gm,
        gw,
        None if bias is None else gb,
        *([None] * 6),
    )


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output) -> None:
    grad_out, input, offset, mask, weight, bias, *params = inputs
    ctx.save_for_backward(grad_out, input, offset, mask, weight, bias)
    ctx.params = params


def _double_backward(ctx, *grads: Tensor | None):
    """Gradients of the first-order gradients (gradient penalties, Hessian-vector products).

    They are the vector-Jacobian product of the first-order gradients, which are recomputed by
    autograd through the portable kernel's forward: plain differentiable PyTorch operations,
    slower than the device kernels but exact, on every device. Low precision runs in float32.
    """
    saved = ctx.saved_tensors
    p = ctx.params
    none = [None] * (len(saved) + len(p))
    if saved[1].shape[0] == 0:
        return tuple(none)
    compute = torch.float32 if saved[1].dtype in LOW_PRECISION else saved[1].dtype
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().to(compute).requires_grad_() for t in saved]
        grad_out, input, offset, mask, weight, bias = leaves
        primals = [t for t in leaves[1:] if t is not None]
        out = _portable.forward(input, offset, mask, weight, bias, *_pairs(p))
        first = torch.autograd.grad(out, primals, grad_out, create_graph=True)
        # grads[i] flows into output i (input, offset, mask, weight, bias gradient); the ones
        # of an absent mask or bias belong to empty placeholders.
        incoming = [g for g, t in zip(grads, leaves[1:], strict=True) if t is not None]
        pairs = [(f, g.to(compute)) for f, g in zip(first, incoming, strict=True) if g is not None]
        if not pairs:
            return tuple(none)
        wrt = [t for t in leaves if t is not None]
        second = iter(
            torch.autograd.grad(
                [f for f, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
            )
        )
    result = []
    for original, leaf in zip(saved, leaves, strict=True):
        grad = None if leaf is None else next(second)
        result.append(None if grad is None else grad.to(original.dtype))
    return (*result, *([None] * len(p)))


_deform_conv2d_backward_op.register_autograd(
    _double_backward, setup_context=_setup_backward_context
)


# Autocast: the operator follows the autocast dtype in force, as F.conv2d does (see _precision).
register_autocast("deform_conv2d")


# --------------------------------------------------------------------------------------------
# Device kernels. The default implementation above (every device) is the portable kernel; the
# devices registered here get their fast kernel through the dispatcher (deformconv.ops._dispatch),
# which chooses once, honours DEFORMCONV_<DEVICE>_KERNEL and falls back to the portable kernel,
# with a warning, when the fast one cannot load or fails on its first call.

FAMILY = "deform_conv2d"
_dispatch.register(
    FAMILY,
    portable="deformconv.ops._portable",
    fast={"cpu": ("numba", "deformconv.ops._cpu"), "cuda": ("triton", "deformconv.ops._triton")},
)


def _register_device(device_type: str) -> None:
    def forward(input, offset, mask, weight, bias, *params):
        return _dispatch.run(
            FAMILY,
            device_type,
            lambda kernels: _run_forward(kernels, input, offset, mask, weight, bias, params),
        )

    def backward(grad_out, input, offset, mask, weight, bias, *params):
        return _dispatch.run(
            FAMILY,
            device_type,
            lambda kernels: _run_backward(
                kernels, grad_out, input, offset, mask, weight, bias, params
            ),
        )

    _deform_conv2d_op.register_kernel(device_type)(forward)
    _deform_conv2d_backward_op.register_kernel(device_type)(backward)


for _device in ("cpu", "cuda"):
    _register_device(_device)
