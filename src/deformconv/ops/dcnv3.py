"""DCNv3 (InternImage, Wang et al. 2023) and DCNv4 (Xiong et al. 2024) core operators.

Unlike deformable convolution v1/v2, DCNv3 and DCNv4 have no weight matrix: every output channel
is a mask-weighted sum of bilinear samples of its own input channel, at ``P`` learned points per
group of channels (a deformable, depthwise aggregation; the projections live in the layers).
Tensors are channels-last. :func:`dcnv3` takes InternImage's ``dcnv3_core_pytorch`` arguments
and gives its numbers; :func:`dcnv4` takes ``DCNv4Function``'s arguments and gives its CUDA
kernel's numbers. Any kernel size, stride, dilation, group count and group width is supported
(the upstream CUDA kernels need ``group_channels % 16 == 0`` and, for DCNv4, 3x3 kernels).

Each functional validates its arguments and calls a custom operator
(``torch.ops.deformconv.dcnv3`` / ``dcnv4``) that has a fake implementation, a registered
autograd formula for the input, offsets and mask (the backward is its own custom operator), and
an autocast rule (as ``deform_conv2d``'s). Kernels come through the dispatcher as family
``"dcnv3"``: Numba on CPU, Triton on CUDA, the portable PyTorch kernel everywhere else.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from deformconv._validation import check_int
from deformconv.ops import _dcnv3_portable, _dispatch
from deformconv.ops._dcnv3_geometry import Sampling, operator_sampling
from deformconv.ops._precision import autocast_will_cast, needs_float32, register_autocast

__all__ = ["dcnv3", "dcnv4"]

FAMILY = "dcnv3"


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool (or 0 or 1), got {type(value).__name__} {value!r}")


def _check_scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"offset_scale must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"offset_scale must be finite, got {value!r}")
    return float(value)


def _check_tensor(t: Any, name: str, input: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input is None:
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
        return
    if t.dtype != input.dtype and not autocast_will_cast(input, t):
        raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{name} must be on the input's device {input.device}, got {t.device}")


def _sampling(
    input: Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
    packed: bool,
    offset_width: int | None = None,
) -> Sampling:
    """Check the arguments both operators share and describe where they sample."""
    for name, value, minimum in (
        ("kernel_h", kernel_h, 1),
        ("kernel_w", kernel_w, 1),
        ("stride_h", stride_h, 1),
        ("stride_w", stride_w, 1),
        ("pad_h", pad_h, 0),
        ("pad_w", pad_w, 0),
        ("dilation_h", dilation_h, 1),
        ("dilation_w", dilation_w, 1),
        ("group", group, 1),
        ("group_channels", group_channels, 1),
    ):
        check_int(value, name, minimum)
    scale = _check_scale(offset_scale)
    rc = _check_flag(remove_center, "remove_center")
    if rc and (kernel_h != kernel_w or kernel_h % 2 == 0 or kernel_h == 1):
        raise ValueError(
            "remove_center needs a square kernel of odd size, 3x3 or larger (it drops the centre "
            f"point), got kernel_h={kernel_h}, kernel_w={kernel_w}"
        )
    _check_tensor(input, "input")
    if input.dim() != 4:
        raise ValueError(
            "input must be 4-D channels-last (batch, height, width, group * group_channels), "
            f"got shape {_shape(input)}"
        )
    if input.shape[3] != group * group_channels:
        raise ValueError(
            f"input.shape[3] (channels) must equal group * group_channels = {group} * "
            f"{group_channels} = {group * group_channels}, got {input.shape[3]} "
            f"(input shape {_shape(input)})"
        )
    params = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
              group, group_channels, scale, rc)  # fmt: skip
    s = operator_sampling(input.shape[1], input.shape[2], offset_width, params, packed)
    if s.out_h < 1 or s.out_w < 1:
        raise ValueError(
            f"kernel ({kernel_h}, {kernel_w}) with dilation ({dilation_h}, {dilation_w}) does not "
            f"fit the {s.height}x{s.width} input padded by {s.pad_y} rows and {s.pad_x} columns "
            f"on each side; the output would be {s.out_h}x{s.out_w}"
        )
    return s


def dcnv3(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    r"""The DCNv3 core: InternImage's ``dcnv3_core_pytorch`` (same arguments, same numbers).

    Output pixel ``(oy, ox)``, channel ``c`` of group ``g`` is ``sum_p mask[.., g * P + p] *
    bilinear(input[.., c], x_p, y_p)``, zeros outside the image, with ``P = kernel_h * kernel_w
    - remove_center`` points ordered x-outer, y-inner (the transpose of torchvision's order) at
    ``x_p = ox * stride_w - pad_h + half_w + (i_p * dilation_w - half_w + dx_p) * offset_scale``
    (``y_p`` likewise with ``- pad_w``), ``half = dilation * (kernel - 1) // 2``. As upstream's
    ``F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])``, W is padded by ``pad_h`` and H by
    ``pad_w``; with ``pad_h == pad_w``, as in every InternImage layer, this matches the CUDA op.
    The mask is applied as given (the layer applies the softmax).

    Args:
        input (Tensor[N, H, W, group * group_channels]): channels-last input.
        offset (Tensor[N, Ho, Wo, group * P * 2]): ``(dx, dy)`` pairs in pixels, point-major
            within each group.
        mask (Tensor[N, Ho, Wo, group * P]): weight of each point.
        kernel_h: kernel height (any; ``remove_center`` needs a square odd kernel).
        kernel_w: kernel width.
        stride_h: vertical stride.
        stride_w: horizontal stride.
        pad_h: zero padding of the input's width (sic, as upstream; see above).
        pad_w: zero padding of the input's height.
        dilation_h: vertical spacing of the kernel points.
        dilation_w: horizontal spacing of the kernel points.
        group: groups of channels with their own offsets and mask.
        group_channels: channels per group (any width).
        offset_scale: scale of the dilation grid and of the offsets.
        remove_center: drop the centre point (square odd kernels).

    Returns:
        Tensor[N, Ho, Wo, group * group_channels], with ``Ho = (H + 2 * pad_w - dilation_h *
        (kernel_h - 1) - 1) // stride_h + 1`` and ``Wo`` likewise with ``pad_h``.

    Non-finite offsets read zero and get zero offset gradient, like a point outside the image.

    Example:
        >>> x = torch.rand(2, 8, 8, 32)
        >>> offset = torch.zeros(2, 8, 8, 4 * 9 * 2)
        >>> mask = torch.full((2, 8, 8, 4 * 9), 1 / 9)
        >>> out = dcnv3(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 4, 8, 1.0, False)
        >>> out.shape
        torch.Size([2, 8, 8, 32])
        >>> box = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 3, 1, 1,
        ...                                      count_include_pad=True)
        >>> torch.allclose(out, box.permute(0, 2, 3, 1), atol=1e-6)
        True
    """
    s = _sampling(
        input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        group, group_channels, offset_scale, remove_center, packed=False,
    )  # fmt: skip
    lead = (input.shape[0], s.out_h, s.out_w)
    for name, t, width, rule in (
        ("offset", offset, group * s.points * 2, "group * P * 2"),
        ("mask", mask, group * s.points, "group * P"),
    ):
        _check_tensor(t, name, input)
        if _shape(t) != (*lead, width):
            raise ValueError(
                f"{name} must have shape {(*lead, width)} (batch, out_height, out_width, {rule} = "
                f"{group} * {s.points}{' * 2' if name == 'offset' else ''}), got {_shape(t)}"
            )
    return torch.ops.deformconv.dcnv3(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, group, group_channels, s.offset_scale, s.remove_center,
    )  # fmt: skip


def dcnv4(
    input: Tensor,
    offset_mask: Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    im2col_step: int,
    remove_center: bool,
) -> Tensor:
    r"""The DCNv4 core: ``DCNv4Function.apply`` of the DCNv4 package (same arguments, numbers).

    The same sampling as :func:`dcnv3`, with offsets and mask packed into one tensor and the
    padding on its own axes (H by ``pad_h``, W by ``pad_w``, as DCNv4's CUDA kernel); no softmax.
    Group ``g`` of ``offset_mask`` holds its ``2P`` offsets (``(dx, dy)`` pairs) and then its
    ``P`` mask values from column ``3 * P * g``; columns from ``3 * P * group`` on are ignored
    (upstream pads the width to a multiple of 8, which is accepted but not required).

    Args:
        input (Tensor[N, H, W, group * group_channels]): channels-last input.
        offset_mask (Tensor[N, Ho, Wo, width]): ``width >= group * P * 3``.
        kernel_h: kernel height (any; ``remove_center`` needs a square odd kernel).
        kernel_w: kernel width.
        stride_h: vertical stride.
        stride_w: horizontal stride.
        pad_h: zero padding of the input's height.
        pad_w: zero padding of the input's width.
        dilation_h: vertical spacing of the kernel points.
        dilation_w: horizontal spacing of the kernel points.
        group: groups of channels with their own offsets and mask.
        group_channels: channels per group (any width).
        offset_scale: scale of the dilation grid and of the offsets.
        im2col_step: accepted for compatibility (a positive int) and unused: batches are split
            by the workspace budget instead.
        remove_center: drop the centre point (square odd kernels).

    Returns:
        Tensor[N, Ho, Wo, group * group_channels], ``Ho = (H + 2 * pad_h - dilation_h *
        (kernel_h - 1) - 1) // stride_h + 1``, ``Wo`` likewise.

    Example:
        >>> x = torch.rand(1, 6, 6, 16)
        >>> offset_mask = torch.zeros(1, 6, 6, 32)  # 1 group * 9 points * 3 = 27, padded to 32
        >>> offset_mask[..., 18:27] = 1.0           # mask of each point; zero offsets
        >>> out = dcnv4(x, offset_mask, 3, 3, 1, 1, 1, 1, 1, 1, 1, 16, 1.0, 256, False)
        >>> box = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 3, 1, 1) * 9
        >>> torch.allclose(out, box.permute(0, 2, 3, 1), atol=1e-5)
        True
    """
    check_int(im2col_step, "im2col_step")
    _check_tensor(offset_mask, "offset_mask")
    width = offset_mask.shape[-1] if offset_mask.dim() == 4 else None
    s = _sampling(
        input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        group, group_channels, offset_scale, remove_center, packed=True, offset_width=width,
    )  # fmt: skip
    _check_tensor(offset_mask, "offset_mask", input)
    need = group * s.points * 3
    lead = (input.shape[0], s.out_h, s.out_w)
    if offset_mask.dim() != 4 or _shape(offset_mask)[:3] != lead or offset_mask.shape[3] < need:
        raise ValueError(
            f"offset_mask must have shape {(*lead, need)} or wider in the last dimension "
            f"(batch, out_height, out_width, at least group * P * 3 = {group} * {s.points} * 3 "
            f"= {need}), got {_shape(offset_mask)}"
        )
    return torch.ops.deformconv.dcnv4(
        input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, group, group_channels, s.offset_scale, s.remove_center,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The custom operators. Arguments arrive validated by dcnv3 / dcnv4; ``params`` are the integer
# and scalar arguments from kernel_h to remove_center, in the operators' order.


def _op_sampling(input: Tensor, offset: Tensor, params: tuple, packed: bool) -> Sampling:
    return operator_sampling(input.shape[1], input.shape[2], offset.shape[-1], params, packed)


def _run_forward(
    kernels: ModuleType, input: Tensor, offset: Tensor, mask: Tensor, s: Sampling
) -> Tensor:
    """Shared preparation of every device's forward: empty batches and low precision."""
    if input.shape[0] == 0:
        return input.new_zeros((0, s.out_h, s.out_w, s.channels))
    dtype = input.dtype
    if needs_float32(kernels, dtype):
        up = offset.float()
        out = kernels.forward(input.float(), up, up if s.packed else mask.float(), s)
        return out.to(dtype)
    return kernels.forward(input, offset, mask, s)


def _run_backward(
    kernels: ModuleType,
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    s: Sampling,
) -> tuple[Tensor, Tensor, Tensor]:
    """Shared preparation of every device's backward; for DCNv4 the offset and mask gradients
    are one tensor."""
    if input.shape[0] == 0:
        return torch.zeros_like(input), torch.zeros_like(offset), torch.zeros_like(mask)
    dtype = input.dtype
    if needs_float32(kernels, dtype):
        up = offset.float()
        grads = kernels.backward(
            grad_out.float(), input.float(), up, up if s.packed else mask.float(), s
        )
        return tuple(g.to(dtype) for g in grads)
    return kernels.backward(grad_out, input, offset, mask, s)


def _contiguous_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.custom_op("deformconv::dcnv3", mutates_args=())
def _dcnv3_op(
    input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
    stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
    group_channels: int, offset_scale: float, remove_center: bool,
) -> Tensor:  # fmt: skip
    params = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
              group, group_channels, offset_scale, remove_center)  # fmt: skip
    s = _op_sampling(input, offset, params, packed=False)
    return _run_forward(_dcnv3_portable, input, offset, mask, s)


@_dcnv3_op.register_fake
def _dcnv3_fake(input, offset, mask, *params):
    return input.new_empty((*offset.shape[:3], input.shape[3]))


@torch.library.custom_op("deformconv::dcnv3_backward", mutates_args=())
def _dcnv3_backward_op(
    grad_out: Tensor, input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int,
    kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
    dilation_w: int, group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    params = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
              group, group_channels, offset_scale, remove_center)  # fmt: skip
    s = _op_sampling(input, offset, params, packed=False)
    return _run_backward(_dcnv3_portable, grad_out, input, offset, mask, s)


@_dcnv3_backward_op.register_fake
def _dcnv3_backward_fake(grad_out, input, offset, mask, *params):
    return _contiguous_like(input), _contiguous_like(offset), _contiguous_like(mask)


@torch.library.custom_op("deformconv::dcnv4", mutates_args=())
def _dcnv4_op(
    input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
    stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
    group_channels: int, offset_scale: float, remove_center: bool,
) -> Tensor:  # fmt: skip
    params = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
              group, group_channels, offset_scale, remove_center)  # fmt: skip
    s = _op_sampling(input, offset_mask, params, packed=True)
    return _run_forward(_dcnv3_portable, input, offset_mask, offset_mask, s)


@_dcnv4_op.register_fake
def _dcnv4_fake(input, offset_mask, *params):
    return input.new_empty((*offset_mask.shape[:3], input.shape[3]))


@torch.library.custom_op("deformconv::dcnv4_backward", mutates_args=())
def _dcnv4_backward_op(
    grad_out: Tensor, input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int,
    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
    group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    params = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
              group, group_channels, offset_scale, remove_center)  # fmt: skip
    s = _op_sampling(input, offset_mask, params, packed=True)
    gi, gom, _ = _run_backward(_dcnv3_portable, grad_out, input, offset_mask, offset_mask, s)
    return gi, gom


@_dcnv4_backward_op.register_fake
def _dcnv4_backward_fake(grad_out, input, offset_mask, *params):
    return _contiguous_like(input), _contiguous_like(offset_mask)


def _setup_dcnv3(ctx, inputs, output) -> None:
    input, offset, mask, *params = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.params = params


def _backward_dcnv3(ctx, grad_out: Tensor):
    input, offset, mask = ctx.saved_tensors
    gi, go, gm = torch.ops.deformconv.dcnv3_backward(
        grad_out.contiguous(), input, offset, mask, *ctx.params
    )
    return (gi, go, gm, *([None] * len(ctx.params)))


def _setup_dcnv4(ctx, inputs, output) -> None:
    input, offset_mask, *params = inputs
    ctx.save_for_backward(input, offset_mask)
    ctx.params = params


def _backward_dcnv4(ctx, grad_out: Tensor):
    input, offset_mask = ctx.saved_tensors
    gi, gom = torch.ops.deformconv.dcnv4_backward(
        grad_out.contiguous(), input, offset_mask, *ctx.params
    )
    return (gi, gom, *([None] * len(ctx.params)))


_dcnv3_op.register_autograd(_backward_dcnv3, setup_context=_setup_dcnv3)
_dcnv4_op.register_autograd(_backward_dcnv4, setup_context=_setup_dcnv4)

# Autocast, as for deform_conv2d: the operators follow the autocast dtype in force.
register_autocast("dcnv3")
register_autocast("dcnv4")


# --------------------------------------------------------------------------------------------
# Device kernels, chosen by the dispatcher (see deformconv.ops._dispatch and deform_conv.py).

_dispatch.register(
    FAMILY,
    portable="deformconv.ops._dcnv3_portable",
    fast={
        "cpu": ("numba", "deformconv.ops._dcnv3_cpu"),
        "cuda": ("triton", "deformconv.ops._dcnv3_triton"),
    },
)


def _register_device(device_type: str) -> None:
    def run(call):
        return _dispatch.run(FAMILY, device_type, call)

    def dcnv3_forward(input, offset, mask, *params):
        s = _op_sampling(input, offset, params, packed=False)
        return run(lambda k: _run_forward(k, input, offset, mask, s))

    def dcnv3_backward(grad_out, input, offset, mask, *params):
        s = _op_sampling(input, offset, params, packed=False)
        return run(lambda k: _run_backward(k, grad_out, input, offset, mask, s))

    def dcnv4_forward(input, offset_mask, *params):
        s = _op_sampling(input, offset_mask, params, packed=True)
        return run(lambda k: _run_forward(k, input, offset_mask, offset_mask, s))

    def dcnv4_backward(grad_out, input, offset_mask, *params):
        s = _op_sampling(input, offset_mask, params, packed=True)
        gi, gom, _ = run(lambda k: _run_backward(k, grad_out, input, offset_mask, offset_mask, s))
        return gi, gom

    _dcnv3_op.register_kernel(device_type)(dcnv3_forward)
    _dcnv3_backward_op.register_kernel(device_type)(dcnv3_backward)
    _dcnv4_op.register_kernel(device_type)(dcnv4_forward)
    _dcnv4_backward_op.register_kernel(device_type)(dcnv4_backward)


for _device in ("cpu", "cuda"):
    _register_device(_device)
