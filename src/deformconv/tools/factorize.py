"""Cheaper separable versions of trained ``nn.Conv2d`` layers, one layer or a whole model.

A layer with weight ``W`` of shape ``(O, C, kh, kw)`` (``groups=1``) is replaced by one of two
factorisations, both read off a singular value decomposition (SVD), so each is the best of its
size in the Frobenius norm of the weight:

- **spatial** (Jaderberg, Vedaldi and Zisserman 2014, "Speeding up Convolutional Neural Networks
  with Low Rank Expansions", scheme 2): ``W`` reshaped to the ``(C * kh, O * kw)`` matrix
  ``M[(c, i), (o, j)] = W[o, c, i, j]`` and truncated to rank ``r`` gives ``r`` vertical
  ``kh x 1`` filters over the ``C`` input channels and ``O`` horizontal ``1 x kw`` filters over
  those ``r`` maps: a :class:`~deformconv.nn.spatial.SpatiallySeparableConv2d` with
  ``mid_channels=r``. The vertical pass takes the row stride, padding and dilation, the
  horizontal pass the column ones. Exact at ``r = min(C * kh, O * kw)``.
- **depthwise**: for each input channel ``c``, the ``(O, kh * kw)`` slice ``W[:, c]`` truncated
  to rank ``m`` gives ``m`` depthwise kernels and their ``O`` pointwise weights: a
  :class:`~deformconv.nn.separable.SeparableConv2d` with ``depth_multiplier=m``. Exact once
  ``m`` reaches the slice's rank, at the latest at ``m = min(O, kh * kw)``.

Both keep the layer's padding mode (reflect, replicate and circular padding pad each axis on its
own, so splitting them between the passes is exact). Errors are relative Frobenius norms: of the
weight, ``||W - W_r|| / ||W||``, and of the output on an input batch,
``||conv(x) - approx(x)|| / ||conv(x)||`` (bias included). Parameters and multiply-accumulates
(MACs, one per multiplication) come from :mod:`deformconv.tools.arithmetic`, per input image.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformconv.nn.separable import DeformableSeparableConv2d, SeparableConv2d
from deformconv.nn.spatial import SpatiallySeparableConv2d
from deformconv.tools.arithmetic import ConvSpec, conv_cost, spec_from_module
from deformconv.tools.model_cost import model_cost

__all__ = [
    "METHODS",
    "ConvFactorization",
    "LayerReport",
    "ModelFactorization",
    "conv_layers",
    "factorize_conv",
    "factorize_layers",
    "factorize_model",
    "full_rank",
    "load_model",
    "rank_errors",
    "to_depthwise_separable",
    "to_spatially_separable",
]

Method = Literal["spatial", "depthwise"]
METHODS: tuple[str, ...] = ("spatial", "depthwise")
Progress = Callable[[int, int, str], None]

_COMPOSITE = (SeparableConv2d, SpatiallySeparableConv2d, DeformableSeparableConv2d)
# Elements of the per-rank output terms held at once while measuring errors.
_CHUNK_ELEMENTS = 1 << 23


def _padding(conv: nn.Conv2d) -> tuple[int, int] | str:
    """The layer's padding as explicit ``(ph, pw)``, or ``"same"`` when it is asymmetric."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if all(t % 2 == 0 for t in totals):
            return (totals[0] // 2, totals[1] // 2)
        return "same"
    return (int(conv.padding[0]), int(conv.padding[1]))


def _ineligible(conv: nn.Module, method: str) -> str | None:
    """Why ``conv`` cannot be factored by ``method``, or ``None`` when it can."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    kh, kw = conv.kernel_size
    if conv.groups != 1:
        return f"groups={conv.groups}; only groups=1 layers are factored"
    if kh * kw == 1:
        return "a 1 x 1 kernel has nothing to split"
    if method == "spatial" and min(kh, kw) == 1:
        return f"a {kh} x {kw} kernel has nothing to split into k x 1 and 1 x k"
    return None


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


def _check_conv(conv: nn.Module, method: str) -> nn.Conv2d:
    _check_method(method)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    reason = _ineligible(conv, method)
    if reason is not None:
        raise ValueError(f"conv cannot be factored by method {method!r}: {reason}")
    return conv


def full_rank(conv: nn.Conv2d, method: Method) -> int:
    """The rank (``spatial``) or depth multiplier (``depthwise``) that reproduces ``conv`` exactly.

    Args:
        conv: a ``groups=1`` layer with weight ``(O, C, kh, kw)``.
        method: ``"spatial"``, ``min(C * kh, O * kw)``; ``"depthwise"``, ``min(O, kh * kw)``.

    Example:
        >>> conv = nn.Conv2d(16, 32, 3)
        >>> full_rank(conv, "spatial"), full_rank(conv, "depthwise")
        (48, 9)
    """
    _check_method(method)
    o, c, kh, kw = conv.weight.shape
    return min(c * kh, o * kw) if method == "spatial" else min(o, kh * kw)


def _relative(residual: Tensor, total: Tensor) -> Tensor:
    """``sqrt(residual / total)`` with ``0 / 0 = 0`` (an all-zero layer is reproduced exactly)."""
    out = (residual.clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt()
    return torch.where(total > 0, out, (residual > 0).to(out.dtype) * math.inf)


@dataclass(frozen=True)
class _Factors:
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


def _factors(weight: Tensor, method: str) -> _Factors:
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
    return _Factors(method, first.contiguous(), second.contiguous(), errors)


def _check_rank(rank: int, full: int, name: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"{name} must be an int in [1, {full}], got {rank!r}")
    return rank


def _build(conv: nn.Conv2d, factors: _Factors, rank: int) -> nn.Module:
    o, c, kh, kw = conv.weight.shape
    like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    common: dict[str, Any] = {
        "stride": conv.stride,
        "padding": _padding(conv),
        "dilation": conv.dilation,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
        **like,
    }
    module: SpatiallySeparableConv2d | SeparableConv2d
    with torch.no_grad():
        if factors.method == "spatial":
            module = SpatiallySeparableConv2d(c, o, (kh, kw), mid_channels=rank, **common)
            module.vertical.weight.copy_(factors.first[:rank, :, :, None])
            module.horizontal.weight.copy_(factors.second[:, :rank, None, :])
            out_conv = module.horizontal
        else:
            module = SeparableConv2d(c, o, (kh, kw), depth_multiplier=rank, **common)
            module.depthwise.weight.copy_(factors.first[:, :rank].reshape(c * rank, 1, kh, kw))
            module.pointwise.weight.copy_(factors.second[:, :, :rank].reshape(o, c * rank, 1, 1))
            out_conv = module.pointwise
        if conv.bias is not None:
            assert out_conv.bias is not None
            out_conv.bias.copy_(conv.bias)
    return module.train(conv.training)


def to_spatially_separable(conv: nn.Conv2d, rank: int | None = None) -> SpatiallySeparableConv2d:
    """A ``kh x 1`` then ``1 x kw`` approximation of rank ``rank`` of a trained layer.

    Args:
        conv: an ``nn.Conv2d`` with ``groups=1`` and ``kh, kw > 1``; any stride, padding,
            dilation and padding mode.
        rank: channels between the two passes, ``1 .. full_rank(conv, "spatial")``; ``None``
            for the full rank, which reproduces ``conv`` exactly.

    Returns:
        A :class:`~deformconv.nn.spatial.SpatiallySeparableConv2d` on ``conv``'s device and dtype.

    Example:
        >>> conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        >>> layer = to_spatially_separable(conv)
        >>> layer.mid_channels
        12
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.allclose(layer(x), conv(x), atol=1e-5)
        True
    """
    conv = _check_conv(conv, "spatial")
    factors = _factors(conv.weight, "spatial")
    full = full_rank(conv, "spatial")
    module = _build(conv, factors, full if rank is None else _check_rank(rank, full, "rank"))
    assert isinstance(module, SpatiallySeparableConv2d)
    return module


def to_depthwise_separable(conv: nn.Conv2d, depth_multiplier: int | None = None) -> SeparableConv2d:
    """A depthwise then pointwise approximation of a trained layer.

    Args:
        conv: an ``nn.Conv2d`` with ``groups=1`` and a kernel larger than ``1 x 1``.
        depth_multiplier: depthwise kernels per input channel,
            ``1 .. full_rank(conv, "depthwise")``; ``None`` for the full rank (exact).

    Returns:
        A :class:`~deformconv.nn.separable.SeparableConv2d` on ``conv``'s device and dtype.

    Example:
        >>> conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2)
        >>> layer = to_depthwise_separable(conv)
        >>> layer.depth_multiplier
        6
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.allclose(layer(x), conv(x), atol=1e-5)
        True
    """
    conv = _check_conv(conv, "depthwise")
    factors = _factors(conv.weight, "depthwise")
    full = full_rank(conv, "depthwise")
    rank = (
        full
        if depth_multiplier is None
        else _check_rank(depth_multiplier, full, "depth_multiplier")
    )
    module = _build(conv, factors, rank)
    assert isinstance(module, SeparableConv2d)
    return module


def _pad(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``x`` padded as ``conv`` pads it, so that a convolution without padding follows."""
    pad = _padding(conv)
    if pad == "same":
        (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    ph, pw = pad
    if ph == pw == 0:
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, (pw, pw, ph, ph), mode=mode)


def _output_errors(
    conv: nn.Conv2d,
    factors: _Factors,
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
    xp = _pad(conv, x)
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
            errors += _relative(squared, total).tolist()
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
            errors.append(float(_relative(residual.square().sum(dtype=torch.float64), total)))
            if stop_at is not None and errors[-1] <= stop_at:
                break
    return errors


def _random_input(conv: nn.Conv2d, generator: torch.Generator | None) -> Tensor:
    """A standard normal batch of 4 images, at least 32 x 32 and large enough for the kernel."""
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    h, w = max(32, dh * (kh - 1) + 1), max(32, dw * (kw - 1) + 1)
    x = torch.randn(4, conv.in_channels, h, w, generator=generator, dtype=torch.float64)
    return x.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _check_inputs(conv: nn.Conv2d, inputs: Tensor) -> Tensor:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a Tensor, got {type(inputs).__name__}")
    if inputs.dim() != 4 or inputs.shape[1] != conv.in_channels or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must have shape (B >= 1, {conv.in_channels}, H, W) for this layer, "
            f"got {tuple(inputs.shape)}"
        )
    if inputs.dtype != conv.weight.dtype:
        raise TypeError(
            f"inputs must have the layer's dtype {conv.weight.dtype}, got {inputs.dtype}"
        )
    return inputs.to(conv.weight.device)


def rank_errors(
    conv: nn.Conv2d,
    method: Method,
    inputs: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Weight and output errors of ``conv``'s factorisation at every rank.

    Args:
        conv: an eligible ``nn.Conv2d`` (``groups=1``).
        method: ``"spatial"`` or ``"depthwise"``.
        inputs: ``(B, C, H, W)`` batch on which output errors are measured; ``None`` for a
            standard normal batch of 4 images, at least 32 x 32 (drawn from ``generator``).
        generator: random source for the batch.

    Returns:
        ``(weight_errors, output_errors)``: relative errors for ranks ``1 .. full_rank``; both
        end at 0 up to rounding.

    Example:
        >>> torch.manual_seed(0) and None
        >>> conv = nn.Conv2d(3, 8, 3)
        >>> weight_err, output_err = rank_errors(conv, "depthwise")
        >>> len(output_err), output_err[-1] < 1e-5
        (8, True)
    """
    conv = _check_conv(conv, method)
    x = _random_input(conv, generator) if inputs is None else _check_inputs(conv, inputs)
    factors = _factors(conv.weight, method)
    full = full_rank(conv, method)
    with torch.no_grad():
        errors = _output_errors(conv, factors, x, conv(x), full)
    return factors.weight_errors, tuple(errors)


def _spec(conv: nn.Conv2d, method: str | None, rank: int) -> ConvSpec:
    base = spec_from_module(conv)
    if method is None:
        return base
    kind = "spatial" if method == "spatial" else "separable"
    extra = {"mid_channels": rank} if method == "spatial" else {"depth_multiplier": rank}
    padding = _padding(conv)
    return ConvSpec(
        kind,
        conv.in_channels,
        conv.out_channels,
        base.kernel_size,
        base.stride,
        padding,
        base.dilation,
        bias=base.bias,
        **extra,
    )


@dataclass(frozen=True)
class ConvFactorization:
    """One layer and its separable approximation.

    Attributes:
        method: ``"spatial"`` or ``"depthwise"``.
        rank: channels between the passes (spatial) or depth multiplier (depthwise).
        full_rank: the rank at which the approximation is exact.
        module: the approximation, ready to replace the layer.
        input_shape: ``(B, C, H, W)`` of the batch the errors were measured on.
        params_before, params_after: parameters of the layer and of ``module``.
        macs_before, macs_after: multiply-accumulates per input image.
        weight_error: ``||W - W_r|| / ||W||``.
        output_error: ``||conv(x) - module(x)|| / ||conv(x)||`` on the batch.
        rank_errors: output error at every rank ``1 .. full_rank`` on the same batch.
    """

    method: str
    rank: int
    full_rank: int
    module: nn.Module
    input_shape: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    weight_error: float
    output_error: float
    rank_errors: tuple[float, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Numbers and lists for ``json.dumps`` (the module left out)."""
        return {
            "method": self.method,
            "rank": self.rank,
            "full_rank": self.full_rank,
            "input_shape": list(self.input_shape),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "weight_error": self.weight_error,
            "output_error": self.output_error,
            "rank_errors": list(self.rank_errors),
        }


def _check_error_bound(max_error: float | None) -> None:
    if max_error is not None and not (
        isinstance(max_error, int | float) and not isinstance(max_error, bool) and max_error >= 0
    ):
        raise ValueError(f"max_error must be a number >= 0 or None, got {max_error!r}")


def factorize_conv(
    conv: nn.Conv2d,
    method: Method = "depthwise",
    rank: int | None = None,
    max_error: float | None = None,
    inputs: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ConvFactorization:
    """Approximate a trained layer by a separable one and measure what it costs and saves.

    Args:
        conv: an ``nn.Conv2d`` with ``groups=1`` (any channels, stride, padding, dilation).
        method: ``"spatial"`` (``kh x 1`` then ``1 x kw``, :func:`to_spatially_separable`) or
            ``"depthwise"`` (depthwise then pointwise, :func:`to_depthwise_separable`).
        rank: the rank or depth multiplier to use.
        max_error: instead of ``rank``, the smallest rank whose output error on the batch is at
            most this. With neither, the full rank (exact).
        inputs: ``(B, C, H, W)`` batch for the output error; ``None`` for a standard normal batch
            of 4 images, at least 32 x 32.
        generator: random source for that batch.

    Returns:
        A :class:`ConvFactorization`.

    Example:
        >>> torch.manual_seed(0) and None
        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> result = factorize_conv(conv, "depthwise", rank=4)
        >>> result.params_before, result.params_after
        (4640, 2656)
        >>> result.output_error < result.rank_errors[0]
        True
    """
    conv = _check_conv(conv, method)
    if rank is not None and max_error is not None:
        raise ValueError(
            f"give rank or max_error, not both; got rank={rank}, max_error={max_error}"
        )
    _check_error_bound(max_error)
    x = _random_input(conv, generator) if inputs is None else _check_inputs(conv, inputs)
    full = full_rank(conv, method)
    factors = _factors(conv.weight, method)
    with torch.no_grad():
        reference = conv(x)
        total = reference.square().sum(dtype=torch.float64)
        errors = tuple(_output_errors(conv, factors, x, reference, full))
        if max_error is not None:
            rank = next((r for r, e in enumerate(errors, 1) if e <= max_error), full)
        chosen = full if rank is None else _check_rank(rank, full, "rank")
        module = _build(conv, factors, chosen)
        diff = (module(x) - reference).square().sum(dtype=torch.float64)
    size = (x.shape[2], x.shape[3])
    before = conv_cost(spec_from_module(conv), size)
    after = conv_cost(spec_from_module(module), size)
    return ConvFactorization(
        method=method,
        rank=chosen,
        full_rank=full,
        module=module,
        input_shape=tuple(x.shape),
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        weight_error=factors.weight_errors[chosen - 1],
        output_error=float(_relative(diff, total)),
        rank_errors=errors,
    )


@dataclass(frozen=True)
class LayerReport:
    """What :func:`factorize_model` did with one ``nn.Conv2d`` of the model.

    Attributes:
        name: the layer's name in ``model.named_modules()``.
        shape: ``"C->O khxkw"`` then ``s`` stride, ``p`` padding, ``d`` dilation and ``g``
            groups where they are not 1, 0, 1 and 1, e.g. ``"16->32 3x3 s2 p1"``.
        method: ``"spatial"`` or ``"depthwise"``, or ``None`` when the layer was kept.
        rank: rank or depth multiplier (0 when kept).
        full_rank: the exact rank of that method (0 when kept).
        input_shape: ``(B, C, H, W)`` the layer saw (empty when it never ran).
        params_before, params_after: parameters.
        macs_before, macs_after: multiply-accumulates per input image (0 when it never ran).
        weight_error: relative error of the weight.
        output_error: relative error of the layer's output on its own input from the batch.
        note: why the layer was kept, or ``""``.
    """

    name: str
    shape: str
    method: str | None
    rank: int
    full_rank: int
    input_shape: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    weight_error: float
    output_error: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        """Numbers and strings for ``json.dumps``."""
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out


@dataclass(frozen=True)
class ModelFactorization:
    """The converted model and a report per ``nn.Conv2d``.

    Attributes:
        model: a converted copy (the original is untouched), in the original's train/eval mode.
        layers: one :class:`LayerReport` per ``nn.Conv2d``, in ``named_modules()`` order.
        input_shape: shape of the batch everything was measured on.
        params_before, params_after: parameters of the whole model.
        macs_before, macs_after: multiply-accumulates of the whole model per input image, as
            :func:`~deformconv.tools.model_cost.model_cost` counts them.
        output_error: ``||model(x) - converted(x)|| / ||model(x)||`` on the batch, over every
            tensor the model returns, both in eval mode.
    """

    model: nn.Module
    layers: tuple[LayerReport, ...]
    input_shape: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    output_error: float

    def to_dict(self) -> dict[str, Any]:
        """Numbers, strings and lists for ``json.dumps`` (the model left out)."""
        return {
            "input_shape": list(self.input_shape),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "output_error": self.output_error,
            "layers": [layer.to_dict() for layer in self.layers],
        }


@dataclass(frozen=True)
class _Option:
    """One way to treat a layer: ``method=None`` keeps it; ``factors`` builds the others."""

    method: str | None
    rank: int
    params: int
    macs: int
    weight_error: float
    output_error: float
    factors: _Factors | None = field(default=None, repr=False, compare=False)


def _pair_text(pair: tuple[int, ...] | str) -> str:
    if isinstance(pair, str):
        return pair
    return str(pair[0]) if len(set(pair)) == 1 else "x".join(map(str, pair))


def _shape_text(conv: nn.Conv2d) -> str:
    """``"16->32 3x3 s2 p1"``: channels, kernel, then stride, padding, dilation and groups
    where they are not 1, 0, 1 and 1."""
    kh, kw = conv.kernel_size
    text = f"{conv.in_channels}->{conv.out_channels} {kh}x{kw}"
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    for letter, value, default in (
        ("s", conv.stride, (1, 1)),
        ("p", padding, (0, 0)),
        ("d", conv.dilation, (1, 1)),
    ):
        if value != default:
            text += f" {letter}{_pair_text(value)}"
    if conv.padding_mode != "zeros":
        text += f" {conv.padding_mode}"
    if conv.groups != 1:
        text += f" g{conv.groups}"
    return text


def _options(
    conv: nn.Conv2d,
    methods: tuple[str, ...],
    x: Tensor,
    reference: Tensor,
    stop_at: float | None = None,
) -> tuple[list[_Option], tuple[int, ...]]:
    """Every useful option for ``conv`` on its input ``x`` (``reference = conv(x)``): keeping
    it, and each rank of each method that has fewer parameters than the layer; with
    ``stop_at``, no rank beyond the first whose output error is at most that."""
    size = (x.shape[2], x.shape[3])
    original = conv_cost(_spec(conv, None, 0), size)
    options = [_Option(None, 0, original.params, original.macs, 0.0, 0.0)]
    with torch.no_grad():
        for method in methods:
            if _ineligible(conv, method) is not None:
                continue
            costs = [
                conv_cost(_spec(conv, method, r), size)
                for r in range(1, full_rank(conv, method) + 1)
            ]
            useful = sum(cost.params < original.params for cost in costs)
            if useful == 0:
                continue
            factors = _factors(conv.weight, method)
            errors = _output_errors(conv, factors, x, reference, useful, stop_at)
            options += [
                _Option(
                    method,
                    r,
                    costs[r - 1].params,
                    costs[r - 1].macs,
                    factors.weight_errors[r - 1],
                    e,
                    factors,
                )
                for r, e in enumerate(errors, 1)
            ]
    return options, tuple(x.shape)


def _lower_hull(options: list[_Option]) -> list[_Option]:
    """The options on the lower convex hull of (parameters, squared error), cheapest first,
    up to the most exact: the only ones a greedy budget allocation should step through."""
    points = sorted(options, key=lambda o: (o.params, o.output_error))
    hull: list[_Option] = []
    for p in points:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (b.params - a.params) * (p.output_error**2 - a.output_error**2) - (
                b.output_error**2 - a.output_error**2
            ) * (p.params - a.params)
            if cross > 0:
                break
            hull.pop()
        hull.append(p)
    best = min(range(len(hull)), key=lambda i: (hull[i].output_error, hull[i].params))
    return hull[: best + 1]


def _allocate(
    candidates: list[list[_Option]], fixed_params: int, max_params: int | None
) -> list[_Option]:
    """The cheapest option per layer, then, within ``max_params``, the upgrades that remove the
    most squared output error per added parameter."""
    chosen = [min(opts, key=lambda o: (o.params, o.output_error)) for opts in candidates]
    if max_params is None:
        return chosen
    used = fixed_params + sum(o.params for o in chosen)
    if used > max_params:
        raise ValueError(
            f"max_params={max_params} cannot be met: even the cheapest allowed conversion of "
            f"every layer leaves {used} parameters"
        )
    steps = []
    for index, opts in enumerate(candidates):
        hull = _lower_hull(opts)
        for a, b in itertools.pairwise(hull):
            gain = (a.output_error**2 - b.output_error**2) / (b.params - a.params)
            steps.append((-gain, index, b))
    blocked: set[int] = set()
    for _, index, option in sorted(steps, key=lambda s: (s[0], s[1])):
        if index in blocked:
            continue
        extra = option.params - chosen[index].params
        if used + extra <= max_params:
            chosen[index] = option
            used += extra
        else:
            blocked.add(index)
    # Options off the hulls can still use what the hull steps left of the budget.
    while True:
        fits = [
            (chosen[i].output_error ** 2 - o.output_error**2, i, o)
            for i, opts in enumerate(candidates)
            for o in opts
            if o.output_error < chosen[i].output_error
            and used + o.params - chosen[i].params <= max_params
        ]
        if not fits:
            return chosen
        _, index, option = max(fits, key=lambda f: (f[0], -f[1]))
        used += option.params - chosen[index].params
        chosen[index] = option


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor in a model's output (a tensor, or nested tuples, lists and dicts)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    return []


def _output_error(reference: Any, approximation: Any) -> float:
    pairs = zip(_tensors(reference), _tensors(approximation), strict=True)
    diff = total = torch.zeros((), dtype=torch.float64)
    for ref, approx in pairs:
        diff = diff + (approx - ref).to(torch.float64).square().sum().cpu()
        total = total + ref.to(torch.float64).square().sum().cpu()
    return float(_relative(diff, total))


def factorize_model(
    model: nn.Module,
    inputs: Tensor | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    method: Literal["spatial", "depthwise", "best"] = "best",
    max_error: float | None = None,
    max_params: int | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> ModelFactorization:
    """Replace a model's ``nn.Conv2d`` layers by separable approximations, within a bound.

    The model runs once (in eval mode, on a copy) on the batch; each eligible layer's options,
    every rank of each allowed method with fewer parameters than the layer, are measured on
    the input that layer receives. Then:

    - with ``max_error``: each layer takes its cheapest option whose output error is at most
      ``max_error`` (the layer itself when none is cheaper);
    - with ``max_params``: starting from each layer's cheapest allowed option, upgrades are
      taken in order of squared output error removed per added parameter while the whole
      model stays within ``max_params``.

    With both, options above ``max_error`` are not allowed and the budget decides among the
    rest. Plain ``nn.Conv2d`` layers with ``groups=1`` are eligible; others are reported and
    kept.

    Args:
        model: the model; it is not modified.
        inputs: the batch to measure on.
        input_shape: instead of ``inputs``, the shape of a standard normal batch (real data
            gives more meaningful errors).
        method: ``"spatial"``, ``"depthwise"`` or ``"best"`` (both compete per layer).
        max_error: bound on each layer's relative output error.
        max_params: bound on the converted model's total parameter count.
        generator: random source for the batch drawn from ``input_shape``.
        progress: called as ``progress(done, total, layer_name)`` after each layer is measured.

    Returns:
        A :class:`ModelFactorization` with the converted copy and a report per layer.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3))
        >>> result = factorize_model(model, input_shape=(2, 3, 16, 16), max_params=2000)
        >>> [(layer.name, layer.method, layer.rank) for layer in result.layers]
        [('0', None, 0), ('2', 'spatial', 16)]
        >>> result.params_before, result.params_after
        (2768, 2000)
        >>> result.output_error < 1
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "model is a TorchScript module, which cannot be rewritten; analyse its layers one by "
            "one with factorize_layers(model)"
        )
    if method not in (*METHODS, "best"):
        raise ValueError(f"method must be 'spatial', 'depthwise' or 'best'; got {method!r}")
    _check_error_bound(max_error)
    if max_params is not None and (
        isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1
    ):
        raise ValueError(f"max_params must be a positive int or None, got {max_params!r}")
    if max_error is None and max_params is None:
        raise ValueError("give max_error, max_params or both; got neither")
    work = copy.deepcopy(model).eval()
    x = _model_input(work, inputs, input_shape, generator)
    methods = METHODS if method == "best" else (method,)
    convs = conv_layers(work)
    eligible = [m for _, m in convs if any(_ineligible(m, meth) is None for meth in methods)]
    measured: dict[int, tuple[list[_Option], tuple[int, ...]]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if id(module) in measured:
            return
        # The output is the reference: calling the layer again here would re-enter this hook.
        stop_at = max_error if max_params is None else None
        measured[id(module)] = _options(module, methods, args[0], output, stop_at)
        if progress is not None and module in eligible:
            done = sum(id(m) in measured for m in eligible)
            progress(done, len(eligible), next(n for n, m in convs if m is module))

    handles = [m.register_forward_hook(hook) for _, m in convs]
    try:
        with torch.no_grad():
            reference = work(x)
    except Exception as exc:
        raise ValueError(f"the model failed on an input of shape {tuple(x.shape)}: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()

    ran = [m for _, m in convs if id(m) in measured]
    candidates = [
        [o for o in measured[id(m)][0] if max_error is None or o.output_error <= max_error]
        for m in ran
    ]
    params_before = sum(p.numel() for p in work.parameters())
    fixed = params_before - sum(measured[id(m)][0][0].params for m in ran)
    chosen = dict(zip(map(id, ran), _allocate(candidates, fixed, max_params), strict=True))

    reports: list[LayerReport] = []
    replacements: dict[int, nn.Module] = {}
    for name, conv in convs:
        options, shape = measured.get(id(conv), ([], ()))
        option = chosen.get(id(conv))
        if option is not None and option.factors is not None:
            replacements[id(conv)] = _build(conv, option.factors, option.rank)
        reports.append(_report(name, conv, methods, options, option, shape, max_error))
    cost_shape = (1, *x.shape[1:])
    before = model_cost(work, cost_shape)
    # Every path to a layer, so that a layer used twice is replaced in both places.
    for path, child in list(work.named_modules(remove_duplicate=False)):
        if id(child) in replacements and path:
            parent, _, attribute = path.rpartition(".")
            setattr(work.get_submodule(parent), attribute, replacements[id(child)])
    work = replacements.get(id(work), work)
    after = model_cost(work, cost_shape)
    with torch.no_grad():
        error = _output_error(reference, work(x))
    work.train(model.training)
    return ModelFactorization(
        model=work,
        layers=tuple(reports),
        input_shape=tuple(x.shape),
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        output_error=error,
    )


def _report(
    name: str,
    conv: nn.Conv2d,
    methods: tuple[str, ...],
    options: list[_Option],
    option: _Option | None,
    shape: tuple[int, ...],
    max_error: float | None,
) -> LayerReport:
    """The report of one layer; ``options`` is empty when it never ran, ``option`` is the
    chosen one (``None`` when it never ran)."""
    if options:
        kept = options[0]
    else:
        kept = _Option(None, 0, sum(p.numel() for p in conv.parameters()), 0, 0.0, 0.0)
    option = kept if option is None else option
    if option.method is not None:
        note = ""
    elif all(_ineligible(conv, method) is not None for method in methods):
        note = "; ".join(dict.fromkeys(str(_ineligible(conv, method)) for method in methods))
    elif not options:
        note = "not called on this input"
    else:
        note = _keep_note(max_error)
    return LayerReport(
        name=name,
        shape=_shape_text(conv),
        method=option.method,
        rank=option.rank,
        full_rank=0 if option.method is None else full_rank(conv, option.method),  # type: ignore[arg-type]
        input_shape=shape,
        params_before=kept.params,
        params_after=option.params,
        macs_before=kept.macs,
        macs_after=option.macs,
        weight_error=option.weight_error,
        output_error=option.output_error,
        note=note,
    )


def factorize_layers(
    model: nn.Module,
    method: Literal["spatial", "depthwise", "best"] = "best",
    max_error: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[LayerReport, ...]:
    """Analyse each ``nn.Conv2d`` of a model on its own, without running or changing the model.

    For models that cannot be run or rewritten here, TorchScript ones in particular. Each
    layer is measured on a standard normal batch of 4 images of at least 32 x 32, so errors
    and MACs describe that input, not the model's real activations; prefer
    :func:`factorize_model` where it applies.

    Args:
        model: an eager or TorchScript module (see :func:`conv_layers`).
        method: ``"spatial"``, ``"depthwise"`` or ``"best"``.
        max_error: bound on each layer's relative output error.
        generator: random source for the batches.

    Returns:
        One :class:`LayerReport` per ``nn.Conv2d``, with the cheapest option within
        ``max_error``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> [(r.name, r.method, r.note) for r in factorize_layers(model, max_error=0.0)]
        [('0', None, 'no cheaper option within max_error=0'), ('2', None, 'a 1 x 1 kernel has nothing to split')]
    """
    if method not in (*METHODS, "best"):
        raise ValueError(f"method must be 'spatial', 'depthwise' or 'best'; got {method!r}")
    _check_error_bound(max_error)
    methods = METHODS if method == "best" else (method,)
    reports = []
    for name, conv in conv_layers(model):
        x = _random_input(conv, generator)
        with torch.no_grad():
            options, shape = _options(conv, methods, x, conv(x), max_error)
        allowed = [o for o in options if o.output_error <= max_error]
        chosen = min(allowed, key=lambda o: (o.params, o.output_error))
        reports.append(_report(name, conv, methods, options, chosen, shape, max_error))
    return tuple(reports)


def _keep_note(max_error: float | None) -> str:
    if max_error is None:
        return "the original fits the parameter budget"
    return f"no cheaper option within max_error={max_error:g}"


def _model_input(
    model: nn.Module,
    inputs: Tensor | None,
    input_shape: tuple[int, ...] | None,
    generator: torch.Generator | None,
) -> Tensor:
    if inputs is not None and input_shape is not None:
        raise ValueError("give inputs or input_shape, not both")
    if inputs is not None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a Tensor, got {type(inputs).__name__}")
        return inputs
    if input_shape is None:
        raise ValueError("give inputs (a batch) or input_shape (for a random batch); got neither")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape):
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    param = next(iter(model.parameters()), None)
    like = (
        {"device": None, "dtype": torch.get_default_dtype()}
        if param is None
        else {
            "device": param.device,
            "dtype": param.dtype,
        }
    )
    x = torch.randn(*input_shape, generator=generator, dtype=torch.float64)
    return x.to(**like)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The ``nn.Conv2d`` layers of a model, eager or TorchScript, by name.

    The passes inside deformconv's separable layers (already factored) are left out.
    TorchScript layers come back as eager ``nn.Conv2d`` copies (same weights and settings), so
    :func:`factorize_conv` can analyse them; eager layers are the model's own modules.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> [name for name, _ in conv_layers(model)]
        ['0', '2']
    """
    composite = {cls.__name__ for cls in _COMPOSITE}
    parts = tuple(
        f"{name}." if name else ""
        for name, module in model.named_modules()
        if isinstance(module, _COMPOSITE) or getattr(module, "original_name", None) in composite
    )
    layers: list[tuple[str, nn.Conv2d]] = []
    for name, module in model.named_modules():
        if name.startswith(parts):
            continue
        if isinstance(module, nn.Conv2d):
            layers.append((name, module))
        elif isinstance(module, torch.jit.ScriptModule) and module.original_name == "Conv2d":
            weight = module.weight
            conv = nn.Conv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
                device=weight.device,
                dtype=weight.dtype,
            )
            with torch.no_grad():
                conv.weight.copy_(weight)
                if module.bias is not None:
                    conv.bias.copy_(module.bias)
            layers.append((name, conv))
    return layers


def load_model(path: str | Path) -> nn.Module:
    """Load a model saved with ``torch.save(model)`` (the whole module) or ``torch.jit.save``.

    Warning:
        A ``torch.save`` file is a pickle, and loading it runs code stored in it: load only
        files you trust. TorchScript files are tried first and do not need unpickling of
        arbitrary classes.

    Args:
        path: the file.

    Returns:
        The module (a ``torch.jit.ScriptModule`` for TorchScript files).

    Raises:
        ValueError: if the file is missing, does not load, or holds something other than a
            module (such as a ``state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        pass
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(
            f"model file {str(path)!r} could not be loaded as a TorchScript or torch.save file: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(loaded, dict):
        raise ValueError(
            f"model file {str(path)!r} holds a dict (a state_dict?), not a model; save the whole "
            "module with torch.save(model) or torch.jit.save(torch.jit.script(model))"
        )
    if not isinstance(loaded, nn.Module):
        raise ValueError(
            f"model file {str(path)!r} holds a {type(loaded).__name__}, not an nn.Module"
        )
    return loaded
