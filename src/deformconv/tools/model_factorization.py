"""Separable approximations of a whole model's ``nn.Conv2d`` layers, within an error bound or
a parameter budget (:func:`factorize_model`), or each layer analysed on its own
(:func:`factorize_layers`, for models that cannot be run or rewritten, TorchScript ones).

Each layer is factored as :mod:`deformconv.tools.factorize` describes; parameters and
multiply-accumulates of the whole model come from :func:`~deformconv.tools.model_cost.model_cost`,
per input image.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deformconv.nn.separable import DeformableSeparableConv2d, SeparableConv2d
from deformconv.nn.spatial import SpatiallySeparableConv2d
from deformconv.tools._budget import Option, allocate, layer_options
from deformconv.tools._low_rank import relative_error
from deformconv.tools.conv_spec import _pair_text
from deformconv.tools.factorize import (
    METHODS,
    _build,
    _check_error_bound,
    _ineligible,
    _random_input,
    full_rank,
)
from deformconv.tools.model_cost import _tensors, model_cost
from deformconv.tools.module_spec import _inspection_run

__all__ = [
    "LayerReport",
    "ModelFactorization",
    "conv_layers",
    "factorize_layers",
    "factorize_model",
]

Progress = Callable[[int, int, str], None]

_COMPOSITE = (SeparableConv2d, SpatiallySeparableConv2d, DeformableSeparableConv2d)


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


def _output_error(reference: Any, approximation: Any) -> float:
    pairs = zip(_tensors(reference), _tensors(approximation), strict=True)
    diff = total = torch.zeros((), dtype=torch.float64)
    for ref, approx in pairs:
        diff = diff + (approx - ref).to(torch.float64).square().sum().cpu()
        total = total + ref.to(torch.float64).square().sum().cpu()
    return float(relative_error(diff, total))


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
    measured: dict[int, tuple[list[Option], tuple[int, ...]]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if id(module) in measured:
            return
        # The output is the reference: calling the layer again here would re-enter this hook.
        stop_at = max_error if max_params is None else None
        measured[id(module)] = layer_options(module, methods, args[0], output, stop_at)
        if progress is not None and module in eligible:
            done = sum(id(m) in measured for m in eligible)
            progress(done, len(eligible), next(n for n, m in convs if m is module))

    handles = [m.register_forward_hook(hook) for _, m in convs]
    try:
        with _inspection_run(work, handles):
            reference = work(x)
    except Exception as exc:
        raise ValueError(f"the model failed on an input of shape {tuple(x.shape)}: {exc}") from exc

    ran = [m for _, m in convs if id(m) in measured]
    candidates = [
        [o for o in measured[id(m)][0] if max_error is None or o.output_error <= max_error]
        for m in ran
    ]
    params_before = sum(p.numel() for p in work.parameters())
    fixed = params_before - sum(measured[id(m)][0][0].params for m in ran)
    chosen = dict(zip(map(id, ran), allocate(candidates, fixed, max_params), strict=True))

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
    options: list[Option],
    option: Option | None,
    shape: tuple[int, ...],
    max_error: float | None,
) -> LayerReport:
    """The report of one layer; ``options`` is empty when it never ran, ``option`` is the
    chosen one (``None`` when it never ran)."""
    if options:
        kept = options[0]
    else:
        kept = Option(None, 0, sum(p.numel() for p in conv.parameters()), 0, 0.0, 0.0)
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
            options, shape = layer_options(conv, methods, x, conv(x), max_error)
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
    x = torch.randn(*input_shape, generator=generator, dtype=torch.float64)
    if param is None:
        return x.to(torch.get_default_dtype())
    return x.to(device=param.device, dtype=param.dtype)


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
