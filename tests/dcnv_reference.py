"""DCNv3 and DCNv4 written with ``F.grid_sample``: the tests' independent reference.

It follows the upstream PyTorch formulation, ``dcnv3_core_pytorch`` in InternImage's
``classification/ops_dcnv3/functions/dcnv3_func.py``, step by step but in pixel units: pad the
channels-last input with ``F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])`` (so W gets
``pad_h`` and H ``pad_w``, the upstream quirk), put each output pixel's reference point at the
centre of its kernel window in the padded input (``_get_reference_points``), add the kernel
points x-outer / y-inner (``_generate_dilation_grids``, minus the centre for ``remove_center``,
``remove_center_sampling_locations``), scaled by ``offset_scale`` together with the learned
``(x, y)`` offsets, sample with ``grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)`` and sum the samples weighted by the mask.

DCNv4 has no PyTorch reference upstream; its CUDA kernel (``DCNv4_op/src/cuda/
dcnv4_im2col_cuda.cuh``, ``forward_kernel_dcn_reg``) samples the same points, but pads H by
``pad_h`` and W by ``pad_w`` and reads offsets and mask from one packed ``offset_mask`` whose
group ``g`` holds ``2P`` offsets then ``P`` mask values from column ``3 * P * g``
(``p_offset + (bi * Q + qi) * padded_offset_dim + gi * K * 3``, mask at ``+ K * 2``); the rest of
the row is padding to a multiple of 8 (``DCNv4_op/DCNv4/modules/dcnv4.py``: ``int(math.ceil((K *
3) / 8) * 8)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def points(kernel_h: int, kernel_w: int, remove_center: bool) -> list[tuple[int, int]]:
    """Kernel ``(column, row)`` of each sampling point, in upstream order."""
    return [
        (i, j)
        for i in range(kernel_w)
        for j in range(kernel_h)
        if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)
    ]


def output_size(height, width, kernel, stride, pad_rows, pad_cols, dilation) -> tuple[int, int]:
    """``(Ho, Wo)`` of the padded input, as ``_get_reference_points`` computes them."""
    rows = height + 2 * pad_rows
    cols = width + 2 * pad_cols
    out_h = (rows - (dilation[0] * (kernel[0] - 1) + 1)) // stride[0] + 1
    out_w = (cols - (dilation[1] * (kernel[1] - 1) + 1)) // stride[1] + 1
    return out_h, out_w


def _core(input, offset, mask, kernel, stride, pad_rows, pad_cols, dilation, group, scale, rc):
    x = F.pad(input, [0, 0, pad_cols, pad_cols, pad_rows, pad_rows])
    n, rows, cols, channels = x.shape
    out_h, out_w = offset.shape[1:3]
    pts = points(kernel[0], kernel[1], rc)
    p = len(pts)
    half_h = dilation[0] * (kernel[0] - 1) // 2
    half_w = dilation[1] * (kernel[1] - 1) // 2
    opts = dict(dtype=x.dtype, device=x.device)
    # Padded-pixel coordinates in which pixel k covers [k, k + 1): grid_sample's frame.
    ref_x = half_w + 0.5 + torch.arange(out_w, **opts) * stride[1]
    ref_y = half_h + 0.5 + torch.arange(out_h, **opts) * stride[0]
    grid_x = torch.tensor([i * dilation[1] - half_w for i, _ in pts], **opts)
    grid_y = torch.tensor([j * dilation[0] - half_h for _, j in pts], **opts)
    off = offset.reshape(n, out_h, out_w, group, p, 2)
    loc_x = ref_x.view(1, 1, out_w, 1, 1) + (grid_x + off[..., 0]) * scale
    loc_y = ref_y.view(1, out_h, 1, 1, 1) + (grid_y + off[..., 1]) * scale
    grid = torch.stack((2 * loc_x / cols - 1, 2 * loc_y / rows - 1), dim=-1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, out_h * out_w, p, 2)
    d = channels // group
    planes = (
        x.reshape(n, rows, cols, group, d).permute(0, 3, 4, 1, 2).reshape(n * group, d, rows, cols)
    )
    sampled = F.grid_sample(
        planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    m = mask.reshape(n, out_h * out_w, group, p).permute(0, 2, 1, 3).reshape(n * group, 1, -1, p)
    out = (sampled * m).sum(-1).reshape(n, group, d, out_h, out_w)
    return out.permute(0, 3, 4, 1, 2).reshape(n, out_h, out_w, channels)


def dcnv3_grid_sample(
    input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
):  # fmt: skip
    """``dcnv3_core_pytorch``'s semantics (arguments in its order)."""
    assert input.shape[-1] == group * group_channels
    return _core(
        input, offset, mask, (kernel_h, kernel_w), (stride_h, stride_w), pad_w, pad_h,
        (dilation_h, dilation_w), group, offset_scale, bool(remove_center),
    )  # fmt: skip


def dcnv4_grid_sample(
    input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, group_channels, offset_scale, im2col_step, remove_center,
):  # fmt: skip
    """DCNv4's CUDA semantics (``DCNv4Function`` arguments in its order), no softmax."""
    assert input.shape[-1] == group * group_channels
    p = kernel_h * kernel_w - int(remove_center)
    n, out_h, out_w, _ = offset_mask.shape
    packed = offset_mask[..., : group * 3 * p].reshape(n, out_h, out_w, group, 3 * p)
    offset = packed[..., : 2 * p].reshape(n, out_h, out_w, group * 2 * p)
    mask = packed[..., 2 * p :].reshape(n, out_h, out_w, group * p)
    return _core(
        input, offset, mask, (kernel_h, kernel_w), (stride_h, stride_w), pad_h, pad_w,
        (dilation_h, dilation_w), group, offset_scale, bool(remove_center),
    )  # fmt: skip
