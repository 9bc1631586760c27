"""A quick self-check of the installed operator: does it compute what it should on this machine?

On the chosen device it compares deformable convolution with zero offsets and a unit mask
against ``F.conv2d``, with random offsets against the portable kernel (forward and all five
gradients), and against ``torchvision.ops.deform_conv2d`` when torchvision is installed (and has
that device's kernel). Comparisons that cannot run are returned as skipped, with the reason and
what would enable them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deformconv.ops import use_kernel
from deformconv.ops.deform_conv import deform_conv2d

__all__ = ["CheckResult", "device_problem", "run_self_check"]

_NAMES = ("input", "offset", "mask", "weight", "bias")
_PARAMS = {"stride": (2, 1), "padding": (1, 1), "dilation": (1, 1)}


@dataclass(frozen=True)
class CheckResult:
    """One comparison: what was compared, the largest absolute difference and the tolerance.

    A comparison that could not run has ``skipped`` set to the reason (and how to enable it),
    and a NaN difference; it neither passes nor fails.
    """

    name: str
    reference: str
    max_abs_diff: float
    tolerance: float
    skipped: str = ""

    @property
    def passed(self) -> bool:
        return not self.skipped and self.max_abs_diff <= self.tolerance

    @property
    def failed(self) -> bool:
        return not self.skipped and not self.passed


def device_problem(device: str | torch.device) -> str | None:
    """Why the self-check cannot run on ``device`` (one line), or ``None`` when it can.

    Example:
        >>> device_problem("cpu") is None
        True
        >>> device_problem("cuda:99") is not None
        True
        >>> device_problem("gpu")
        "device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"the self-check runs on 'cpu' and 'cuda' devices, got {str(dev)!r}"
    with warnings.catch_warnings():  # torch warns when it finds no CUDA driver: say it once
        warnings.simplefilter("ignore")
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    if not available:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        return f"no CUDA device is available on this machine (torch {torch.__version__}, {build})"
    if dev.index is not None and dev.index >= count:
        return f"{dev} is not available: this machine has {count} CUDA device(s)"
    return None


def _case(dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    return {
        "input": rand(2, 8, 12, 11),
        "offset": rand(2, 2 * 2 * 9, 6, 11) * 2,
        "mask": torch.sigmoid(rand(2, 2 * 9, 6, 11)),
        "weight": rand(6, 4, 3, 3),
        "bias": rand(6),
    }


def _ours(t: dict[str, Tensor]) -> Tensor:
    return deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **_PARAMS)


# The output of a run, and the gradients of the tensors named in _NAMES, in that order.
Run = tuple[Tensor, list[Tensor]]


def _grads(fn: Callable[[dict[str, Tensor]], Tensor], t: dict[str, Tensor]) -> Run:
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out = fn(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in _NAMES], torch.ones_like(out))
    return out.detach(), list(grads)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _compare(label: str, reference: str, ours: Run, ref: Run, tol: float) -> list[CheckResult]:
    out, grads = ours
    ref_out, ref_grads = ref
    grad_diff = max(_max_diff(a, b) for a, b in zip(grads, ref_grads, strict=True))
    return [
        CheckResult(f"forward ({label})", reference, _max_diff(out, ref_out), tol),
        CheckResult(f"5 gradients ({label})", reference, grad_diff, tol),
    ]


def _skipped(label: str, reference: str, reason: str) -> list[CheckResult]:
    return [
        CheckResult(f"{what} ({label})", reference, math.nan, math.nan, skipped=reason)
        for what in ("forward", "5 gradients")
    ]


def _torchvision(t: dict[str, Tensor]) -> Tensor:
    import torchvision

    return torchvision.ops.deform_conv2d(
        t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **_PARAMS
    )


def run_self_check(
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    device: str | torch.device = "cpu",
) -> list[CheckResult]:
    """Run every comparison on ``device`` and return the results (nothing is printed).

    Raises ``ValueError`` with :func:`device_problem`'s reason when ``device`` cannot be used.

    Example:
        >>> results = run_self_check(dtypes=(torch.float64,))
        >>> all(r.passed or r.skipped for r in results)
        True
        >>> sorted({r.reference for r in results})
        ['F.conv2d', 'portable kernel', 'torchvision']
    """
    problem = device_problem(device)
    if problem is not None:
        raise ValueError(problem)
    dev = torch.device(device)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        missing = "torchvision is not installed; `pip install torchvision` adds these comparisons"
    else:
        missing = ""
    results: list[CheckResult] = []
    for dtype in dtypes:
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        label = str(dtype).replace("torch.", "")
        t = _case(dtype, dev, seed=0)
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
        ours = _grads(_ours, t)
        with use_kernel("portable", dev.type):
            portable = _grads(_ours, t)
        results += _compare(label, "portable kernel", ours, portable, tol)
        if missing:
            results += _skipped(label, "torchvision", missing)
            continue
        try:
            reference = _grads(_torchvision, t)
        except NotImplementedError as exc:  # a torchvision build without this device
            reason = f"torchvision has no {dev.type} kernel here ({type(exc).__name__})"
            results += _skipped(label, "torchvision", reason)
        else:
            results += _compare(label, "torchvision", ours, reference, tol)
    return results
