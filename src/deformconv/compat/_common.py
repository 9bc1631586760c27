"""What the compatibility layers share: the check of the offset-group and weight-group counts
that mmcv's and detectron2's functions take explicitly (deformconv's operator reads them from the
tensors' shapes), and their kernels' rule for the offset gradient of a tap on the image's edge."""

from __future__ import annotations

import torch
from torch import Tensor

from deformconv._validation import check_int, to_pair

__all__ = ["check_group_counts", "without_edge_gradient"]


def _is_4d(t: object) -> bool:
    return isinstance(t, Tensor) and t.dim() == 4


def check_group_counts(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    groups: int,
    offset_groups: int,
    name: str,
) -> None:
    """Refuse tensors whose shapes disagree with the ``groups`` and ``offset_groups`` given.

    Tensors that are not 4-D are left to :func:`deformconv.deform_conv2d`, whose messages say
    what shape each one needs.
    """
    check_int(groups, "groups")
    check_int(offset_groups, name)
    if not (_is_4d(input) and _is_4d(offset) and _is_4d(weight)):
        return
    channels, per_group = input.shape[1], weight.shape[1]
    if channels != groups * per_group:
        raise ValueError(
            f"groups={groups} does not fit the tensors: input has {channels} channels and "
            f"weight.shape[1] is {per_group}, so groups must be {channels} / {per_group}"
        )
    kh, kw = weight.shape[2:]
    taps = kh * kw
    if offset.shape[1] != 2 * offset_groups * taps:
        raise ValueError(
            f"offset must have 2 * {name} * kernel_height * kernel_width = "
            f"{2 * offset_groups * taps} channels ({name}={offset_groups}, kernel {kh}x{kw}), "
            f"got offset of shape {tuple(offset.shape)}"
        )
    if _is_4d(mask) and mask.shape[1] != offset_groups * taps:  # type: ignore[union-attr]
        raise ValueError(
            f"mask must have {name} * kernel_height * kernel_width = {offset_groups * taps} "
            f"channels ({name}={offset_groups}, kernel {kh}x{kw}), got mask of shape "
            f"{tuple(mask.shape)}"  # type: ignore[union-attr]
        )


def without_edge_gradient(
    offset: Tensor, weight: Tensor, stride: object, padding: object, dilation: object
) -> Tensor:
    """``offset`` itself, but passing no gradient to a tap that samples exactly on row or
    column -1.

    mmcv's kernels (``get_coordinate_weight``, also in mmdetection's and detectron2's CUDA code)
    give a tap no offset gradient when either coordinate is ``<= -1``; torchvision's kernels,
    and deformconv's, give a tap exactly on -1 its gradient towards the image. Only that exact
    position differs, but zero offsets with padding put every border tap there, as in every
    newly initialised layer. Tensors of the wrong shape are returned as they are, for
    :func:`deformconv.deform_conv2d` to describe.
    """
    if not (_is_4d(offset) and _is_4d(weight) and offset.requires_grad):
        return offset
    (sh, sw), (ph, pw) = to_pair(stride, "stride", 1), to_pair(padding, "padding", 0)
    dh, dw = to_pair(dilation, "dilation", 1)
    _, channels, out_h, out_w = offset.shape
    kh, kw = weight.shape[2:]
    groups = channels // (2 * kh * kw)
    if groups == 0 or channels != 2 * groups * kh * kw:
        return offset
    like = dict(dtype=offset.dtype, device=offset.device)
    row = torch.arange(out_h, **like) * sh - ph
    col = torch.arange(out_w, **like) * sw - pw
    tap_y = (torch.arange(kh, **like) * dh).repeat_interleave(kw).repeat(groups)
    tap_x = (torch.arange(kw, **like) * dw).repeat(kh).repeat(groups)
    y = tap_y.view(1, -1, 1, 1) + row.view(1, 1, -1, 1) + offset[:, 0::2]
    x = tap_x.view(1, -1, 1, 1) + col.view(1, 1, 1, -1) + offset[:, 1::2]
    edge = ((y == -1) | (x == -1)).repeat_interleave(2, dim=1)
    return torch.where(edge, offset.detach(), offset)
