"""Sizes, parameters, multiply-accumulates and memory of convolution layers, without tensors.

Pass a :class:`~deformconv.tools.conv_spec.ConvSpec` and an input size to :func:`conv_cost`;
the :class:`ConvCost` it returns holds the output shape, parameters, multiply-accumulates (MACs),
receptive field and activation memory, and the same per step of the layer (:class:`StepCost`).
:func:`transposed_output_padding` picks the ``output_padding`` that makes a transposed
convolution reach a given size.

What is counted:

- **Parameters**: every weight and bias of the layer, the offset branch's included.
- **MACs** (multiply-accumulates, one multiplication and one addition): for a convolution,
  ``output positions * output channels * (input channels / groups) * kh * kw``, that is
  ``FLOPs / 2`` in ``torch.utils.flop_counter.FlopCounterMode``'s count; bias additions are not
  counted, as there. A transposed convolution is counted like FlopCounterMode does: every *input*
  position times every weight, ``H_in * W_in * C_in * (C_out / groups) * kh * kw``, the taps that
  land in the cropped padding included. Spatially separable layers count both passes, the
  vertical one over every column of the input (it runs before the columns are reduced).
- **Deformable convolution** adds, to the convolution above:

  - the *offset branch* (when ``offset_branch``): a convolution from ``C_in`` to
    ``2 * G * kh * kw`` channels (``3 * G * kh * kw`` when ``modulated``, the mask logits),
    with the layer's kernel, stride, padding and dilation and a bias;
  - *bilinear sampling*: 4 MACs (four corner values times their weights) per sampled value, and
    ``C_in * kh * kw`` values are sampled per output position; the interpolation weights, shared
    by the channels of an offset group, and the mask's sigmoid are not counted;
  - *modulation* (v2): 1 MAC per sampled value, its product with the mask.
- **Receptive field**: the ``(height, width)`` of input that one output value sees:
  ``dilation * (kernel - 1) + 1``. For a transposed convolution, the widest span of input
  positions that reach one output, ``floor((kernel - 1) * g / stride) * dilation / g + 1`` with
  ``g = gcd(stride, dilation)`` (``ceil(kernel / stride)`` without dilation). For deformable
  layers it is the nominal sampling grid: learned offsets make the true field data dependent.
- **Activation memory**: the elements of the tensors the layer produces, the output and the maps
  between its steps (the depthwise output of a separable layer, the vertical pass of a spatially
  separable one, the offset branch output of a deformable one), times ``bytes_per_element``. The
  sampled-column workspace of deformable convolution is not included: kernels bound it by the
  workspace budget (:func:`deformconv.ops.get_workspace_budget`).

All counts cover the whole batch except parameters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from deformconv._validation import Pair, check_int, to_pair
from deformconv.nn.depthwise import same_padding
from deformconv.tools.conv_spec import ConvSpec

__all__ = ["ConvCost", "StepCost", "conv_cost", "transposed_output_padding"]


@dataclass(frozen=True)
class StepCost:
    """The cost of one step of a layer (e.g. the pointwise step of a separable convolution).

    Attributes:
        name: the step, e.g. ``"depthwise"``, ``"offset branch"``, ``"bilinear sampling"``.
        output_shape: ``(channels, height, width)`` of what the step produces, per image.
        params: parameters of the step.
        macs: multiply-accumulates of the step for the whole batch.
        activations: elements the step keeps for the whole batch (0 for workspace).
    """

    name: str
    output_shape: tuple[int, int, int]
    params: int
    macs: int
    activations: int


@dataclass(frozen=True)
class ConvCost:
    """What :func:`conv_cost` computes for one layer and one input.

    Attributes:
        spec: the layer.
        input_shape: ``(channels, height, width)`` of one input image.
        batch: images in the batch.
        output_shape: ``(channels, height, width)`` of one output image.
        params: parameters.
        macs: multiply-accumulates for the whole batch.
        receptive_field: ``(height, width)`` of input seen by one output value.
        activation_elements: elements of the tensors the layer produces, whole batch.
        activation_bytes: ``activation_elements * bytes_per_element``.
        steps: the same, step by step; ``params`` and ``macs`` are their sums.
    """

    spec: ConvSpec
    input_shape: tuple[int, int, int]
    batch: int
    output_shape: tuple[int, int, int]
    params: int
    macs: int
    receptive_field: Pair
    activation_elements: int
    activation_bytes: int
    steps: tuple[StepCost, ...]

    @property
    def macs_per_output(self) -> float:
        """Multiply-accumulates per output value (``5 * 5 * 3 = 75`` for a 5 x 5 convolution
        of 3 channels)."""
        c, h, w = self.output_shape
        return self.macs / (self.batch * c * h * w)

    def to_dict(self) -> dict[str, Any]:
        """The cost as JSON-ready dictionaries, lists and numbers; shapes are written out as
        ``{"channels", "height", "width"}``."""

        def shape(chw: tuple[int, int, int]) -> dict[str, int]:
            return dict(zip(("channels", "height", "width"), chw, strict=True))

        spec = dataclasses.asdict(self.spec)
        for key, value in spec.items():
            if isinstance(value, tuple):
                spec[key] = list(value)
        return {
            "kind": self.spec.kind,
            "title": self.spec.title,
            "spec": spec,
            "batch": self.batch,
            "input_shape": shape(self.input_shape),
            "output_shape": shape(self.output_shape),
            "params": self.params,
            "macs": self.macs,
            "macs_per_output": self.macs_per_output,
            "receptive_field": list(self.receptive_field),
            "activation_elements": self.activation_elements,
            "activation_bytes": self.activation_bytes,
            "steps": [
                {
                    "name": step.name,
                    "output_shape": shape(step.output_shape),
                    "params": step.params,
                    "macs": step.macs,
                    "activations": step.activations,
                }
                for step in self.steps
            ],
        }


def _out_size(
    size: int, kernel: int, stride: int, pads: Pair, dilation: int, axis: str, padding_text: str
) -> int:
    extent = dilation * (kernel - 1) + 1
    padded = size + pads[0] + pads[1]
    if extent > padded:
        raise ValueError(
            f"the kernel extent along {axis} is {extent} (kernel_size {kernel}, dilation "
            f"{dilation}), larger than the padded input {axis} {padded} (input {size} + "
            f"padding {padding_text}); shrink the kernel or dilation, or pad more"
        )
    return (padded - extent) // stride + 1


def _pads(spec: ConvSpec, size: int, axis: int) -> tuple[Pair, str]:
    """The zeros before and after the input along ``axis`` (0 rows, 1 columns), and a text."""
    if spec.padding == "same":
        pads = same_padding(size, spec.kernel_size[axis], spec.stride[axis], spec.dilation[axis])
        return pads, f"'same' = {pads[0]} + {pads[1]}"
    p = spec.padding[axis]  # type: ignore[index]
    return (p, p), f"{p} + {p}"


def conv_cost(
    spec: ConvSpec,
    input_size: int | tuple[int, int],
    batch: int = 1,
    bytes_per_element: int = 4,
) -> ConvCost:
    """Output shape, parameters, MACs, receptive field and activation memory of one layer.

    The conventions are those of the module docstring.

    Args:
        spec: the layer.
        input_size: ``(height, width)`` of the input, or one int for a square input; its
            channels are ``spec.in_channels``.
        batch: images per batch (MACs and activations scale with it).
        bytes_per_element: bytes of one activation value (4 for float32).

    Returns:
        A :class:`ConvCost`.

    Raises:
        ValueError: on a non-positive size, or a kernel larger than the padded input.

    Example:
        >>> cost = conv_cost(ConvSpec("conv", 3, 256, kernel_size=5), (12, 12))
        >>> cost.output_shape, cost.macs, cost.macs_per_output
        ((256, 8, 8), 1228800, 75.0)
        >>> conv_cost(ConvSpec("separable", 3, 256, kernel_size=5), 12).macs
        53952
        >>> [(s.name, s.params, s.macs) for s in conv_cost(ConvSpec("deformable", 1, 1), 3).steps]
        [('offset branch', 270, 243), ('bilinear sampling', 0, 36), ('modulation', 0, 9), ('convolution', 10, 9)]
    """
    h, w = to_pair(input_size, "input_size", 1)
    check_int(batch, "batch")
    check_int(bytes_per_element, "bytes_per_element")
    c_in, c_out, mid = spec.in_channels, spec.out_channels, spec.mid
    assert c_out is not None
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    taps = kh * kw
    bias = int(spec.bias)
    steps: list[StepCost] = []

    def step(name: str, shape: tuple[int, int, int], params: int, macs_per_image: int) -> None:
        kept = 0 if name in ("bilinear sampling", "modulation") else math.prod(shape)
        steps.append(StepCost(name, shape, params, macs_per_image * batch, kept * batch))

    if spec.kind == "transposed":
        (oph, opw), (ph, pw) = spec.output_padding, spec.padding  # type: ignore[misc]
        ho = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1  # type: ignore[operator]
        wo = (w - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1  # type: ignore[operator]
        if ho < 1 or wo < 1:
            raise ValueError(
                f"a transposed convolution of a {h}x{w} input gives a {ho}x{wo} output: "
                "(size - 1) * stride - 2 * padding + dilation * (kernel_size - 1) "
                "+ output_padding + 1 must be >= 1; reduce the padding"
            )
        per_group = c_out // spec.groups
        params = c_in * per_group * taps + bias * c_out
        step("transposed convolution", (c_out, ho, wo), params, h * w * c_in * per_group * taps)
        field = (_transposed_reach(kh, sh, dh), _transposed_reach(kw, sw, dw))
        return _finish(spec, (c_in, h, w), batch, bytes_per_element, steps, field)

    pads_h, text_h = _pads(spec, h, 0)
    pads_w, text_w = _pads(spec, w, 1)
    ho = _out_size(h, kh, sh, pads_h, dh, "height", text_h)
    wo = _out_size(w, kw, sw, pads_w, dw, "width", text_w)
    out = (c_out, ho, wo)
    positions = ho * wo
    field = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)

    if spec.kind == "conv":
        per_group = c_in // spec.groups
        params = c_out * per_group * taps + bias * c_out
        step("convolution", out, params, positions * c_out * per_group * taps)
    elif spec.kind == "depthwise":
        step("depthwise", out, c_out * taps + bias * c_out, positions * c_out * taps)
    elif spec.kind == "separable":
        step("depthwise", (mid, ho, wo), mid * taps, positions * mid * taps)
        step("pointwise", out, mid * c_out + bias * c_out, positions * mid * c_out)
    elif spec.kind == "spatial":
        v_in, h_in = (1, 1) if spec.per_channel else (c_in, mid)
        step("vertical", (mid, ho, w), mid * v_in * kh, ho * w * mid * v_in * kh)
        step("horizontal", out, c_out * h_in * kw + bias * c_out, positions * c_out * h_in * kw)
    else:
        branch = (3 if spec.modulated else 2) * spec.offset_groups * taps
        if spec.offset_branch:
            params = branch * (c_in * taps + 1)
            step("offset branch", (branch, ho, wo), params, positions * branch * c_in * taps)
        sampled = positions * c_in * taps
        step("bilinear sampling", (c_in * taps, ho, wo), 0, 4 * sampled)
        if spec.modulated:
            step("modulation", (c_in * taps, ho, wo), 0, sampled)
        if spec.kind == "deformable":
            per_group = c_in // spec.groups
            params = c_out * per_group * taps + bias * c_out
            step("convolution", out, params, positions * c_out * per_group * taps)
        else:
            step("depthwise", (mid, ho, wo), mid * taps, positions * mid * taps)
            step("pointwise", out, mid * c_out + bias * c_out, positions * mid * c_out)
    return _finish(spec, (c_in, h, w), batch, bytes_per_element, steps, field)


def _transposed_reach(kernel: int, stride: int, dilation: int) -> int:
    """The widest span of input positions that reach one output of a transposed convolution.

    Output ``y`` receives input ``x`` through tap ``i`` when ``y + padding = x * stride + i *
    dilation``; the taps reaching one output step through ``i`` in strides of ``stride / g``,
    ``g = gcd(stride, dilation)``, so the widest set spans ``floor((kernel - 1) * g / stride)``
    such steps of ``dilation / g`` inputs each.
    """
    g = math.gcd(stride, dilation)
    return (kernel - 1) * g // stride * (dilation // g) + 1


def _finish(
    spec: ConvSpec,
    input_shape: tuple[int, int, int],
    batch: int,
    bytes_per_element: int,
    steps: list[StepCost],
    field: Pair,
) -> ConvCost:
    activations = sum(s.activations for s in steps)
    return ConvCost(
        spec=spec,
        input_shape=input_shape,
        batch=batch,
        output_shape=steps[-1].output_shape,
        params=sum(s.params for s in steps),
        macs=sum(s.macs for s in steps),
        receptive_field=field,
        activation_elements=activations,
        activation_bytes=activations * bytes_per_element,
        steps=tuple(steps),
    )


def transposed_output_padding(
    input_size: int | tuple[int, int],
    output_size: int | tuple[int, int],
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Pair:
    """The ``output_padding`` that makes ``nn.ConvTranspose2d`` produce ``output_size``.

    A transposed convolution gives ``(size - 1) * stride - 2 * padding + dilation *
    (kernel_size - 1) + 1 + output_padding`` along each dimension, with ``0 <= output_padding <
    max(stride, dilation)``: the sizes it reaches form a run of ``max(stride, dilation)``
    integers.

    Args:
        input_size: ``(height, width)`` of the input, or one int.
        output_size: the wanted ``(height, width)``, or one int.
        kernel_size: of the transposed convolution.
        stride: of the transposed convolution.
        padding: of the transposed convolution.
        dilation: of the transposed convolution.

    Returns:
        ``(output_padding_h, output_padding_w)`` for the constructor.

    Raises:
        ValueError: if a size cannot be reached; the message gives the sizes that can, and how
            far the settings are from reaching the wanted one.

    Example:
        >>> transposed_output_padding(8, 16, kernel_size=3, stride=2, padding=1)
        (1, 1)
        >>> transposed_output_padding((8, 8), (15, 17), kernel_size=3, stride=2, padding=1)
        Traceback (most recent call last):
        ...
        ValueError: output width 17 is out of reach: a transposed convolution of input width 8 with kernel_size 3, stride 2, padding 1, dilation 1 gives 15 to 16 (output_padding 0 to 1); padding=0 reaches 17
    """
    sizes_in = to_pair(input_size, "input_size", 1)
    sizes_out = to_pair(output_size, "output_size", 1)
    kernels, strides = to_pair(kernel_size, "kernel_size", 1), to_pair(stride, "stride", 1)
    paddings, dilations = to_pair(padding, "padding", 0), to_pair(dilation, "dilation", 1)
    result = []
    for axis, n, target, k, s, p, d in zip(
        ("height", "width"), sizes_in, sizes_out, kernels, strides, paddings, dilations, strict=True
    ):
        smallest = (n - 1) * s - 2 * p + d * (k - 1) + 1
        largest = smallest + max(s, d) - 1
        if smallest <= target <= largest:
            result.append(target - smallest)
            continue
        settings = (
            f"a transposed convolution of input {axis} {n} with kernel_size {k}, stride {s}, "
            f"padding {p}, dilation {d}"
        )
        if largest < 1:
            reach = f"gives no valid size (at most {largest})"
        elif smallest == largest:
            reach = (
                f"gives only {smallest} (output_padding must stay 0 when stride and dilation are 1)"
            )
        else:
            reach = (
                f"gives {max(smallest, 1)} to {largest} (output_padding 0 to {largest - smallest})"
            )
        span = max(s, d)
        if span == 1 and (target - smallest) % 2:
            hint = (
                f"padding moves the size in steps of 2, so from {smallest} it cannot reach "
                f"{target}; change kernel_size by an odd amount, or use a stride of 2"
            )
        elif target > largest and p >= math.ceil((target - largest) / 2):
            fixed = p - math.ceil((target - largest) / 2)
            hint = f"padding={fixed} reaches {target}"
        elif target > largest:
            hint = (
                f"even padding=0 tops out at {largest + 2 * p}; use a larger kernel_size, "
                "stride or dilation"
            )
        else:
            hint = f"padding={p + math.ceil((smallest - target) / 2)} reaches {target}"
        raise ValueError(f"output {axis} {target} is out of reach: {settings} {reach}; {hint}")
    return result[0], result[1]
