"""Per-layer parameters, multiply-accumulates and receptive fields of a whole ``nn.Module``.

:func:`model_cost` runs the model once on zeros of the given shape (in eval mode, without
gradients, restoring every module's mode afterwards) and records one row per module call, every
multiply-accumulate (MAC) going to the innermost row that performs it:

- **Convolution layers** (``nn.Conv2d``, ``nn.ConvTranspose2d``, every layer of
  :mod:`deformconv.nn`, torchvision's ``DeformConv2d``) and ``nn.Linear`` are counted by
  :func:`~deformconv.tools.arithmetic.conv_cost` with the conventions of
  :mod:`deformconv.tools.arithmetic`, so deformable layers include their offset branch, bilinear
  sampling and modulation. A layer that contains other layers (``SeparableConv2d``,
  ``DeformableConv2d``) is one row.
- **Other modules without children** (normalisation, activations, pooling, ``Conv1d``...) get a
  row with their parameters and the MACs that ``torch.utils.flop_counter.FlopCounterMode``
  counts inside them (``FLOPs / 2``; zero for element-wise work).
- **Modules with children** get a row only for their own work: the parameters they hold
  directly and the MACs FlopCounterMode counts in their ``forward`` outside their children (the
  projections of ``nn.MultiheadAttention``, a ``torch.matmul`` in a model's ``forward``; the
  model itself is named ``"(model)"``). Rows with neither are left out.

For models of plain convolutions and linear layers the total therefore equals FlopCounterMode's
FLOPs / 2. The total of parameters counts every parameter of the model once, called or not.

The receptive field of a row is the ``(height, width)`` of model input that one value of the
row's output sees, followed along the data: convolutions and pooling grow it by
``(extent - 1) * jump`` where ``jump`` is the product of the strides so far; operations that keep
the spatial size (activations, normalisation, additions, concatenation) take the largest field
of their inputs. It is ``None`` after anything that changes the spatial size otherwise
(flattening, linear layers, adaptive pooling, interpolation) or has no spatial layout.
Transposed convolutions divide the jump by their stride and add the span of input positions that
reach one of their outputs, less one; deformable layers count their nominal sampling grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from deformconv.nn.deform_conv import DeformConv2d
from deformconv.nn.separable import DeformableSeparableConv2d, SeparableConv2d
from deformconv.nn.spatial import SpatiallySeparableConv2d
from deformconv.tools.arithmetic import _transposed_reach, conv_cost
from deformconv.tools.conv_spec import ConvSpec
from deformconv.tools.module_spec import (
    _inspection_run,
    _is_torchvision_deform_conv,
    spec_from_module,
)

__all__ = ["LayerCost", "ModelCost", "model_cost"]

_ATOMS = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.Linear,
    SeparableConv2d,
    SpatiallySeparableConv2d,
    DeformableSeparableConv2d,
    DeformConv2d,
)
_TOP = "(model)"


@dataclass(frozen=True)
class LayerCost:
    """One call of one layer in :func:`model_cost`.

    Attributes:
        name: the module's qualified name in the model (``"layer1.0.conv1"``).
        type: its class name.
        output_shape: shape of its (first) output, batch included.
        params: parameters of the module, its children's included.
        macs: multiply-accumulates of the call, whole batch.
        receptive_field: ``(height, width)`` of model input that one output value sees, or
            ``None`` where that is not defined.
        spec: the layer as a :class:`~deformconv.tools.conv_spec.ConvSpec` for convolution
            layers, else ``None``.
    """

    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    receptive_field: tuple[int, int] | None
    spec: ConvSpec | None = None


@dataclass(frozen=True)
class ModelCost:
    """What :func:`model_cost` finds: per-layer rows and totals.

    Attributes:
        input_shape: the shape the model was run on.
        layers: one :class:`LayerCost` per call, in call order.
        params: every parameter of the model, counted once.
        macs: multiply-accumulates of all rows.
    """

    input_shape: tuple[int, ...]
    layers: tuple[LayerCost, ...]
    params: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready dictionaries and lists."""
        return {
            "input_shape": list(self.input_shape),
            "params": self.params,
            "macs": self.macs,
            "layers": [
                {
                    "name": row.name,
                    "type": row.type,
                    "output_shape": list(row.output_shape),
                    "params": row.params,
                    "macs": row.macs,
                    "receptive_field": None
                    if row.receptive_field is None
                    else list(row.receptive_field),
                }
                for row in self.layers
            ],
        }


@dataclass(frozen=True)
class _Field:
    """Receptive field and jump (input pixels between neighbouring outputs), per dimension."""

    size: tuple[Fraction, Fraction]
    jump: tuple[Fraction, Fraction]

    def window(self, kernel: Any, stride: Any, dilation: Any) -> _Field:
        k, s, d = _two(kernel), _two(stride), _two(dilation)
        return _Field(
            (
                self.size[0] + d[0] * (k[0] - 1) * self.jump[0],
                self.size[1] + d[1] * (k[1] - 1) * self.jump[1],
            ),
            (self.jump[0] * s[0], self.jump[1] * s[1]),
        )

    def transposed(self, kernel: Any, stride: Any, dilation: Any) -> _Field:
        k, s, d = _two(kernel), _two(stride), _two(dilation)
        reach = [_transposed_reach(k[i], s[i], d[i]) for i in range(2)]
        return _Field(
            (
                self.size[0] + (reach[0] - 1) * self.jump[0],
                self.size[1] + (reach[1] - 1) * self.jump[1],
            ),
            (self.jump[0] / s[0], self.jump[1] / s[1]),
        )

    def merge(self, other: _Field) -> _Field:
        return _Field(
            (max(self.size[0], other.size[0]), max(self.size[1], other.size[1])),
            (max(self.jump[0], other.jump[0]), max(self.jump[1], other.jump[1])),
        )

    def rounded(self) -> tuple[int, int]:
        return math.ceil(self.size[0]), math.ceil(self.size[1])


_ATTR = "_deformconv_receptive_field"
# Positional parameter names of the functions whose geometry the field follows.
_SIGNATURES = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose2d": (
        "input",
        "weight",
        "bias",
        "stride",
        "padding",
        "output_padding",
        "groups",
        "dilation",
    ),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation"),
    "max_pool2d_with_indices": ("input", "kernel_size", "stride", "padding", "dilation"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding"),
}
# Their fields are set by the layer's hook, not guessed from the spatial size.
_OPAQUE = ("deform_conv2d",)


def _two(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _field_of(value: Any) -> _Field | None:
    return getattr(value, _ATTR, None) if isinstance(value, Tensor) else None


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a value: a tensor, or nested tuples, lists and dicts of them."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _mark(output: Any, field: _Field | None) -> None:
    for tensor in _tensors(output):
        if tensor.dim() == 4:
            setattr(tensor, _ATTR, field)


class _FieldMode(TorchFunctionMode):
    """Carries receptive fields from the model input along every torch function."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _SIGNATURES:
            bound = dict(zip(_SIGNATURES[name], args, strict=False))
            bound.update(kwargs)
            source = _field_of(bound["input"])
            _mark(output, None if source is None else _geometry(name, bound, source))
        elif name == "pad":
            # Padding shifts positions but adds no input anyone sees: the field stays.
            _mark(output, _field_of(args[0] if args else kwargs.get("input")))
        elif name not in _OPAQUE:
            _mark(output, _same_size_field(output, args, kwargs))
        return output


def _geometry(name: str, bound: dict[str, Any], source: _Field) -> _Field:
    if name.startswith("conv"):
        kernel = tuple(bound["weight"].shape[-2:])
        stride, dilation = bound.get("stride", 1), bound.get("dilation", 1)
        if name == "conv_transpose2d":
            return source.transposed(kernel, stride, dilation)
        return source.window(kernel, stride, dilation)
    kernel = bound["kernel_size"]
    stride = bound.get("stride") or kernel
    return source.window(kernel, stride, bound.get("dilation", 1))


def _same_size_field(output: Any, args: tuple, kwargs: dict) -> _Field | None:
    """The largest field among the 4-D inputs whose spatial size the output keeps."""
    outputs = [t for t in _tensors(output) if t.dim() == 4]
    if not outputs:
        return None
    spatial = outputs[0].shape[-2:]
    field = None
    for value in (*args, *kwargs.values()):
        for tensor in _tensors(value):
            source = _field_of(tensor)
            if source is not None and tensor.dim() == 4 and tensor.shape[-2:] == spatial:
                field = source if field is None else field.merge(source)
    return field


def _is_atom(module: nn.Module) -> bool:
    return isinstance(module, _ATOMS) or _is_torchvision_deform_conv(module)


def _tracked_modules(model: nn.Module) -> dict[int, str]:
    """Names of the modules to hook, by ``id``: all of them except the insides of known layers."""
    tracked: dict[int, str] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if _is_atom(module):
            inside.append(name)
        tracked[id(module)] = name
    return tracked


def _layer_spec(module: nn.Module, args: tuple, kwargs: dict) -> ConvSpec | None:
    """The spec of a convolution layer as called; offsets and mask passed in say which
    deformable variant runs."""
    if isinstance(module, nn.Linear):
        return None
    spec = spec_from_module(module)
    if spec.kind == "deformable" and not spec.offset_branch:
        offset = args[1] if len(args) > 1 else kwargs["offset"]
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        taps = spec.kernel_size[0] * spec.kernel_size[1]  # type: ignore[index]
        spec = dataclasses.replace(
            spec, offset_groups=offset.shape[1] // (2 * taps), modulated=mask is not None
        )
    return spec


def model_cost(model: nn.Module, input_shape: tuple[int, ...] | torch.Size) -> ModelCost:
    """Parameters, multiply-accumulates and receptive field of every layer of ``model``.

    The model runs once on zeros of ``input_shape`` (dtype and device of its first parameter);
    see the module docstring for what each row counts.

    Args:
        model: any module whose ``forward`` takes one tensor.
        input_shape: the input's full shape, batch included, e.g. ``(1, 3, 224, 224)``.

    Returns:
        A :class:`ModelCost` with one row per layer call and the totals.

    Example:
        >>> from deformconv.nn import SeparableConv2d
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), SeparableConv2d(16, 32, 3))
        >>> cost = model_cost(net, (1, 3, 12, 12))
        >>> [(r.name, r.output_shape, r.params, r.macs, r.receptive_field) for r in cost.layers]
        [('0', (1, 16, 12, 12), 448, 62208, (3, 3)), ('1', (1, 16, 12, 12), 0, 0, (3, 3)), ('2', (1, 32, 10, 10), 688, 65600, (5, 5))]
        >>> cost.params, cost.macs
        (1136, 127808)
    """
    shape = tuple(int(v) for v in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be a non-empty shape of positive sizes, got {shape}")
    first = next(model.parameters(), None)
    example = torch.zeros(
        shape,
        dtype=first.dtype if first is not None and first.is_floating_point() else torch.float32,
        device=first.device if first is not None else "cpu",
    )
    names = _tracked_modules(model)
    layers: list[LayerCost] = []
    counter = FlopCounterMode(display=False)
    # Per call in progress: FlopCounterMode's total when it started, and the FLOPs of its
    # tracked children so far.
    calls: list[list[int]] = []

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append([counter.get_total_flops(), 0])

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        start, in_children = calls.pop()
        flops = counter.get_total_flops() - start
        if calls:
            calls[-1][1] += flops
        out = next(_tensors(output), None)
        spec = None
        if _is_atom(module):
            macs, spec = _atom_cost(module, args, kwargs, out)
            params = sum(p.numel() for p in module.parameters())
        elif not any(True for _ in module.children()):
            macs, params = flops // 2, sum(p.numel() for p in module.parameters())
        else:
            macs = (flops - in_children) // 2
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if not macs and not params:
                return
        field = _field_of(out)
        layers.append(
            LayerCost(
                name=names[id(module)] or _TOP,
                type=type(module).__name__,
                output_shape=tuple(out.shape) if out is not None else (),
                params=params,
                macs=macs,
                receptive_field=None if field is None else field.rounded(),
                spec=spec,
            )
        )

    handles = []
    for module in model.modules():
        if id(module) in names:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
    setattr(example, _ATTR, _Field((Fraction(1), Fraction(1)), (Fraction(1), Fraction(1))))
    with _inspection_run(model, handles), counter, _FieldMode():
        model(example)
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(shape, tuple(layers), params, sum(row.macs for row in layers))


def _atom_cost(
    module: nn.Module, args: tuple, kwargs: dict, out: Tensor | None
) -> tuple[int, ConvSpec | None]:
    """MACs and spec of a known layer's call; also fixes its output's receptive field, which
    the function mode cannot follow through deformable sampling."""
    source = _field_of(args[0]) if args else None
    input = args[0] if args else kwargs["input"]
    if isinstance(module, nn.Linear):
        return input.numel() // module.in_features * module.in_features * module.out_features, None
    spec = _layer_spec(module, args, kwargs)
    assert spec is not None
    batch, _, height, width = input.shape
    cost = conv_cost(spec, (height, width), batch=batch)
    if out is not None and source is not None:
        grow: Callable[..., _Field] = (
            source.transposed if spec.kind == "transposed" else source.window
        )
        field = grow(spec.kernel_size, spec.stride, spec.dilation)
        # Offsets and a mask passed in move the sampling points: the output also sees what
        # they saw, centred on the same position.
        for extra in (*args[1:], *kwargs.values()):
            extra_field = _field_of(extra)
            if extra_field is not None:
                field = field.merge(extra_field)
        setattr(out, _ATTR, field)
    return cost.macs, spec
