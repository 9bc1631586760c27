"""Budget allocation of :func:`~deformconv.tools.model_factorization.factorize_model`: the
options of each layer (keep it, or each rank of each method) and the choice among them.

Within a parameter budget, upgrades are taken greedily in order of squared output error removed
per added parameter, stepping along each layer's lower convex hull of (parameters, squared
error), then any option off the hulls that still fits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deformconv.tools._low_rank import Factors, output_errors, weight_factors
from deformconv.tools.arithmetic import conv_cost
from deformconv.tools.factorize import _ineligible, _spec, full_rank


@dataclass(frozen=True)
class Option:
    """One way to treat a layer: ``method=None`` keeps it; ``factors`` builds the others."""

    method: str | None
    rank: int
    params: int
    macs: int
    weight_error: float
    output_error: float
    factors: Factors | None = field(default=None, repr=False, compare=False)


def layer_options(
    conv: nn.Conv2d,
    methods: tuple[str, ...],
    x: Tensor,
    reference: Tensor,
    stop_at: float | None = None,
) -> tuple[list[Option], tuple[int, ...]]:
    """Every useful option for ``conv`` on its input ``x`` (``reference = conv(x)``): keeping
    it, and each rank of each method that has fewer parameters than the layer; with
    ``stop_at``, no rank beyond the first whose output error is at most that."""
    size = (x.shape[2], x.shape[3])
    original = conv_cost(_spec(conv, None, 0), size)
    options = [Option(None, 0, original.params, original.macs, 0.0, 0.0)]
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
            factors = weight_factors(conv.weight, method)
            errors = output_errors(conv, factors, x, reference, useful, stop_at)
            options += [
                Option(
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


def lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (parameters, squared error), cheapest first,
    up to the most exact: the only ones a greedy budget allocation should step through."""
    points = sorted(options, key=lambda o: (o.params, o.output_error))
    hull: list[Option] = []
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


def allocate(
    candidates: list[list[Option]], fixed_params: int, max_params: int | None
) -> list[Option]:
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
        hull = lower_hull(opts)
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
