"""Spatially separable convolution: a ``kh x 1`` convolution, then a ``1 x kw`` one.

A 2-D kernel that is an outer product ``column ⊗ row`` (rank 1), such as Sobel, box, Gaussian
and binomial filters, can be applied as two 1-D passes: ``kh + kw`` multiplications per output
value instead of ``kh * kw``. Inception-v3 (Szegedy et al., 2016, arXiv:1512.00567) uses the
same factorisation across channels (``7 x 1`` then ``1 x 7``) as a cheaper layer to learn.

Only rank-1 kernels factor exactly. :meth:`SpatiallySeparableConv2d.from_kernel` refuses any other
kernel and points to ``deformconv.tools.separability.factorize_kernel`` (``deformconv factor`` on
the command line), which approximates a kernel by a sum of separable ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformconv._validation import check_int, padding_pair, to_pair
from deformconv.nn.depthwise import PaddingArg, _geometry_repr, _pad_mode, same_padding

__all__ = ["SpatiallySeparableConv2d"]

ArrayLike = Tensor | np.ndarray


class SpatiallySeparableConv2d(nn.Module):
    """A ``kh x 1`` convolution (``vertical``) followed by a ``1 x kw`` one (``horizontal``).

    With ``per_channel=True`` both passes are depthwise (every channel keeps its own pair of 1-D
    filters, ``out_channels == in_channels``): the layer equals a depthwise convolution whose
    kernels are the outer products ``vertical ⊗ horizontal``. Otherwise ``vertical`` maps
    ``in_channels`` to ``mid_channels`` and ``horizontal`` maps those to ``out_channels``, as in
    Inception-v3.

    The vertical pass strides, pads and dilates rows only, the horizontal pass columns only, so
    the output size is that of the full ``kh x kw`` convolution with the same settings, and
    :meth:`equivalent_weight` gives that convolution's weight.

    Args:
        in_channels: channels ``C`` of the input.
        out_channels: channels of the output; must equal ``in_channels`` when ``per_channel``.
        kernel_size: ``(kh, kw)`` or one int.
        stride: ``(sh, sw)`` or one int.
        padding: zeros ``(ph, pw)`` on both sides, one int, ``"valid"`` or ``"same"``
            (TensorFlow's rule, as :func:`~deformconv.nn.depthwise.same_padding`).
        dilation: ``(dh, dw)`` or one int.
        per_channel: filter every channel on its own instead of mixing channels.
        mid_channels: channels between the two passes when mixing channels (default
            ``out_channels``); must be ``None`` or ``in_channels`` when ``per_channel``.
        bias: add a bias after the horizontal pass.
        padding_mode: what the padding holds: ``"zeros"``, ``"reflect"``, ``"replicate"`` or
            ``"circular"`` (as in ``torch.nn.Conv2d``). Rows are padded before the vertical
            pass and columns before the horizontal one, which for every mode gives the full
            convolution with that padding (padding one axis commutes with filtering the other).

    Shape:
        - input: ``(B, C, H, W)``
        - between the passes: ``(B, mid_channels, H_out, W)`` (``W`` plus the column padding
          is what the horizontal pass sees)
        - output: ``(B, out_channels, H_out, W_out)``, with
          ``H_out = floor((H + 2 * ph - dh * (kh - 1) - 1) / sh) + 1``.

    Example:
        >>> layer = SpatiallySeparableConv2d(16, 32, kernel_size=3, padding=1)
        >>> layer(torch.rand(1, 16, 10, 10)).shape
        torch.Size([1, 32, 10, 10])
        >>> layer.equivalent_weight().shape
        torch.Size([32, 16, 3, 3])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        per_channel: bool = False,
        mid_channels: int | None = None,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _pad_mode(padding_mode)
        check_int(in_channels, "in_channels")
        check_int(out_channels, "out_channels")
        if per_channel:
            if out_channels != in_channels:
                raise ValueError(
                    "out_channels must equal in_channels when per_channel=True, got "
                    f"in_channels={in_channels}, out_channels={out_channels}"
                )
            if mid_channels not in (None, in_channels):
                raise ValueError(
                    "mid_channels must be None or in_channels when per_channel=True, got "
                    f"mid_channels={mid_channels}, in_channels={in_channels}"
                )
            mid_channels = in_channels
        elif mid_channels is None:
            mid_channels = out_channels
        else:
            check_int(mid_channels, "mid_channels")
        (kh, kw), (sh, sw) = to_pair(kernel_size, "kernel_size", 1), to_pair(stride, "stride", 1)
        dh, dw = to_pair(dilation, "dilation", 1)
        pad = padding_pair(padding)
        self.padding = pad
        ph, pw = (0, 0) if pad == "same" else pad
        factory = {"device": device, "dtype": dtype}
        self.vertical = nn.Conv2d(
            in_channels,
            mid_channels,
            (kh, 1),
            stride=(sh, 1),
            padding=(ph, 0),
            dilation=(dh, 1),
            groups=in_channels if per_channel else 1,
            bias=False,
            padding_mode=padding_mode,
            **factory,
        )
        self.horizontal = nn.Conv2d(
            mid_channels,
            out_channels,
            (1, kw),
            stride=(1, sw),
            padding=(0, pw),
            dilation=(1, dw),
            groups=in_channels if per_channel else 1,
            bias=bias,
            padding_mode=padding_mode,
            **factory,
        )
        self.per_channel = bool(per_channel)

    @property
    def in_channels(self) -> int:
        return self.vertical.in_channels

    @property
    def out_channels(self) -> int:
        return self.horizontal.out_channels

    @property
    def mid_channels(self) -> int:
        return self.vertical.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.vertical.kernel_size[0], self.horizontal.kernel_size[1]

    @property
    def stride(self) -> tuple[int, int]:
        return self.vertical.stride[0], self.horizontal.stride[1]

    @property
    def padding_mode(self) -> str:
        return self.vertical.padding_mode

    @property
    def dilation(self) -> tuple[int, int]:
        return self.vertical.dilation[0], self.horizontal.dilation[1]

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``Tensor[B, C, H, W]`` into ``Tensor[B, out_channels, H_out, W_out]``."""
        if self.padding != "same":
            return self.horizontal(self.vertical(input))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        mode = _pad_mode(self.padding_mode)
        top, bottom = same_padding(input.shape[-2], kh, sh, dh)
        rows = self.vertical(F.pad(input, (0, 0, top, bottom), mode=mode))
        left, right = same_padding(rows.shape[-1], kw, sw, dw)
        return self.horizontal(F.pad(rows, (left, right, 0, 0), mode=mode))

    def equivalent_weight(self) -> Tensor:
        """The weight of the single ``kh x kw`` convolution that this layer equals.

        Returns:
            ``Tensor[C, 1, kh, kw]`` (a depthwise weight) when ``per_channel``, otherwise
            ``Tensor[out_channels, in_channels, kh, kw]``.

        Example:
            >>> sobel = SpatiallySeparableConv2d.from_kernels([1.0, 2.0, 1.0], [-1.0, 0.0, 1.0])
            >>> sobel.equivalent_weight()[0, 0].detach()
            tensor([[-1.,  0.,  1.],
                    [-2.,  0.,  2.],
                    [-1.,  0.,  1.]])
        """
        v = self.vertical.weight[..., 0]
        h = self.horizontal.weight[:, :, 0]
        if self.per_channel:
            return torch.einsum("ci,cj->cij", v[:, 0], h[:, 0]).unsqueeze(1)
        return torch.einsum("mci,omj->ocij", v, h)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"]
        parts += _geometry_repr(self.stride, self.padding, self.dilation)
        if self.per_channel:
            parts.append("per_channel=True")
        elif self.mid_channels != self.out_channels:
            parts.append(f"mid_channels={self.mid_channels}")
        if self.horizontal.bias is None:
            parts.append("bias=False")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        return ", ".join(parts)

    @classmethod
    def from_kernels(
        cls,
        column: ArrayLike | list[float],
        row: ArrayLike | list[float],
        in_channels: int = 1,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
    ) -> SpatiallySeparableConv2d:
        """A per-channel layer (no bias) holding the given 1-D filters.

        Args:
            column: vertical filter ``[kh]`` shared by every channel, or ``[in_channels, kh]``.
            row: horizontal filter ``[kw]``, or ``[in_channels, kw]``.
            in_channels: channels ``C`` of the input (and output).
            stride: as in the constructor.
            padding: as in the constructor.
            dilation: as in the constructor.

        Example:
            >>> blur = SpatiallySeparableConv2d.from_kernels([1.0, 2.0, 1.0], [1.0, 2.0, 1.0], 3)
            >>> blur(torch.ones(1, 3, 5, 5)).shape
            torch.Size([1, 3, 3, 3])
        """
        col = _per_channel_filters(column, "column", in_channels)
        rw = _per_channel_filters(row, "row", in_channels)
        layer = cls(
            in_channels,
            in_channels,
            (col.shape[1], rw.shape[1]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            per_channel=True,
            bias=False,
        )
        with torch.no_grad():
            layer.vertical.weight.copy_(col.reshape(in_channels, 1, -1, 1))
            layer.horizontal.weight.copy_(rw.reshape(in_channels, 1, 1, -1))
        return layer

    @classmethod
    def from_kernel(
        cls,
        kernel: ArrayLike | list[list[float]],
        in_channels: int = 1,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        rtol: float | None = None,
    ) -> SpatiallySeparableConv2d:
        """A per-channel layer (no bias) equal to filtering with a separable 2-D kernel.

        The kernel is split by its singular value decomposition into ``column ⊗ row``, scaled so
        that the largest entry of ``row`` is 1 and the largest of ``column`` is positive (Sobel
        becomes ``[1, 2, 1] ⊗ [-1, 0, 1]``).

        Args:
            kernel: ``[kh, kw]`` applied to every channel, or ``[in_channels, kh, kw]``.
            in_channels: channels ``C`` of the input (and output).
            stride: as in the constructor.
            padding: as in the constructor.
            dilation: as in the constructor.
            rtol: singular values below ``rtol`` times the largest count as zero; default
                ``max(kh, kw)`` times the machine epsilon of the kernel's dtype.

        Raises:
            ValueError: if a kernel has rank above 1, i.e. is not separable.

        Example:
            >>> sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
            >>> layer = SpatiallySeparableConv2d.from_kernel(sobel_x, padding=1)
            >>> layer.vertical.weight.flatten().tolist(), layer.horizontal.weight.flatten().tolist()
            ([1.0, 2.0, 1.0], [-1.0, 0.0, 1.0])
        """
        array = kernel.detach().cpu().numpy() if isinstance(kernel, Tensor) else np.asarray(kernel)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[0] != in_channels):
            raise ValueError(
                f"kernel must have shape [kh, kw] or [in_channels={in_channels}, kh, kw], "
                f"got {list(array.shape)}"
            )
        dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float64)
        stack = array.reshape(-1, *array.shape[-2:]).astype(np.float64)
        tolerance = max(stack.shape[1:]) * np.finfo(dtype).eps if rtol is None else rtol
        columns, rows = [], []
        for index, matrix in enumerate(stack):
            u, s, vt = np.linalg.svd(matrix)
            rank = int(np.sum(s > tolerance * s[0])) if s[0] > 0 else 0
            if rank > 1:
                where = f"kernel[{index}]" if array.ndim == 3 else "kernel"
                values = ", ".join(f"{v:.4g}" if v > tolerance * s[0] else "0" for v in s)
                raise ValueError(
                    f"{where} of shape {list(matrix.shape)} is not separable: it has rank {rank} "
                    f"(singular values {values}), and only a rank-1 kernel (an outer product "
                    "column x row) splits exactly into a k x 1 and a 1 x k convolution. "
                    "Approximate it with deformconv.tools.separability.factorize_kernel "
                    "(`deformconv factor` on the command line), or use a full or depthwise "
                    "separable convolution."
                )
            col, rw = u[:, 0] * s[0], vt[0]
            scale = rw[np.argmax(np.abs(rw))]
            col, rw = col * scale, rw / scale
            if col[np.argmax(np.abs(col))] < 0:
                col, rw = -col, -rw
            # Adding 0.0 turns the -0.0 entries that the sign flip leaves into 0.0.
            columns.append(col + 0.0)
            rows.append(rw + 0.0)
        column_array, row_array = np.stack(columns), np.stack(rows)
        if array.ndim == 2:
            column_array, row_array = column_array[0], row_array[0]
        return cls.from_kernels(
            torch.as_tensor(column_array),
            torch.as_tensor(row_array),
            in_channels,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )


def _per_channel_filters(values: ArrayLike | list[float], name: str, channels: int) -> Tensor:
    """1-D filters as ``Tensor[channels, k]``, repeating a single ``[k]`` filter per channel."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {channels!r}")
    tensor = torch.as_tensor(values if isinstance(values, Tensor) else np.asarray(values))
    if tensor.ndim == 1 and tensor.shape[0] > 0:
        return tensor.expand(channels, -1)
    if tensor.ndim == 2 and tensor.shape[0] == channels and tensor.shape[1] > 0:
        return tensor
    raise ValueError(
        f"{name} must have shape [k] or [in_channels={channels}, k] with k >= 1, "
        f"got {list(tensor.shape)}"
    )
