"""``deformconv factor``: separability of a kernel, or separable approximations of a model.

The one argument is a kernel name (``sobel``, ``laplacian``, ``gaussian``...), a kernel typed
inline (``"1 2 1; 2 4 2; 1 2 1"``) or a model file (TorchScript, or ``torch.save(model)`` with
``--trust-pickle``). ``--output`` is checked before any work and written atomically.

Exit codes: 0 success; 2 invalid arguments or inputs (a kernel or model that does not load, an
option out of range, an ``--output`` that cannot be written).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deformconv.cli._common import print_error, print_json, print_warning
from deformconv.cli._files import OutputError, atomic_path, check_destination
from deformconv.cli._models import (
    PICKLE_WARNING,
    ModelFileError,
    describe,
    is_model_path,
    load_model,
)
from deformconv.tools.kernels import kernel_names, named_kernel, parse_kernel
from deformconv.tools.model_factorization import (
    LayerReport,
    ModelFactorization,
    conv_layers,
    factorize_layers,
    factorize_model,
)
from deformconv.tools.separability import KernelFactorization, factorize_kernel

_DEFAULT_MAX_ERROR = 0.05
_RANDOM_SIZE = 32


class FactorError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


@dataclass(frozen=True)
class _ModelRun:
    """What a model run found: ``result`` for an eager model; for a TorchScript one, ``layers``
    alone (analysed one by one)."""

    layers: tuple[LayerReport, ...]
    max_error: float | None
    budget: int | None = None
    result: ModelFactorization | None = None
    source: str = ""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "factor",
        help="separability of a kernel; separable approximations of a model's convolutions",
        description="Test a 2-D kernel for separability (rank, exact 1-D factors, best "
        "r-term approximations), or replace the nn.Conv2d layers of a saved model by spatially "
        "separable (k x 1 then 1 x k) or depthwise separable approximations within an error "
        "bound or a parameter budget. Loading a torch.save(model) file runs code stored in it, "
        "so it needs --trust-pickle.",
    )
    parser.add_argument(
        "target",
        metavar="KERNEL_OR_MODEL",
        help=f"a kernel name ({', '.join(kernel_names())}), a kernel inline "
        "('1 2 1; 2 4 2; 1 2 1', '[[1, 0], [0, 1]]', fractions such as 1/16 allowed) or a "
        "model file saved with torch.jit.save or (with --trust-pickle) torch.save(model)",
    )
    kernel = parser.add_argument_group("kernels")
    kernel.add_argument("--size", type=int, help="size of a named kernel (default 3; 5 for log)")
    kernel.add_argument("--sigma", type=float, help="sigma of the gaussian and log kernels")
    kernel.add_argument(
        "--tol",
        type=float,
        help="relative rank tolerance: singular values <= TOL x the largest count as zero "
        "(default k x machine epsilon)",
    )
    model = parser.add_argument_group("models")
    model.add_argument(
        "--method",
        choices=("spatial", "depthwise", "best"),
        default="best",
        help="spatial: k x 1 then 1 x k (Jaderberg et al. 2014); depthwise: depthwise then "
        "pointwise; best: the cheaper per layer (default)",
    )
    model.add_argument(
        "--max-error",
        type=float,
        metavar="E",
        help="bound on each layer's relative output error "
        f"(default {_DEFAULT_MAX_ERROR} when --budget is not given)",
    )
    model.add_argument(
        "--budget",
        metavar="N|P%",
        help="bound on the converted model's parameters: a count, or a percentage of the "
        "original's, in (0, 100%%]",
    )
    model.add_argument(
        "--inputs",
        metavar="FILE",
        help="a batch (B, C, H, W) saved with torch.save(tensor) to measure errors on",
    )
    model.add_argument(
        "--input-shape",
        metavar="B,C,H,W",
        help="shape of a random normal batch to measure on instead (default: 4 images of "
        f"{_RANDOM_SIZE}x{_RANDOM_SIZE} with the first layer's channels)",
    )
    model.add_argument("--seed", type=int, default=0, help="seed of the random batch (default 0)")
    model.add_argument(
        "--output", metavar="FILE", help="save the converted model here with torch.save(model)"
    )
    model.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a torch.save(model) file, which runs code stored in it: only for files you "
        "trust (TorchScript files need no trust)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


def _kernel(args: argparse.Namespace) -> tuple[str, KernelFactorization]:
    target = args.target.strip()
    try:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", target):
            if target.lower() not in kernel_names():
                raise FactorError(
                    f"unknown kernel name {target!r}; choose from {', '.join(kernel_names())}, "
                    "type a kernel inline such as '1 2 1; 2 4 2; 1 2 1', or give a model file"
                )
            values, label = named_kernel(target, args.size, args.sigma), target.lower()
        else:
            if args.size is not None or args.sigma is not None:
                raise FactorError("--size and --sigma apply to named kernels only")
            values, label = parse_kernel(target), "inline kernel"
        return label, factorize_kernel(values, tol=args.tol)
    except (TypeError, ValueError) as exc:
        raise FactorError(str(exc)) from None


def _shape(text: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[,x\s]+", text.strip()) if p]
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise FactorError(f"--input-shape must be four positive ints B,C,H,W, got {text!r}")
    return tuple(int(p) for p in parts)


def _budget(text: str | None, model: nn.Module) -> int | None:
    """``--budget`` as a parameter count in ``(0, the model's parameters]``."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    if not match or (not match.group(2) and "." in match.group(1)):
        raise FactorError(
            f"--budget must be a parameter count or a percentage like 50%, got {text!r}"
        )
    total = sum(p.numel() for p in model.parameters())
    value = float(match.group(1))
    if match.group(2):
        if not 0 < value <= 100:
            raise FactorError(f"--budget must be a percentage in (0, 100%], got {text.strip()}")
        return max(1, int(total * value / 100))
    if not 0 < value <= total:
        raise FactorError(
            f"--budget must be a parameter count in [1, {total:,}] (the model's parameters), "
            f"got {int(value):,}"
        )
    return int(value)


def _batch(args: argparse.Namespace, model: nn.Module) -> tuple[torch.Tensor, str]:
    if args.inputs is not None and args.input_shape is not None:
        raise FactorError("give --inputs or --input-shape, not both")
    if args.inputs is not None:
        try:
            batch = torch.load(args.inputs, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FactorError(f"--inputs {args.inputs!r} could not be loaded: {exc}") from None
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise FactorError(f"--inputs must hold one (B, C, H, W) tensor, got {describe(batch)}")
        return batch, f"the batch in {args.inputs}"
    if args.input_shape is not None:
        shape = _shape(args.input_shape)
    else:
        layers = conv_layers(model)
        if not layers:
            raise FactorError("the model has no nn.Conv2d layer; there is nothing to factor")
        shape = (4, layers[0][1].in_channels, _RANDOM_SIZE, _RANDOM_SIZE)
    generator = torch.Generator().manual_seed(args.seed)
    param = next(iter(model.parameters()), None)
    dtype = torch.float32 if param is None else param.dtype
    batch = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return batch, f"a random normal batch of shape {shape} (seed {args.seed})"


def _model(args: argparse.Namespace) -> _ModelRun:
    if args.output is not None:
        check_destination(args.output, "--output")
    try:
        model, kind = load_model(args.target, trust_pickle=args.trust_pickle)
    except ModelFileError as exc:
        raise FactorError(str(exc)) from None
    if kind == "pickle":
        print_warning("factor", PICKLE_WARNING.format(path=args.target))
    budget = _budget(args.budget, model)
    max_error = args.max_error
    if max_error is None and budget is None:
        max_error = _DEFAULT_MAX_ERROR
    if isinstance(model, torch.jit.ScriptModule):
        return _scripted(args, model, budget, max_error)
    batch, source = _batch(args, model)
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=args.json) as bar:
        task = bar.add_task("measuring layers", total=None)

        def show(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"measured {name}")

        try:
            result = factorize_model(
                model,
                batch,
                method=args.method,
                max_error=max_error,
                max_params=budget,
                progress=show,
            )
        except (TypeError, ValueError) as exc:
            raise FactorError(str(exc)) from None
    if args.output is not None:
        with atomic_path(args.output) as temporary:
            torch.save(result.model, temporary)
    return _ModelRun(result.layers, max_error, budget, result, source)


def _scripted(
    args: argparse.Namespace, model: nn.Module, budget: int | None, max_error: float | None
) -> _ModelRun:
    if budget is not None or args.output is not None:
        raise FactorError(
            "a TorchScript model cannot be rewritten, so --budget and --output do not apply; "
            "its layers are analysed one by one (save the model with torch.save(model) to "
            "convert it)"
        )
    if args.inputs is not None or args.input_shape is not None:
        raise FactorError(
            "a TorchScript model's layers are measured on random inputs of their own; "
            "--inputs and --input-shape do not apply"
        )
    generator = torch.Generator().manual_seed(args.seed)
    assert max_error is not None
    return _ModelRun(factorize_layers(model, args.method, max_error, generator), max_error)


def _model_json(run: _ModelRun) -> dict[str, Any]:
    if run.result is None:
        return {
            "torchscript": True,
            "max_error": run.max_error,
            "layers": [layer.to_dict() for layer in run.layers],
        }
    return {
        "torchscript": False,
        "measured_on": run.source,
        "max_error": run.max_error,
        "max_params": run.budget,
        **run.result.to_dict(),
    }


def _number(value: float) -> str:
    return f"{value:.6g}"


def _print_kernel(label: str, result: KernelFactorization) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    k = result.kernel.shape[0]
    grid = Table(show_header=False, box=None, pad_edge=False)
    for _ in range(k):
        grid.add_column(justify="right")
    for row in result.kernel.tolist():
        grid.add_row(*(_number(v) for v in row))
    console.print(f"{label} ({k}x{k})")
    console.print(grid)
    console.print(result.summary())
    table = Table()
    for column in ("terms r", "singular value", "relative error", "MACs per output"):
        table.add_column(column, justify="right")
    table.add_row("full 2-D", "", "0", f"{k * k}")
    shown = max(result.rank, 1)
    for r, (s, e) in enumerate(
        zip(result.singular_values[:shown].tolist(), result.relative_errors[:shown], strict=True), 1
    ):
        table.add_row(str(r), f"{s:.4g}", f"{e:.4g}", f"{2 * k * r}")
    console.print(table)
    console.print(
        "r separable terms cost r x (k + k) MACs per output value (a k x 1 and a 1 x k pass "
        "each), against k x k for the 2-D kernel"
    )


def _ratio(before: int, after: int) -> str:
    return f"{after / before:.2f}x" if before else "-"


def _compact(n: int) -> str:
    """``4,640`` below 10,000, else 3 significant digits and K, M or G (``1.18M``)."""
    if n < 10_000:
        return f"{n:,}"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _change(before: int, after: int) -> str:
    return _compact(before) if before == after else f"{_compact(before)} → {_compact(after)}"


def _layer_table(layers: tuple[LayerReport, ...]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column, justify in (
        ("layer", "left"),
        ("conv", "left"),
        ("method", "left"),
        ("rank", "right"),
        ("params", "right"),
        ("MACs/image", "right"),
        ("error", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for layer in layers:
        converted = layer.method is not None
        table.add_row(
            layer.name,
            layer.shape,
            layer.method if converted else "kept",
            f"{layer.rank}/{layer.full_rank}" if converted else "",
            _change(layer.params_before, layer.params_after),
            _change(layer.macs_before, layer.macs_after) if layer.input_shape else "",
            f"{layer.output_error:.3g}" if converted else "0",
        )
    return table


def _print_notes(console: Any, layers: tuple[LayerReport, ...]) -> None:
    for layer in layers:
        if layer.note:
            console.print(f"layer {layer.name} kept: {layer.note}")


def _print_model(run: _ModelRun, args: argparse.Namespace) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    result = run.result
    if result is None:
        console.print(
            f"TorchScript model {args.target}: layers analysed one by one on random inputs "
            f"(max error {run.max_error:g}); the model itself is not rewritten"
        )
        console.print(_layer_table(run.layers))
        _print_notes(console, run.layers)
        return
    bound = []
    if run.max_error is not None:
        bound.append(f"max error {run.max_error:g} per layer")
    if run.budget is not None:
        bound.append(f"budget {run.budget:,} parameters")
    console.print(
        f"{args.target}: method {args.method}, {' and '.join(bound)}; measured on {run.source}"
    )
    console.print(_layer_table(run.layers))
    _print_notes(console, run.layers)
    console.print(
        f"model parameters: {result.params_before:,} → {result.params_after:,} "
        f"({_ratio(result.params_before, result.params_after)})"
    )
    console.print(
        f"model MACs per image: {result.macs_before:,} → {result.macs_after:,} "
        f"({_ratio(result.macs_before, result.macs_after)})"
    )
    console.print(f"model output relative error on the batch: {result.output_error:.3g}")
    if args.output is not None:
        console.print(f"converted model saved to {args.output}", markup=False, soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    try:
        if is_model_path(args.target):
            model_run = _model(args)
            if args.json:
                print_json(_model_json(model_run))
            else:
                _print_model(model_run, args)
            return 0
        label, kernel = _kernel(args)
    except (FactorError, OutputError) as exc:
        print_error("factor", str(exc))
        return 2
    if args.json:
        print_json({"kernel_name": label, **kernel.to_dict()})
    else:
        _print_kernel(label, kernel)
    return 0
