"""``deformconv demo``: a regular CNN against its deformable twin on real handwritten digits.

Trains both protocols of :mod:`deformconv.demo.protocols`, prints their tables and writes the
figures, ``results.json`` and the deformable models to an output folder. Everything is written
to a hidden staging folder first and moved into place only when the run succeeds, so a failed or
interrupted run leaves nothing half-written. Under ``torchrun --nproc_per_node=N`` the processes
share the training (DistributedDataParallel) and rank 0 prints and writes.

Exit codes: 0 success; 2 invalid arguments or inputs (unknown dataset, missing MNIST folder,
output folder that cannot be written); 3 a missing optional dependency; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MISSING_DEPENDENCY = 3
EXIT_INTERRUPTED = 130

DEFAULT_OUT = "deformconv-out/demo"


class OutputFolder:
    """A folder filled atomically: files go to a hidden sibling first, then move in on commit.

    Example:
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = OutputFolder(Path(tmp) / "run")
        ...     _ = (out.staging / "a.txt").write_text("x")
        ...     _ = out.commit()
        ...     sorted(p.name for p in Path(tmp).iterdir())
        ['run']
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise OSError(f"{self.path} exists and is not a folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent)
        )

    def commit(self) -> list[Path]:
        """Move every staged file into the folder (replacing same-named files); return them."""
        self.path.mkdir(parents=True, exist_ok=True)
        moved = []
        for item in sorted(self.staging.iterdir()):
            target = self.path / item.name
            os.replace(item, target)
            moved.append(target)
        self.discard()
        return moved

    def discard(self) -> None:
        """Remove the staging folder and whatever it holds."""
        shutil.rmtree(self.staging, ignore_errors=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from deformconv.demo.data import DATASETS, Deformation
    from deformconv.demo.protocols import DemoConfig

    defaults = DemoConfig()
    deformation = Deformation()
    parser = subparsers.add_parser(
        "demo",
        help="regular vs deformable CNN on real handwritten digits, with sampling figures",
        description="Train a regular CNN and its deformable twin on real handwritten digits "
        "(scikit-learn's 1,797 8x8 digits, upsampled; nothing is downloaded) and on randomly "
        "scaled, rotated and shifted copies. Protocol 1 trains both on deformed digits; "
        "protocol 2 trains the regular CNN on plain digits, then only new offset branches on "
        "deformed digits (plus a control that fine-tunes all weights). Prints accuracy tables "
        "and writes figures, results.json and the deformable models to --out.",
        epilog="examples: deformconv demo --seed 1 | torchrun --nproc_per_node=2 --no-python "
        "deformconv demo | deformconv demo --data mnist --root ~/data --limit 6000",
    )
    parser.add_argument(
        "--data",
        choices=DATASETS,
        default=defaults.data,
        help="digits: scikit-learn's (default); mnist: a local copy under --root",
    )
    parser.add_argument(
        "--root",
        metavar="PATH",
        help="folder of a local MNIST copy in torchvision's layout "
        "(PATH/MNIST/raw/*-ubyte[.gz]); never downloaded",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help=f"seed of split, weights, batches and deformations (default {defaults.seed})",
    )
    parser.add_argument(
        "--protocol",
        choices=("1", "2", "both"),
        default="both",
        help="which protocol to run (default both)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=defaults.epochs,
        help=f"epochs of training from scratch (default {defaults.epochs})",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=_positive_int,
        default=defaults.finetune_epochs,
        help="protocol 2: epochs on deformed digits after plain training "
        f"(default {defaults.finetune_epochs})",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help=f"images per step over all processes (default {defaults.batch_size})",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help=f"peak AdamW learning rate (default {defaults.lr})",
    )
    parser.add_argument(
        "--offset-lr-mult",
        type=_non_negative_float,
        default=defaults.offset_lr_mult,
        help="learning-rate factor of the offset branches when all weights train "
        f"(default {defaults.offset_lr_mult})",
    )
    parser.add_argument(
        "--size",
        type=_positive_int,
        default=defaults.size,
        help=f"image side in pixels, a multiple of 4 (default {defaults.size})",
    )
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N", help="train on at most N images (default: all)"
    )
    parser.add_argument(
        "--deformable-layers",
        type=int,
        choices=(1, 2, 3),
        default=defaults.deformable,
        help=f"how many of the last conv blocks are deformable (default {defaults.deformable})",
    )
    parser.add_argument(
        "--modulated",
        action="store_true",
        help="deformable layers also learn a modulation mask (DCNv2)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=deformation.scale,
        help=f"range of the random scale (default {deformation.scale[0]} {deformation.scale[1]})",
    )
    parser.add_argument(
        "--rotation",
        type=_non_negative_float,
        default=deformation.rotation,
        help=f"largest rotation in degrees (default {deformation.rotation:g})",
    )
    parser.add_argument(
        "--translation",
        type=_non_negative_float,
        default=deformation.translation,
        help=f"largest shift in pixels (default {deformation.translation:g})",
    )
    parser.add_argument(
        "--elastic",
        type=_non_negative_float,
        default=deformation.elastic,
        help="amplitude in pixels of an elastic warp (default 0: none)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (default auto: CUDA if available)",
    )
    parser.add_argument(
        "--no-figures", action="store_true", help="skip the figures (and the matplotlib dependency)"
    )
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from deformconv.demo.data import Deformation
    from deformconv.demo.protocols import DemoConfig

    protocols = (1, 2) if args.protocol == "both" else (int(args.protocol),)
    return DemoConfig(
        data=args.data,
        root=args.root,
        size=args.size,
        limit=args.limit,
        deformation=Deformation(
            scale=(float(args.scale[0]), float(args.scale[1])),
            rotation=args.rotation,
            translation=args.translation,
            elastic=args.elastic,
        ),
        deformable=args.deformable_layers,
        modulated=args.modulated,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        offset_lr_mult=args.offset_lr_mult,
        protocols=protocols,
        seed=args.seed,
    )


def _missing(args: argparse.Namespace) -> list[str]:
    needed = []
    if args.data == "digits":
        needed.append(("sklearn", "scikit-learn"))
    if not args.no_figures:
        needed.append(("matplotlib", "matplotlib"))
    return [name for module, name in needed if importlib.util.find_spec(module) is None]


def _agree(ok: bool, world_size: int) -> bool:
    """Whether every process is ok (a collective; all processes must call it)."""
    if world_size == 1:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


_CAPTIONS = {
    1: "same initial weights and schedule; s/epoch: median training time of an epoch; "
    "epochs: trained (selected on deformed validation)",
    2: "regular CNN trained on plain digits; then on deformed digits either only new offset "
    "branches (deformable) or all weights of a copy (control) train",
}


def _tables(result) -> list:
    from rich import box
    from rich.table import Table

    tables = []
    for protocol in result.protocols:
        table = Table(
            title=f"{protocol.title} - test accuracy %",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            caption=_CAPTIONS[protocol.protocol],
            caption_justify="left",
        )
        table.add_column("model", no_wrap=True)
        table.add_column("plain", justify="right")
        table.add_column("deformed", justify="right")
        table.add_column("params", justify="right")
        table.add_column("trained", justify="right")
        table.add_column("s/epoch", justify="right")
        table.add_column("epochs", justify="right")
        for row in protocol.rows:
            table.add_row(
                row.name,
                _percent(row.plain_accuracy),
                _percent(row.deformed_accuracy),
                f"{row.parameters:,}",
                f"{row.trainable_parameters:,}",
                f"{row.seconds_per_epoch:.2f}",
                f"{len(row.training.history)} ({row.training.best_epoch})",
            )
        tables.append(table)
    return tables


def _environment(world_size: int, device: str) -> dict[str, Any]:
    import torch

    from deformconv.ops import active_kernel

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_process": torch.get_num_threads(),
        "world_size": world_size,
        "device": device,
        "deform_conv_kernel": active_kernel(torch.device(device).type),
    }


_FIGURE_DPI = 100


def _write_outputs(result, staging: Path, figures: bool, environment: dict[str, Any]) -> None:
    from deformconv.demo.models import save_checkpoint

    models = {}
    for protocol in result.protocols:
        model = protocol.models[protocol.deformable]
        models[protocol.protocol] = model
        save_checkpoint(
            model,
            staging / f"p{protocol.protocol}_deformable.pt",
            {"protocol": protocol.protocol, "seed": result.config.seed},
        )
    if figures:
        _save_figures(result, models, staging)
    payload = {**result.to_dict(), "environment": environment}
    (staging / "results.json").write_text(json.dumps(payload, indent=2) + "\n")


def _save_figures(result, models, staging: Path) -> None:
    from deformconv.demo import figures

    names = {1: "Protocol 1 deformable CNN", 2: "Protocol 2 deformable CNN (offsets only)"}
    measured = {}
    for protocol, model in models.items():
        sampling, field = figures.sampling_figures(model, result.test_deformed, 3, names[protocol])
        sampling.savefig(staging / f"sampling_p{protocol}.png", dpi=_FIGURE_DPI)
        field.savefig(staging / f"offsets_p{protocol}.png", dpi=_FIGURE_DPI)
        measured[names[protocol]] = figures.dilation_by_scale(model, result.test_deformed)
    first = next(iter(models.values()))
    layer_names = [
        f"layer {i + 1}" for i, conv in enumerate(first.convs) if hasattr(conv, "conv_offset")
    ]
    figures.dilation_figure(measured, layer_names).savefig(
        staging / "dilation_vs_scale.png", dpi=_FIGURE_DPI
    )
    runs = {}
    for protocol in result.protocols:
        runs[protocol.title] = {
            # The plain-trained CNN is selected on plain validation digits, the rest on deformed.
            row.name + (" (val: plain)" if protocol.protocol == 2 and k == 0 else ""): row.training
            for k, row in enumerate(protocol.rows)
        }
    figures.training_curves_figure(runs).savefig(staging / "training_curves.png", dpi=_FIGURE_DPI)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)

    def fail(message: str, code: int = EXIT_USAGE) -> int:
        err.print(f"[red]deformconv demo: error:[/red] {escape(message)}")
        return code

    try:
        config = _config(args)
    except ValueError as exc:
        return fail(str(exc))
    missing = _missing(args)
    if missing:
        return fail(
            f"the demo needs {', '.join(missing)}: pip install 'deformconv[demo]'",
            EXIT_MISSING_DEPENDENCY,
        )

    from deformconv.demo.data import DataError
    from deformconv.demo.protocols import load_data
    from deformconv.demo.train import init_distributed

    try:
        context = init_distributed(args.device)
    except ValueError as exc:
        return fail(str(exc))
    output: OutputFolder | None = None
    try:
        problem = None
        if context.is_main:
            try:
                output = OutputFolder(args.out)
            except OSError as exc:
                problem = f"cannot write the output folder {args.out}: {exc}"
        if not _agree(problem is None, context.world_size):
            return fail(problem or "the output folder cannot be written (see rank 0)")
        try:
            splits = load_data(config)
        except (DataError, ValueError) as exc:
            problem = str(exc)
        if not _agree(problem is None, context.world_size):
            return fail(problem or "the data could not be loaded (see rank 0)")
        result = _train(config, splits, context, err)
        if context.is_main:
            assert output is not None
            environment = _environment(context.world_size, str(context.device))
            _write_outputs(result, output.staging, not args.no_figures, environment)
            files = output.commit()
            output = None
            _report(result, files, Path(args.out), environment)
        return EXIT_OK
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    finally:
        if output is not None:
            output.discard()
        if context.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config, splits, context, err):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from deformconv.demo.protocols import run_demo

    columns = (
        TextColumn("{task.description:<34}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[val]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, disable=not context.is_main) as bar:
        tasks: dict[str, Any] = {}

        def progress(update) -> None:
            if update.task not in tasks:
                tasks[update.task] = bar.add_task(
                    update.task, total=update.total_steps, epoch="-", loss="-", val="-"
                )
            fields = {"epoch": f"{update.epoch}/{update.epochs}", "loss": f"{update.loss:.3f}"}
            if update.val_accuracy is not None:
                fields["val"] = f"{100 * update.val_accuracy:.1f}%"
            bar.update(tasks[update.task], completed=update.step, **fields)

        return run_demo(config, context.device, progress, context.world_size, splits)


def _report(result, files: list[Path], out: Path, environment: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    config, sizes = result.config, result.sizes
    warp = config.deformation
    described = (
        f"{config.data}: {sizes['train']} train / {sizes['val']} validation / {sizes['test']} "
        f"test images, {config.size}x{config.size}; deformed = random scale "
        f"{warp.scale[0]:g}-{warp.scale[1]:g}, rotation +-{warp.rotation:g} deg, shift "
        f"+-{warp.translation:g} px"
    )
    if warp.elastic:
        described += f", elastic {warp.elastic:g} px"
    console.print(described + f"; seed {config.seed}", markup=False)
    for table in _tables(result):
        console.print(table)
    console.print(
        f"total {result.seconds:.0f} s on {environment['world_size']} process(es), "
        f"{environment['threads_per_process']} thread(s) each, device {environment['device']}; "
        "models selected on the validation split only",
        markup=False,
    )
    console.print(
        f"wrote {len(files)} files to {out}: " + ", ".join(f.name for f in files), markup=False
    )
