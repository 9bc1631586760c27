"""Where DCNv3 and DCNv4 sample, shared by their three kernels and the ONNX export.

Both operators sample a channels-last input ``(N, H, W, group * group_channels)`` at ``P`` points
per output pixel and group, ``P = kernel_h * kernel_w - remove_center``, and sum the bilinear
samples weighted by a mask, with no weight matrix. Point ``p`` is kernel column ``i`` (x) and row
``j`` (y), enumerated x-outer, y-inner, skipping the centre when ``remove_center``
(InternImage ``ops_dcnv3/functions/dcnv3_func.py``, ``_generate_dilation_grids``; DCNv4
``DCNv4_op/src/cuda/dcnv4_im2col_cuda.cuh``, the ``i``/``j`` loops). In input pixel coordinates,
output pixel ``(oy, ox)`` samples point ``p`` of group ``g`` at

    x = ox * stride_w - pad_x + half_w + (i * dilation_w - half_w + offset_x) * offset_scale
    y = oy * stride_h - pad_y + half_h + (j * dilation_h - half_h + offset_y) * offset_scale

with ``half = dilation * (kernel - 1) // 2``, which is what the upstream reference points
(``_get_reference_points``), dilation grid and ``grid_sample(align_corners=False)`` work out to,
and what the CUDA kernels compute. Samples are bilinear with zeros outside the image, by
torchvision's boundary rule. ``pad_y``/``pad_x`` are the paddings applied to H and W: DCNv4
uses ``(pad_h, pad_w)``; DCNv3's reference pads with ``F.pad(input, [0, 0, pad_h, pad_h, pad_w,
pad_w])``, which gives W ``pad_h`` and H ``pad_w``, so it uses ``(pad_w, pad_h)``.

Offsets hold ``(x, y)`` pairs. DCNv3 passes offset ``(N, Ho, Wo, G * P * 2)`` and mask
``(N, Ho, Wo, G * P)``; DCNv4 packs both into one ``offset_mask (N, Ho, Wo, width)`` whose group
``g`` holds ``2P`` offsets then ``P`` mask values from column ``3 * P * g``, the columns after
``3 * P * G`` being padding. :class:`Sampling` describes either with row and group strides.
"""

from __future__ import annotations

from dataclasses import dataclass

from deformconv.ops._geometry import output_size


@dataclass(frozen=True)
class Sampling:
    """The arguments of one DCNv3/DCNv4 call that are not tensors, with derived sizes.

    ``offset_width`` is the last dimension of the offset tensor (of ``offset_mask`` when
    ``packed``). The strides are in elements of the flattened ``(N * Ho * Wo, width)`` tensors.
    """

    height: int
    width: int
    out_h: int
    out_w: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_y: int
    pad_x: int
    dilation_h: int
    dilation_w: int
    group: int
    group_channels: int
    offset_scale: float
    remove_center: bool
    packed: bool
    offset_width: int

    @property
    def points(self) -> int:
        return self.kernel_h * self.kernel_w - int(self.remove_center)

    @property
    def channels(self) -> int:
        return self.group * self.group_channels

    @property
    def pixels(self) -> int:
        return self.out_h * self.out_w

    @property
    def half_h(self) -> int:
        return self.dilation_h * (self.kernel_h - 1) // 2

    @property
    def half_w(self) -> int:
        return self.dilation_w * (self.kernel_w - 1) // 2

    @property
    def origin_y(self) -> int:
        """Centre row of output row 0: ``y = oy * stride_h + origin_y + (tap_y + dy) * scale``."""
        return self.half_h - self.pad_y

    @property
    def origin_x(self) -> int:
        return self.half_w - self.pad_x

    @property
    def centre(self) -> int:
        """Index of the removed centre in the full x-outer enumeration, or ``kernel_h *
        kernel_w`` (never reached) when nothing is removed."""
        if not self.remove_center:
            return self.kernel_h * self.kernel_w
        return (self.kernel_w // 2) * self.kernel_h + self.kernel_h // 2

    def taps(self) -> tuple[list[int], list[int]]:
        """``(tap_x, tap_y)``: each point's position relative to the centre, before scaling.

        Example:
            >>> make_sampling(8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 4, remove_center=True).taps()
            ([-1, -1, -1, 0, 0, 1, 1, 1], [-1, 0, 1, -1, 1, -1, 0, 1])
        """
        tap_x, tap_y = [], []
        for k in range(self.kernel_h * self.kernel_w):
            if k == self.centre:
                continue
            i, j = divmod(k, self.kernel_h)
            tap_x.append(i * self.dilation_w - self.half_w)
            tap_y.append(j * self.dilation_h - self.half_h)
        return tap_x, tap_y

    # Strides: offset x of point p, group g, pixel row r sits at r * offset_row + g * offset_group
    # + 2 * p (y one further); its mask at r * mask_row + g * mask_group + mask_start + p.
    @property
    def offset_row(self) -> int:
        return self.offset_width

    @property
    def offset_group(self) -> int:
        return 3 * self.points if self.packed else 2 * self.points

    @property
    def mask_row(self) -> int:
        return self.offset_width if self.packed else self.group * self.points

    @property
    def mask_group(self) -> int:
        return 3 * self.points if self.packed else self.points

    @property
    def mask_start(self) -> int:
        return 2 * self.points if self.packed else 0


def make_sampling(
    height: int,
    width: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    packed: bool = False,
    offset_width: int | None = None,
) -> Sampling:
    """A :class:`Sampling` for an ``height x width`` input; ``kernel``, ``stride``, ``pad``
    (``(pad_y, pad_x)``, the padding of H and W) and ``dilation`` are ``(h, w)`` pairs. The
    output size follows ``F.conv2d``'s rule (it may be below 1: callers check).
    ``offset_width`` defaults to the unpadded width, ``G * P * 3`` packed or ``G * P * 2``.

    Example:
        >>> s = make_sampling(56, 56, (3, 3), (1, 1), (1, 1), (1, 1), group=4, group_channels=16)
        >>> (s.out_h, s.out_w, s.channels, s.points, s.offset_width)
        (56, 56, 64, 9, 72)
    """
    out_h, out_w = output_size(height, width, kernel, stride, pad, dilation)
    points = kernel[0] * kernel[1] - int(remove_center)
    if offset_width is None:
        offset_width = group * points * (3 if packed else 2)
    return Sampling(
        height=height,
        width=width,
        out_h=out_h,
        out_w=out_w,
        kernel_h=kernel[0],
        kernel_w=kernel[1],
        stride_h=stride[0],
        stride_w=stride[1],
        pad_y=pad[0],
        pad_x=pad[1],
        dilation_h=dilation[0],
        dilation_w=dilation[1],
        group=group,
        group_channels=group_channels,
        offset_scale=float(offset_scale),
        remove_center=bool(remove_center),
        packed=packed,
        offset_width=offset_width,
    )


def operator_sampling(
    height: int, width: int, offset_width: int | None, params: tuple, packed: bool
) -> Sampling:
    """The :class:`Sampling` of an operator call: ``params`` are the operators' arguments from
    ``kernel_h`` to ``remove_center``, in their order; ``packed`` for DCNv4.

    DCNv3's reference pads H by ``pad_w`` and W by ``pad_h`` (see the module docstring); DCNv4
    pads each axis by its own.

    Example:
        >>> s = operator_sampling(8, 9, None, (3, 3, 1, 1, 0, 1, 1, 1, 2, 4, 1.0, False), False)
        >>> (s.pad_y, s.pad_x, s.out_h, s.out_w)
        (1, 0, 8, 7)
    """
    kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, scale, rc = params
    pad = (ph, pw) if packed else (pw, ph)
    return make_sampling(
        height, width, (kh, kw), (sh, sw), pad, (dh, dw), group, group_channels, scale, rc,
        packed, offset_width,
    )  # fmt: skip
