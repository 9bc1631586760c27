"""``deformconv cost MODEL --input HxWxC``: a table of a saved model's layers.

The model runs once on zeros of shape ``(batch, C, H, W)`` through
:func:`deformconv.tools.model_cost`, which gives one row per layer call with its output shape,
parameters, multiply-accumulates (MACs) and receptive field; ``--json`` prints the same as
:meth:`deformconv.tools.ModelCost.to_dict`. The file is loaded as :mod:`deformconv.cli._models`
describes (weights-only first; ``--trust-pickle`` for ``torch.save(model)`` files).
"""

from __future__ import annotations

import argparse
from typing import Any

from deformconv.cli._common import first_line, print_error, print_json, print_warning
from deformconv.cli._models import PICKLE_WARNING, ModelFileError, load_model
from deformconv.cli.cost import _DEFORMABLE, _FIELD_NOTE, CostError, input_text, layer_options
from deformconv.tools.model_cost import ModelCost, model_cost

__all__ = ["run_model"]


def _cost(args: argparse.Namespace, path: str) -> ModelCost:
    height, width, channels = input_text(args.input)
    given = layer_options(args)
    if given:
        raise CostError(
            f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} a layer type, and "
            f"{path} is a model file: give only --input (and --batch)"
        )
    if args.batch < 1:
        raise CostError(f"--batch must be >= 1, got {args.batch}")
    model, kind = load_model(path, trust_pickle=args.trust_pickle)
    if kind == "torchscript":
        raise CostError(
            f"{path} is a TorchScript model, whose layers cannot be hooked one by one; save the "
            "eager model with torch.save(model) and pass --trust-pickle"
        )
    print_warning("cost", PICKLE_WARNING.format(path=path))  # it was unpickled
    shape = (args.batch, channels, height, width)
    try:
        return model_cost(model, shape)
    except Exception as exc:
        raise CostError(
            f"the model in {path} failed on an input of shape {shape} (from --input "
            f"{args.input.strip()}): {first_line(exc)}"
        ) from None


def _shape(shape: tuple[int, ...]) -> str:
    """An output shape without its batch: ``HxWxC`` for images, else the sizes joined by x."""
    if len(shape) == 4:
        _, channels, height, width = shape
        return f"{height}x{width}x{channels}"
    return "x".join(map(str, shape[1:])) or "scalar"


def _field(row: Any) -> str:
    if row.receptive_field is None:
        return "-"
    text = f"{row.receptive_field[0]}x{row.receptive_field[1]}"
    return text + ("*" if row.spec is not None and row.spec.kind in _DEFORMABLE else "")


def run_model(args: argparse.Namespace) -> int:
    """Run ``deformconv cost`` on the model file ``args.types[0]``; returns the exit code."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    path = args.types[0]
    try:
        cost = _cost(args, path)
    except (CostError, ModelFileError) as exc:
        print_error("cost", str(exc))
        return 2
    height, width, channels = input_text(args.input)
    if args.json:
        document = {
            "model": path,
            "input": {"height": height, "width": width, "channels": channels, "batch": args.batch},
            **cost.to_dict(),
        }
        print_json(document)
        return 0
    console = Console(highlight=False)
    batch = f", batch {args.batch}" if args.batch > 1 else ""
    # One line whatever the width: a path broken in two cannot be copied.
    title = f"{path}: {len(cost.layers)} layers on a {args.input.strip()} (HxWxC) input{batch}"
    console.print(title, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, show_footer=True, pad_edge=False)
    columns = ("layer", "type", "output", "params", "MACs", "receptive field")
    footers = ("total", "", "", f"{cost.params:,}", f"{cost.macs:,}", "")
    for column, footer in zip(columns, footers, strict=True):
        justify = "left" if column in ("layer", "type") else "right"
        table.add_column(column, footer, justify=justify)  # type: ignore[arg-type]
    for row in cost.layers:
        table.add_row(
            row.name,
            row.type,
            _shape(row.output_shape),
            f"{row.params:,}",
            f"{row.macs:,}",
            _field(row),
        )
    console.print(table)
    console.print(
        "MACs are multiply-accumulates (FLOPs / 2), for the whole batch; params count every "
        "parameter once; receptive field in input pixels (HxW)"
    )
    if any(row.spec is not None and row.spec.kind in _DEFORMABLE for row in cost.layers):
        console.print(_FIELD_NOTE)
    return 0
