"""``deformconv cost``: output size, parameters and multiply-accumulates of convolution layers.

One type describes that layer step by step; several types are compared side by side on the same
input. Shared options apply to every listed type they make sense for; ``TYPE:key=value,...``
sets options for one type only (``conv:groups=4``, ``spatial:per-channel=yes``). A model file
instead of types gets one row per layer, as :func:`deformconv.tools.model_cost` counts them
(see :mod:`deformconv.cli._cost_model`).

Exit codes: 0 success; 2 invalid arguments or inputs.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from deformconv.cli._common import parse_pair, print_error, print_json
from deformconv.cli._models import is_model_path
from deformconv.tools.arithmetic import ConvCost, conv_cost
from deformconv.tools.conv_spec import ConvSpec

# CLI type -> (ConvSpec kind, fixed fields).
_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "conv": ("conv", {}),
    "grouped": ("conv", {}),
    "dilated": ("conv", {}),
    "transposed": ("transposed", {}),
    "depthwise": ("depthwise", {}),
    "separable": ("separable", {}),
    "spatial": ("spatial", {}),
    "deformable": ("deformable", {"modulated": True}),
    "deformable-v1": ("deformable", {"modulated": False}),
    "deformable-v2": ("deformable", {"modulated": True}),
    "deformable-separable": ("deformable_separable", {}),
}
_BOOLS = {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}
# The ConvSpec fields each kind accepts besides the common ones.
_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "conv": ("groups",),
    "transposed": ("groups", "output_padding"),
    "depthwise": ("depth_multiplier",),
    "separable": ("depth_multiplier",),
    "spatial": ("per_channel", "mid_channels"),
    "deformable": ("groups", "offset_groups", "modulated", "offset_branch"),
    "deformable_separable": ("depth_multiplier", "offset_groups", "modulated", "offset_branch"),
}
_SHARED = (
    "out",
    "kernel",
    "stride",
    "padding",
    "dilation",
    "groups",
    "depth-multiplier",
    "output-padding",
    "offset-groups",
    "mid-channels",
)
_DEFORMABLE = ("deformable", "deformable_separable")
# The footnote of a table whose receptive fields are marked * (those of deformable layers).
_FIELD_NOTE = "* nominal sampling grid: learned offsets make the field data dependent"
_COMMON = ("out_channels", "kernel_size", "stride", "padding", "dilation", "bias")


class CostError(ValueError):
    """A description the command cannot turn into a layer; its message is shown as is."""


def _pair_text(text: str, option: str) -> tuple[int, int]:
    pair = parse_pair(text)
    if pair is None:
        raise CostError(f"{option} must be N or HxW with non-negative integers, got {text!r}")
    return pair


def _int_text(text: str, option: str) -> int:
    if not text.strip().isdigit():
        raise CostError(f"{option} must be a non-negative integer, got {text!r}")
    return int(text)


def _padding_text(text: str, option: str) -> tuple[int, int] | str:
    return text if text in ("same", "valid") else _pair_text(text, option)


def _bool_text(text: str, option: str) -> bool:
    if text.lower() not in _BOOLS:
        raise CostError(f"{option} must be yes or no, got {text!r}")
    return _BOOLS[text.lower()]


# Option (CLI spelling, no dashes in front) -> (ConvSpec field, parser of its text).
_OPTIONS: dict[str, tuple[str, Any]] = {
    "out": ("out_channels", _int_text),
    "kernel": ("kernel_size", _pair_text),
    "stride": ("stride", _pair_text),
    "padding": ("padding", _padding_text),
    "dilation": ("dilation", _pair_text),
    "groups": ("groups", _int_text),
    "depth-multiplier": ("depth_multiplier", _int_text),
    "output-padding": ("output_padding", _pair_text),
    "offset-groups": ("offset_groups", _int_text),
    "mid-channels": ("mid_channels", _int_text),
    "per-channel": ("per_channel", _bool_text),
    "modulated": ("modulated", _bool_text),
    "offset-branch": ("offset_branch", _bool_text),
    "bias": ("bias", _bool_text),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cost",
        help="output size, parameters and multiply-accumulates of convolution layers or models",
        description="Describe one convolution layer step by step, or compare several types "
        "on the same input. TYPE is one of: " + ", ".join(_TYPES) + ". Options apply to every "
        "TYPE they make sense for; TYPE:key=value[,key=value] sets options for one type only "
        "(keys: " + ", ".join(_OPTIONS) + "). Or give one model file (TorchScript is not "
        "supported; torch.save(model) with --trust-pickle) for a table of its layers. MACs are "
        "multiply-accumulates (= multiplications; bias additions not counted).",
        epilog="examples: deformconv cost conv separable --input 12x12x3 --out 256 --kernel 5; "
        "deformconv cost model.pt --input 32x32x3 --trust-pickle",
    )
    parser.add_argument(
        "types",
        nargs="+",
        metavar="TYPE|MODEL",
        help="layer type(s) to describe, or one model file",
    )
    parser.add_argument(
        "--input", required=True, metavar="HxWxC", help="input height x width x channels"
    )
    parser.add_argument("--out", metavar="N", help="output channels (not for depthwise)")
    parser.add_argument("--kernel", metavar="K|HxW", help="kernel size (default 3)")
    parser.add_argument("--stride", metavar="S|HxW", help="stride (default 1)")
    parser.add_argument(
        "--padding",
        metavar="P|HxW|same|valid",
        help="zeros on each side, or 'same' (TensorFlow's rule) / 'valid' (default 0)",
    )
    parser.add_argument("--dilation", metavar="D|HxW", help="dilation (default 1)")
    parser.add_argument(
        "--groups", metavar="G", help="channel groups (conv, transposed, deformable)"
    )
    parser.add_argument(
        "--depth-multiplier", metavar="M", help="depthwise filters per input channel (default 1)"
    )
    parser.add_argument("--output-padding", metavar="P|HxW", help="transposed convolution only")
    parser.add_argument("--offset-groups", metavar="G", help="deformable types (default 1)")
    parser.add_argument(
        "--mid-channels", metavar="N", help="spatial: channels between the passes (default --out)"
    )
    parser.add_argument(
        "--per-channel", action="store_true", help="spatial: filter each channel on its own"
    )
    parser.add_argument("--no-bias", action="store_true", help="layers without bias")
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    parser.add_argument(
        "--bytes", type=int, metavar="N", help="bytes per activation value (default 4)"
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a torch.save(model) file, which runs code stored in it: only for files you "
        "trust",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    """ConvSpec fields given as shared options, parsed."""
    given: dict[str, Any] = {}
    for option in _SHARED:
        text = getattr(args, option.replace("-", "_"))
        if text is not None:
            field, parse = _OPTIONS[option]
            given[field] = parse(text, f"--{option}")
    if args.per_channel:
        given["per_channel"] = True
    if args.no_bias:
        given["bias"] = False
    return given


def _takes(kind: str, field: str) -> bool:
    """A shared option for ``field`` applies to layers of ``kind``."""
    if field == "out_channels":
        return kind != "depthwise"
    return field in _COMMON or field in _KIND_FIELDS[kind]


def _spec(token: str, input_channels: int, shared: dict[str, Any]) -> ConvSpec:
    """The layer that ``TYPE[:key=value,...]`` describes."""
    name, _, rest = token.partition(":")
    if name not in _TYPES:
        raise CostError(f"unknown type {name!r}; choose from {', '.join(_TYPES)}")
    kind, fixed = _TYPES[name]
    fields = {key: value for key, value in shared.items() if _takes(kind, key)}
    for item in filter(None, rest.split(",")):
        key, sep, text = item.partition("=")
        if not sep or key not in _OPTIONS:
            raise CostError(
                f"{token!r}: options after ':' are key=value with key one of "
                f"{', '.join(_OPTIONS)}; got {item!r}"
            )
        field, parse = _OPTIONS[key]
        fields[field] = parse(text, f"{name}:{key}")
    fields.update(fixed)
    if kind != "depthwise" and "out_channels" not in fields:
        raise CostError(f"type {name!r} needs the output channels: give --out N")
    try:
        spec = ConvSpec(kind, input_channels, **fields)
    except (TypeError, ValueError) as exc:
        raise CostError(f"{token}: {exc}") from None
    if name == "grouped" and spec.groups == 1:
        raise CostError("type 'grouped' needs groups > 1: give --groups G or grouped:groups=G")
    if name == "dilated" and spec.dilation == (1, 1):
        raise CostError(
            "type 'dilated' needs dilation > 1: give --dilation D or dilated:dilation=D"
        )
    return spec


def input_text(text: str) -> tuple[int, int, int]:
    """``--input HxWxC`` as ``(height, width, channels)``, each at least 1."""
    match = re.match(r"^(\d+)x(\d+)x(\d+)$", text.strip())
    if not match or min(int(v) for v in match.groups()) < 1:
        raise CostError(
            f"--input must be HEIGHTxWIDTHxCHANNELS of positive ints (e.g. 12x12x3), got {text!r}"
        )
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def layer_options(args: argparse.Namespace) -> list[str]:
    """The layer options given on the command line, as typed (``--kernel``, ``--no-bias``)."""
    given = [f"--{option}" for option in _SHARED if getattr(args, option.replace("-", "_"))]
    given += [
        flag
        for flag, on in (("--per-channel", args.per_channel), ("--no-bias", args.no_bias))
        if on
    ]
    return given + (["--bytes"] if args.bytes is not None else [])


def costs(args: argparse.Namespace) -> list[tuple[str, ConvCost]]:
    """``(TYPE, cost)`` for every listed type; raises :class:`CostError` on a bad description."""
    height, width, channels = input_text(args.input)
    if args.bytes is None:
        args.bytes = 4
    for option in ("batch", "bytes"):
        if getattr(args, option) < 1:
            raise CostError(f"--{option} must be >= 1, got {getattr(args, option)}")
    shared = _shared(args)
    specs = [(token, _spec(token, channels, shared)) for token in args.types]
    options = {field: option for option, (field, _) in _OPTIONS.items()}
    for field in shared:
        if not any(_takes(spec.kind, field) for _, spec in specs):
            flag = "--no-bias" if field == "bias" else f"--{options[field]}"
            raise CostError(f"{flag} applies to none of the listed types ({', '.join(args.types)})")
    results = []
    for token, spec in specs:
        try:
            cost = conv_cost(spec, (height, width), batch=args.batch, bytes_per_element=args.bytes)
        except ValueError as exc:
            raise CostError(f"{token}: {exc}") from None
        results.append((token, cost))
    return results


def _hwc(shape: tuple[int, int, int]) -> str:
    channels, height, width = shape
    return f"{height}x{width}x{channels}"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _field(cost: ConvCost, short: bool = False) -> str:
    text = f"{cost.receptive_field[0]}x{cost.receptive_field[1]}"
    if cost.spec.kind not in _DEFORMABLE:
        return text
    return text + ("*" if short else " (nominal sampling grid)")


def run(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if len(args.types) == 1 and args.types[0] not in _TYPES and is_model_path(args.types[0]):
        from deformconv.cli._cost_model import run_model

        return run_model(args)
    try:
        results = costs(args)
    except CostError as exc:
        print_error("cost", str(exc))
        return 2
    if args.json:
        h, w, c = input_text(args.input)
        document = {
            "input": {"height": h, "width": w, "channels": c, "batch": args.batch},
            "results": [{"type": token, **cost.to_dict()} for token, cost in results],
        }
        print_json(document)
        return 0
    console = Console(highlight=False)
    batch = f", batch {args.batch}" if args.batch > 1 else ""
    if len(results) == 1:
        _, cost = results[0]
        console.print(
            f"{cost.spec.title}: {_hwc(cost.input_shape)} -> {_hwc(cost.output_shape)}{batch}"
        )
        several = len(cost.steps) > 1
        table = Table(box=box.SIMPLE if several else box.SIMPLE_HEAD, show_footer=several)
        total = ("total", _hwc(cost.output_shape), f"{cost.params:,}", f"{cost.macs:,}")
        for column, footer in zip(("step", "output (HxWxC)", "params", "MACs"), total, strict=True):
            table.add_column(column, footer, justify="left" if column == "step" else "right")
        for step in cost.steps:
            table.add_row(step.name, _hwc(step.output_shape), f"{step.params:,}", f"{step.macs:,}")
        console.print(table)
        console.print(f"MACs per output value: {cost.macs_per_output:,.6g}")
        console.print(f"receptive field: {_field(cost)}")
        console.print(
            f"activation memory: {_size(cost.activation_bytes)} "
            f"({cost.activation_elements:,} values x {args.bytes} bytes)"
        )
        multiplier = cost.spec.depth_multiplier
        if cost.spec.kind == "depthwise" or multiplier > 1:
            depthwise = next(step for step in cost.steps if step.name == "depthwise")
            _, height, width = depthwise.output_shape
            console.print(
                f"depthwise output per input channel: {height}x{width}x{multiplier} "
                f"(depth multiplier {multiplier})"
            )
        return 0
    console.print(f"{len(results)} layer types on a {args.input} (HxWxC) input{batch}")
    base_token, base = results[0]
    rows = {
        "output (HxWxC)": [_hwc(cost.output_shape) for _, cost in results],
        "params": [f"{cost.params:,}" for _, cost in results],
        "MACs": [f"{cost.macs:,}" for _, cost in results],
        "MACs per output": [f"{cost.macs_per_output:,.4g}" for _, cost in results],
        f"MACs / {base_token}": [f"{cost.macs / base.macs:.3g}" for _, cost in results],
        "receptive field": [_field(cost, short=True) for _, cost in results],
        "activation memory": [_size(cost.activation_bytes) for _, cost in results],
    }
    label_width = max(map(len, rows))
    headers, widths = [], []
    for index, (token, _) in enumerate(results):
        value_width = max(len(values[index]) for values in rows.values())
        # A long TYPE breaks after its punctuation rather than widen its column.
        header = re.sub(r"([-:,])", r"\1\n", token) if len(token) > value_width else token
        headers.append(header)
        widths.append(max(value_width, *map(len, header.split("\n"))) + 3)
    # Types side by side; as many tables as it takes to fit the terminal's width.
    chunks: list[list[int]] = [[]]
    used = label_width + 4
    for index, width in enumerate(widths):
        if chunks[-1] and used + width > console.width:
            chunks.append([])
            used = label_width + 4
        chunks[-1].append(index)
        used += width
    for chunk in chunks:
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column("")
        for index in chunk:
            table.add_column(headers[index], justify="right", no_wrap=True)
        for label, values in rows.items():
            table.add_row(label, *(values[index] for index in chunk))
        console.print(table)
    if any(cost.spec.kind in _DEFORMABLE for _, cost in results):
        console.print(_FIELD_NOTE)
    return 0
