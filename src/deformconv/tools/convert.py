"""Turn chosen ``nn.Conv2d`` layers of a model, trained or not, into deformable ones.

This is how the "DCN" versions of backbones are made (Dai et al. 2017; Zhu et al. 2019): in
mmdetection's R50-DCN recipe, ``stage_with_dcn=(False, True, True, True)`` makes the 3x3
convolution ``conv2`` of every bottleneck of ResNet's ``layer2`` to ``layer4`` deformable (13
layers of ResNet-50). :func:`convert_to_deformable` does it for any model, choosing the layers by
name pattern, by predicate or by ResNet stage. Each chosen layer becomes a
:class:`~deformconv.nn.deform_conv.DeformableConv2d` that keeps the convolution's weights, device,
dtype, training mode and ``requires_grad`` flags and whose offset branch starts at zero (with a
neutral mask of 1 for v2), so the converted model computes what the original did until its
offsets are trained.

The returned :class:`Conversion` says what changed, layer by layer, with parameters and
multiply-accumulates counted by :func:`~deformconv.tools.arithmetic.conv_cost` (the conventions
of :mod:`deformconv.tools.arithmetic`), so they add up to the difference that
:func:`~deformconv.tools.model_cost.model_cost` finds between the two models.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deformconv._validation import check_int
from deformconv.nn.deform_conv import DeformableConv2d
from deformconv.tools.arithmetic import conv_cost
from deformconv.tools.conv_spec import ConvSpec
from deformconv.tools.module_spec import _inspection_run, spec_from_module

__all__ = ["Conversion", "ConvertedLayer", "convert_to_deformable"]

Predicate = Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class ConvertedLayer:
    """One convolution that :func:`convert_to_deformable` replaced.

    Attributes:
        name: its qualified name in the model (``"layer2.0.conv2"``).
        before: the convolution, as a :class:`~deformconv.tools.conv_spec.ConvSpec`.
        after: the deformable layer that replaced it.
        input_size: ``(batch, height, width)`` of its input in the run on ``input_shape``, or
            ``None`` when no shape was given.
        params_before, params_after: parameters of the layer before and after.
        macs_before, macs_after: its multiply-accumulates on ``input_size`` (whole batch), or
            ``None`` without an input shape.
    """

    name: str
    before: ConvSpec
    after: ConvSpec
    input_size: tuple[int, int, int] | None
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None

    @property
    def added_params(self) -> int:
        """Parameters of the offset branch."""
        return self.params_after - self.params_before

    @property
    def added_macs(self) -> int | None:
        """Multiply-accumulates of the offset branch, sampling and modulation."""
        if self.macs_before is None or self.macs_after is None:
            return None
        return self.macs_after - self.macs_before


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_to_deformable` did; ``str()`` of it is a table.

    Attributes:
        model: the converted model (the one given when ``inplace``, else a converted copy).
        layers: one :class:`ConvertedLayer` per replaced convolution, in the model's order.
        params_before: parameters of the whole model before the conversion.
        input_shape: the shape the model was run on to size the layers, or ``None``.
    """

    model: nn.Module
    layers: tuple[ConvertedLayer, ...]
    params_before: int
    input_shape: tuple[int, ...] | None

    @property
    def added_params(self) -> int:
        """Parameters the conversion added (the offset branches)."""
        return sum(layer.added_params for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the whole model after the conversion."""
        return self.params_before + self.added_params

    @property
    def macs_before(self) -> int | None:
        """Multiply-accumulates of the converted layers before, or ``None`` without a shape."""
        return _total(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int | None:
        """Multiply-accumulates of the same layers after the conversion."""
        return _total(layer.macs_after for layer in self.layers)

    @property
    def added_macs(self) -> int | None:
        """Multiply-accumulates the conversion added to the model, or ``None``."""
        return _total(layer.added_macs for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready dictionaries and lists (the model left out)."""
        return {
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "added_params": self.added_params,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "added_macs": self.added_macs,
            "layers": [
                {
                    "name": layer.name,
                    "before": layer.before.title,
                    "after": layer.after.title,
                    "input_size": None if layer.input_size is None else list(layer.input_size),
                    "params_before": layer.params_before,
                    "params_after": layer.params_after,
                    "macs_before": layer.macs_before,
                    "macs_after": layer.macs_after,
                }
                for layer in self.layers
            ],
        }

    def __str__(self) -> str:
        after = self.layers[0].after
        title = f"{after.title}, offset groups {after.offset_groups}"
        where = "" if self.input_shape is None else f", input {tuple(self.input_shape)}"
        rows = [
            f"{len(self.layers)} convolutions of {type(self.model).__name__} made {title}{where}",
            f"{'layer':<24} {'channels':>11} {'kernel':>6} {'stride':>6} {'input':>9} "
            f"{'+params':>9} {'MACs before':>13} {'MACs after':>13}",
        ]
        for layer in self.layers:
            spec = layer.before
            size = "-" if layer.input_size is None else "x".join(map(str, layer.input_size[1:]))
            rows.append(
                f"{layer.name:<24} {f'{spec.in_channels}->{spec.out_channels}':>11} "
                f"{_by(spec.kernel_size):>6} {_by(spec.stride):>6} {size:>9} "
                f"{layer.added_params:>9,} {_count(layer.macs_before):>13} "
                f"{_count(layer.macs_after):>13}"
            )
        rows.append(
            f"parameters {self.params_before:,} -> {self.params_after:,} "
            f"(+{self.added_params:,}, +{self.added_params / self.params_before:.1%})"
        )
        if self.added_macs is not None:
            rows.append(
                f"MACs of these layers {self.macs_before:,} -> {self.macs_after:,} "
                f"(+{self.added_macs:,})"
            )
        return "\n".join(rows)


def _total(values: Any) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _by(pair: Any) -> str:
    return f"{pair[0]}x{pair[1]}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def convert_to_deformable(
    model: nn.Module,
    layers: str | Sequence[str] | Predicate | None = None,
    *,
    stages: Sequence[bool] | None = None,
    modulated: bool = True,
    offset_groups: int = 1,
    max_offset: float | None = None,
    inplace: bool = False,
    input_shape: Sequence[int] | None = None,
) -> Conversion:
    """Replace chosen ``nn.Conv2d`` layers of ``model`` by deformable layers that start equal.

    Choose the layers with exactly one of:

    - ``layers`` as a pattern or a list of patterns, shell-style (:func:`fnmatch.fnmatchcase`,
      ``*`` crossing dots) matched against the modules' qualified names: ``"layer[234].*.conv2"``;
      every pattern must match, and only ``nn.Conv2d`` layers;
    - ``layers`` as a predicate ``(name, module) -> bool`` over ``model.named_modules()``;
    - ``stages``, one flag per stage of a ResNet-style model (children ``layer1``, ``layer2``...
      anywhere in ``model``, as in torchvision's and timm's ResNets and ``backbone.body`` of
      torchvision's detection models), choosing ``conv2`` of every block of the flagged stages:
      mmdetection's ``stage_with_dcn``.

    Args:
        model: any module.
        layers: the pattern(s) or predicate, when ``stages`` is not given.
        stages: the stage flags, when ``layers`` is not given.
        modulated: DCNv2 (offsets and mask) rather than DCNv1 (offsets only).
        offset_groups: offset groups of every new layer; must divide its input channels.
        max_offset: optional bound on the offsets, in pixels (see ``DeformableConv2d``).
        inplace: convert ``model`` itself rather than a copy.
        input_shape: a full input shape, e.g. ``(1, 3, 224, 224)``: the model (in eval mode, on
            zeros) is run once before the conversion to find each layer's input size, and the
            report counts multiply-accumulates; without it, it counts parameters only.

    Returns:
        A :class:`Conversion`: the converted model and what changed.

    Raises:
        ValueError: for a pattern or predicate that selects nothing, a model without the stages
            asked for, or a layer that cannot convert (string padding, a padding mode other than
            zeros, offset groups not dividing its channels), named.
        TypeError: for a selected module that is not a plain ``nn.Conv2d``, named.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        >>> conversion = convert_to_deformable(net, "2", input_shape=(1, 3, 16, 16))
        >>> type(conversion.model[2]).__name__, conversion.added_params
        ('DeformableConv2d', 1971)
        >>> x = torch.rand(1, 3, 16, 16)
        >>> torch.allclose(conversion.model(x), net(x), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if (layers is None) == (stages is None):
        raise ValueError("give exactly one of layers (patterns or a predicate) and stages")
    check_int(offset_groups, "offset_groups")
    shape = _input_shape(input_shape)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    names = _by_stage(target, stages) if stages is not None else _select(modules, layers)
    for name in names:
        _check_convertible(name, modules[name])
    sizes = _input_sizes(target, names, shape) if shape is not None else {}
    params_before = sum(p.numel() for p in target.parameters())
    report = []
    for name in names:
        conv = modules[name]
        try:
            layer = DeformableConv2d.from_conv2d(
                conv, offset_groups=offset_groups, modulated=modulated, max_offset=max_offset
            )
        except ValueError as error:
            raise ValueError(f"layer {name!r} cannot convert: {error}") from None
        layer.train(conv.training)
        layer.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            assert layer.bias is not None
            layer.bias.requires_grad_(conv.bias.requires_grad)
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent], attr, layer)
        report.append(_layer_report(name, conv, layer, sizes.get(name)))
    return Conversion(target, tuple(report), params_before, shape)


def _input_shape(value: Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    shape = tuple(value)
    if not shape or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape
    ):
        raise ValueError(f"input_shape must be a shape of positive ints, got {value!r}")
    return shape


def _select(modules: dict[str, nn.Module], layers: str | Sequence[str] | Predicate) -> list[str]:
    named = [(name, m) for name, m in modules.items() if name]
    if callable(layers):
        chosen = [name for name, m in named if layers(name, m)]
        if not chosen:
            raise ValueError("the layers predicate selected no module")
        return chosen
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"layers must be a pattern, a list of patterns or a predicate, got {layers!r}"
        )
    chosen = set()
    for pattern in patterns:
        matched = {name for name, _ in named if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            examples = [name for name, m in named if isinstance(m, nn.Conv2d)][:4]
            raise ValueError(
                f"pattern {pattern!r} matches no module; the convolutions are named like "
                f"{', '.join(repr(e) for e in examples) or '(none: the model has no nn.Conv2d)'}"
            )
        chosen |= matched
    return [name for name, _ in named if name in chosen]


def _by_stage(model: nn.Module, stages: Sequence[bool]) -> list[str]:
    flags = list(stages)
    if not flags or not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"stages must be a sequence of bools, got {stages!r}")
    stage_names = [f"layer{i + 1}" for i in range(len(flags))]
    roots = [
        prefix
        for prefix, m in model.named_modules()
        if all(isinstance(getattr(m, s, None), nn.Module) for s in stage_names)
    ]
    if not roots:
        raise ValueError(
            f"stages needs a ResNet-style model with children {', '.join(stage_names)}; "
            f"{type(model).__name__} has no module with all of them"
        )
    chosen = []
    for prefix in roots:
        root = model.get_submodule(prefix)
        for stage, flag in zip(stage_names, flags, strict=True):
            if not flag:
                continue
            for block_name, block in root.get_submodule(stage).named_children():
                name = ".".join(p for p in (prefix, stage, block_name, "conv2") if p)
                if not isinstance(getattr(block, "conv2", None), nn.Module):
                    raise ValueError(f"block {name[: -len('.conv2')]!r} has no conv2 to convert")
                chosen.append(name)
    return chosen


def _check_convertible(name: str, module: nn.Module) -> None:
    # A subclass with its own forward (timm's Conv2dSame, StdConv2d...) computes something else.
    if not isinstance(module, nn.Conv2d) or type(module).forward is not nn.Conv2d.forward:
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d: only plain "
            "nn.Conv2d layers convert (choose convolutions, e.g. 'layer2.*.conv2')"
        )


def _input_sizes(
    model: nn.Module, names: list[str], shape: tuple[int, ...]
) -> dict[str, tuple[int, int, int]]:
    """``(batch, height, width)`` of each named layer's input, from one run on zeros."""
    sizes: dict[str, tuple[int, int, int]] = {}
    handles = []
    for name in names:

        def record(module: nn.Module, args: tuple, name: str = name) -> None:
            batch, _, height, width = args[0].shape
            sizes.setdefault(name, (batch, height, width))

        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    first = next(model.parameters(), None)
    example = torch.zeros(
        shape,
        dtype=first.dtype if first is not None and first.is_floating_point() else torch.float32,
        device=first.device if first is not None else "cpu",
    )
    with _inspection_run(model, handles):
        model(example)
    missing = [name for name in names if name not in sizes]
    if missing:
        raise ValueError(f"the run on input_shape {shape} never called {', '.join(missing)}")
    return sizes


def _smallest_input(spec: ConvSpec) -> tuple[int, int]:
    """An input size the layer accepts (parameters do not depend on it)."""
    return tuple(  # type: ignore[return-value]
        max(1, d * (k - 1) + 1 - 2 * p)
        for k, d, p in zip(spec.kernel_size, spec.dilation, spec.padding, strict=True)  # type: ignore[arg-type]
    )


def _layer_report(
    name: str, conv: nn.Conv2d, layer: DeformableConv2d, size: tuple[int, int, int] | None
) -> ConvertedLayer:
    before, after = spec_from_module(conv), spec_from_module(layer)
    if size is None:
        hw, batch = _smallest_input(before), 1
    else:
        hw, batch = (size[1], size[2]), size[0]
    cost_before = conv_cost(before, hw, batch=batch)
    cost_after = conv_cost(after, hw, batch=batch)
    return ConvertedLayer(
        name,
        before,
        after,
        size,
        cost_before.params,
        cost_after.params,
        None if size is None else cost_before.macs,
        None if size is None else cost_after.macs,
    )
