"""Cheaper separable versions of one trained ``nn.Conv2d`` layer.

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

Whole models are converted by :mod:`deformconv.tools.model_factorization`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deformconv._validation import check_int
from deformconv.nn.separable import SeparableConv2d
from deformconv.nn.spatial import SpatiallySeparableConv2d
from deformconv.tools._low_rank import (
    Factors,
    conv_padding,
    output_errors,
    relative_error,
    weight_factors,
)
from deformconv.tools.arithmetic import conv_cost
from deformconv.tools.conv_spec import ConvSpec
from deformconv.tools.module_spec import spec_from_module

__all__ = [
    "METHODS",
    "ConvFactorization",
    "factorize_conv",
    "full_rank",
    "rank_errors",
    "to_depthwise_separable",
    "to_spatially_separable",
]

Method = Literal["spatial", "depthwise"]
METHODS: tuple[str, ...] = ("spatial", "depthwise")


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


def _build(conv: nn.Conv2d, factors: Factors, rank: int) -> nn.Module:
    o, c, kh, kw = conv.weight.shape
    like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    common: dict[str, Any] = {
        "stride": conv.stride,
        "padding": conv_padding(conv),
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
    factors = weight_factors(conv.weight, "spatial")
    full = full_rank(conv, "spatial")
    module = _build(conv, factors, full if rank is None else check_int(rank, "rank", 1, full))
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
    factors = weight_factors(conv.weight, "depthwise")
    full = full_rank(conv, "depthwise")
    rank = (
        full
        if depth_multiplier is None
        else check_int(depth_multiplier, "depth_multiplier", 1, full)
    )
    module = _build(conv, factors, rank)
    assert isinstance(module, SeparableConv2d)
    return module


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
    factors = weight_factors(conv.weight, method)
    full = full_rank(conv, method)
    with torch.no_grad():
        errors = output_errors(conv, factors, x, conv(x), full)
    return factors.weight_errors, tuple(errors)


def _spec(conv: nn.Conv2d, method: str | None, rank: int) -> ConvSpec:
    base = spec_from_module(conv)
    if method is None:
        return base
    kind = "spatial" if method == "spatial" else "separable"
    extra = {"mid_channels": rank} if method == "spatial" else {"depth_multiplier": rank}
    padding = conv_padding(conv)
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
    factors = weight_factors(conv.weight, method)
    with torch.no_grad():
        reference = conv(x)
        total = reference.square().sum(dtype=torch.float64)
        errors = tuple(output_errors(conv, factors, x, reference, full))
        if max_error is not None:
            rank = next((r for r, e in enumerate(errors, 1) if e <= max_error), full)
        chosen = full if rank is None else check_int(rank, "rank", 1, full)
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
        output_error=float(relative_error(diff, total)),
        rank_errors=errors,
    )
