"""The low-rank maths behind the factorizations of :mod:`deformconv.tools.factorize`.

The singular value decomposition (SVD) of a layer's weight, reshaped for each method, gives
every term of its factorization best first (:func:`weight_factors`); :func:`output_errors`
measures the output error of every rank on a batch in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Elements of the per-rank output terms held at once while measuring errors.
_CHUNK_ELEMENTS = 1 << 23


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | str:
    """The layer's padding as explicit ``(ph, pw)``, or ``"same"`` when it is asymmetric."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if all(t % 2 == 0 for t in totals):
            return (totals[0] // 2, totals[1] // 2)
        return "same"
    return (int(conv.padding[0]), int(conv.padding[1]))


def relative_error(residual: Tensor, total: Tensor) -> Tensor:
    """``sqrt(residual / total)`` with ``0 / 0 = 0`` (an all-zero layer is reproduced exactly)."""
    out = (residual.clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt()
    return torch.where(total > 0, out, (residual > 0).to(out.dtype) * math.inf)


@dataclass(frozen=True)
class Factors:
    """The full SVD factors of one layer for one method, in float64.

    ``first`` and ``second`` hold every term, best first; the first ``r`` terms make rank ``r``.
    spatial: ``first`` ``(R, C, kh)`` vertical filters, ``second`` ``(O, R, kw)`` horizontal ones.
    depthwise: ``first`` ``(C, M, kh, kw)`` depthwise kernels, ``second`` ``(O, C, M)`` pointwise.
    """

    method: str
    first: Tensor
    second: Tensor
    weight_errors: tuple[float, ...]


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # LAPACK through NumPy: torch's CPU SVD took 30 to 100 times longer on these shapes.
    u, s, vh = np.linalg.svd(matrix.cpu().numpy(), full_matrices=False)
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)


def weight_factors(weight: Tensor, method: str) -> Factors:
    """Every SVD term of a weight ``(O, C, kh, kw)`` for ``method``, best first, and the weight
    error ``||W - W_r|| / ||W||`` of every rank ``r`` (from the tail of the singular values).

    Example:
        >>> factors = weight_factors(torch.ones(2, 1, 3, 3), "spatial")
        >>> tuple(factors.first.shape), tuple(factors.second.shape)
        ((3, 1, 3), (2, 3, 3))
        >>> factors.weight_errors[0] < 1e-12
        True
    """
    w = weight.detach().to(torch.float64)
    o, c, kh, kw = w.shape
    if method == "spatial":
        u, s, vh = _svd(w.permute(1, 2, 0, 3).reshape(c * kh, o * kw))
        root = s.sqrt()
        first = (u * root).T.reshape(-1, c, kh)
        second = (vh * root[:, None]).reshape(-1, o, kw).permute(1, 0, 2)
        tail = s.square().flip(0).cumsum(0).flip(0)
    else:
        u, s, vh = _svd(w.permute(1, 0, 2, 3).reshape(c, o, kh * kw))
        root = s.sqrt()
        first = (vh * root[..., None]).reshape(c, -1, kh, kw)
        second = (u * root[:, None, :]).permute(1, 0, 2)
        tail = s.square().sum(0).flip(0).cumsum(0).flip(0)
    total = float(tail[0])
    errors = tuple(
        math.sqrt(float(tail[r]) / total) if r < len(tail) and total > 0 else 0.0
        for r in range(1, len(tail) + 1)
    )
    return Factors(method, first.contiguous(), second.contiguous(), errors)


def pad_like(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``x`` padded as ``conv`` pads it, so that a convolution without padding follows."""
    pad = conv_padding(conv)
    if pad == "same":
        (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    ph, pw = pad
    if ph == pw == 0:
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, (pw, pw, ph, ph), mode=mode)


def output_errors(
    conv: nn.Conv2d,
    factors: Factors,
    x: Tensor,
    reference: Tensor,
    ranks: int,
    stop_at: float | None = None,
) -> list[float]:
    """Relative output errors ``||reference - approx_r(x)|| / ||reference||`` for
    ``r = 1 .. ranks``, where ``reference = conv(x)``; with ``stop_at``, the list may end at the
    first rank whose error is at most ``stop_at``.

    One pass: the first step of the factorisation runs once with every kept term, then the
    terms' outputs are added one rank at a time.
    """
    like = {"device": x.device, "dtype": x.dtype}
    total = reference.square().sum(dtype=torch.float64)
    residual = reference if conv.bias is None else reference - conv.bias[:, None, None]
    xp = pad_like(conv, x)
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    errors: list[float] = []
    if factors.method == "spatial":
        o = residual.shape[1]
        vertical = factors.first[:ranks, :, :, None].to(**like)
        rows = F.conv2d(xp, vertical, stride=(sh, 1), dilation=(dh, 1))
        chunk = max(1, _CHUNK_ELEMENTS // max(1, residual.numel()))
        for start in range(0, ranks, chunk):
            k = min(chunk, ranks - start)
            horizontal = factors.second[:, start : start + k].transpose(0, 1)
            terms = F.conv2d(
                rows[:, start : start + k],
                horizontal.reshape(k * o, 1, 1, -1).to(**like),
                stride=(1, sw),
                dilation=(1, dw),
                groups=k,
            ).unflatten(1, (k, o))
            # In place, as these are the largest tensors here: partial sums minus the residual
            # is the negated new residual, and its sign does not change the norm.
            diff = terms.cumsum_(1).sub_(residual.unsqueeze(1))
            residual = -diff[:, -1]
            squared = diff.square_().sum(dim=(2, 3, 4)).sum(0, dtype=torch.float64)
            errors += relative_error(squared, total).tolist()
            if stop_at is not None and min(errors) <= stop_at:
                break
    else:
        c, _, kh, kw = factors.first.shape
        depthwise = factors.first[:, :ranks].reshape(c * ranks, 1, kh, kw).to(**like)
        maps = F.conv2d(xp, depthwise, stride=conv.stride, dilation=conv.dilation, groups=c)
        maps = maps.unflatten(1, (c, ranks))
        pointwise = factors.second[..., None, None].to(**like)
        for t in range(ranks):
            residual = residual - F.conv2d(maps[:, :, t], pointwise[:, :, t])
            errors.append(float(relative_error(residual.square().sum(dtype=torch.float64), total)))
            if stop_at is not None and errors[-1] <= stop_at:
                break
    return errors
