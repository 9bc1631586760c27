"""A quick self-check of the installed operator: does it compute what it should on this machine?

It compares deformable convolution with zero offsets and a unit mask against ``F.conv2d``, with
random offsets against the portable kernel (forward and all five gradients), and against
``torchvision.ops.deform_conv2d`` when torchvision is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deformconv.ops import _portable
from deformconv.ops.deform_conv import deform_conv2d

__all__ = ["CheckResult", "run_self_check"]


@dataclass(frozen=True)
class CheckResult:
    """One comparison: what was compared, the largest absolute difference and the tolerance."""

    name: str
    reference: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _case(dtype: torch.dtype, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return {
        "input": rand(2, 8, 12, 11),
        "offset": rand(2, 2 * 2 * 9, 6, 11) * 2,
        "mask": torch.sigmoid(rand(2, 2 * 9, 6, 11)),
        "weight": rand(6, 4, 3, 3),
        "bias": rand(6),
    }


_PARAMS = {"stride": (2, 1), "padding": (1, 1), "dilation": (1, 1)}


def _ours(t: dict[str, Tensor]) -> Tensor:
    return deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **_PARAMS)


def _grads(fn, t: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out = fn(leaves)
    upstream = torch.ones_like(out)
    names = ["input", "offset", "mask", "weight", "bias"]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], upstream)
    return out.detach(), list(grads)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run_self_check(
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
) -> list[CheckResult]:
    """Run every comparison and return the results (nothing is printed).

    Example:
        >>> results = run_self_check(dtypes=(torch.float64,))
        >>> all(r.passed for r in results)
        True
    """
    results: list[CheckResult] = []
    try:
        import torchvision
    except ImportError:  # torchvision is optional: the check then skips that reference
        torchvision = None
    for dtype in dtypes:
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        label = str(dtype).replace("torch.", "")
        t = _case(dtype, seed=0)
        zeros = {**t, "offset": torch.zeros_like(t["offset"]), "mask": torch.ones_like(t["mask"])}
        dense = F.conv2d(t["input"], t["weight"], t["bias"], groups=2, **_PARAMS)
        results.append(
            CheckResult(
                f"zero offsets, unit mask ({label})",
                "F.conv2d",
                _max_diff(_ours(zeros), dense),
                tol,
            )
        )
        out, grads = _grads(_ours, t)

        def portable(leaves: dict[str, Tensor]) -> Tensor:
            return _PortableFn.apply(
                *(leaves[k] for k in ("input", "offset", "mask", "weight", "bias"))
            )

        ref_out, ref_grads = _grads(portable, t)
        results.append(
            CheckResult(f"forward ({label})", "portable kernel", _max_diff(out, ref_out), tol)
        )
        results.append(
            CheckResult(
                f"5 gradients ({label})",
                "portable kernel",
                max(_max_diff(a, b) for a, b in zip(grads, ref_grads, strict=True)),
                tol,
            )
        )
        if torchvision is not None:

            def tv(leaves: dict[str, Tensor]) -> Tensor:
                return torchvision.ops.deform_conv2d(
                    leaves["input"],
                    leaves["offset"],
                    leaves["weight"],
                    leaves["bias"],
                    mask=leaves["mask"],
                    **_PARAMS,
                )

            tv_out, tv_grads = _grads(tv, t)
            results.append(
                CheckResult(f"forward ({label})", "torchvision", _max_diff(out, tv_out), tol)
            )
            results.append(
                CheckResult(
                    f"5 gradients ({label})",
                    "torchvision",
                    max(_max_diff(a, b) for a, b in zip(grads, tv_grads, strict=True)),
                    tol,
                )
            )
    return results


class _PortableFn(torch.autograd.Function):
    """The portable kernel called directly, whatever kernel the dispatcher picks on this device."""

    @staticmethod
    def forward(ctx, input, offset, mask, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(input, offset, mask, weight, bias)
        return _portable.forward(input, offset, mask, weight, bias, *_PARAMS.values())

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _portable.backward(grad, *ctx.saved_tensors, *_PARAMS.values())
