"""What ``deformconv demo`` shows and writes: progress, tables, figures, models and
``results.json`` (which lists the run's files, see :mod:`deformconv.cli._demo_output`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from deformconv.cli._demo_output import MANIFEST

__all__ = [
    "environment",
    "occluder_shares",
    "progress_display",
    "report_classify",
    "report_restore",
    "stdout_console",
    "write_classify",
    "write_restore",
]

# Width of tables and lines written to a file or pipe, where rich would otherwise assume 80
# columns and fold them.
_LOG_WIDTH = 160
_FIGURE_DPI = 100
_CAPTIONS = {
    1: "same initial weights and schedule; s/epoch: median training time of an epoch; "
    "epochs: trained (selected on deformed validation)",
    2: "regular CNN trained on plain digits; then on deformed digits either only new offset "
    "branches (deformable) or all weights of a copy (control) train",
    3: "same initial weights and schedule as each other; trained on freshly occluded digits "
    "every epoch, selected on occluded validation",
}


def stdout_console() -> Console:
    """A console for results: the terminal's width, or :data:`_LOG_WIDTH` in a file or pipe."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = _LOG_WIDTH
    return console


def _validation(update: Any) -> str:
    if update.val_accuracy is not None:
        return f"{100 * update.val_accuracy:.1f}%"
    if update.val_error is not None:
        return f"error {update.val_error:.4f}"
    return "-"


@contextlib.contextmanager
def progress_display(err: Console, enabled: bool) -> Iterator[Any]:
    """A progress callback for the training loops: live bars on a terminal; in a log file or
    pipe one line per finished epoch, which stays readable whatever the width."""
    if not enabled:
        yield None
        return
    if not err.is_terminal:
        started: dict[str, float] = {}

        def log(update: Any) -> None:
            started.setdefault(update.task, time.perf_counter())
            if update.val_accuracy is None and update.val_error is None:
                return
            seconds = time.perf_counter() - started[update.task]
            err.print(
                f"{update.task}: epoch {update.epoch}/{update.epochs}, loss {update.loss:.4f}, "
                f"validation {_validation(update)}, {seconds:.0f} s",
                markup=False,
                soft_wrap=True,
            )

        yield log
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<34}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[val]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as bar:
        tasks: dict[str, Any] = {}

        def show(update: Any) -> None:
            if update.task not in tasks:
                tasks[update.task] = bar.add_task(
                    update.task, total=update.total_steps, epoch="-", loss="-", val="-"
                )
            fields = {"epoch": f"{update.epoch}/{update.epochs}", "loss": f"{update.loss:.3f}"}
            if update.val_accuracy is not None or update.val_error is not None:
                fields["val"] = _validation(update)
            bar.update(tasks[update.task], completed=update.step, **fields)

        yield show


def environment(world_size: int, device: str) -> dict[str, Any]:
    """Where the run ran, for ``results.json`` and the closing line."""
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


def _manifest(staging: Path, payload: dict[str, Any]) -> list[str]:
    """Write ``results.json`` last, listing every file of the run; return the names."""
    names = sorted({p.name for p in staging.iterdir()} | {MANIFEST})
    (staging / MANIFEST).write_text(json.dumps({**payload, "files": names}, indent=2) + "\n")
    return names


def occluder_shares(result) -> dict[int, dict[str, float]]:
    """For the deformable CNN of protocols 1 and 3: the mean share of the digit unit's sampling
    points that fall on the occluder, on the occluded test digits and on the same digits
    unoccluded (see :mod:`deformconv.demo.occluded_sampling`)."""
    from deformconv.demo.occluded_sampling import occluder_sampling_share

    shares = {}
    for protocol in result.protocols:
        if protocol.protocol in (1, 3):
            model = protocol.models[protocol.deformable]
            plain, occluded = occluder_sampling_share(
                model, result.test_plain, result.test_occluded
            )
            shares[protocol.protocol] = {
                "plain": float(plain.mean()),
                "occluded": float(occluded.mean()),
            }
    return shares


def write_classify(
    result, shares: dict[int, dict[str, float]], staging: Path, figures: bool, env: dict[str, Any]
) -> list[str]:
    """Models, figures and ``results.json`` of the classification protocols."""
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
        _classify_figures(result, models, staging)
    payload = result.to_dict()
    for entry in payload["protocols"]:
        if entry["protocol"] in shares:
            entry["occluder_share"] = shares[entry["protocol"]]
    return _manifest(staging, {"task": "classify", **payload, "environment": env})


def _classify_figures(result, models, staging: Path) -> None:
    from deformconv.demo import figures
    from deformconv.demo.occluded_sampling import occlusion_sampling_figure

    names = {
        1: "Protocol 1 deformable CNN",
        2: "Protocol 2 deformable CNN (offsets only)",
        3: "Protocol 3 deformable CNN (trained on occluded digits)",
    }
    measured = {}
    for protocol, model in models.items():
        if protocol == 3:
            indices = figures.example_indices(result.test_occluded, 3)
            occlusion_sampling_figure(
                model, result.test_plain, result.test_occluded, indices, names[3]
            ).savefig(staging / "sampling_occluded_p3.png", dpi=_FIGURE_DPI)
            continue
        sampling, field = figures.sampling_figures(model, result.test_deformed, 3, names[protocol])
        sampling.savefig(staging / f"sampling_p{protocol}.png", dpi=_FIGURE_DPI)
        field.savefig(staging / f"offsets_p{protocol}.png", dpi=_FIGURE_DPI)
        measured[names[protocol]] = figures.dilation_by_scale(model, result.test_deformed)
    if measured:
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
            # The plain-trained CNN is selected on plain validation digits, the rest on
            # deformed or occluded ones.
            row.name + (" (val: plain)" if protocol.protocol == 2 and k == 0 else ""): row.training
            for k, row in enumerate(protocol.rows)
        }
    figures.training_curves_figure(runs).savefig(staging / "training_curves.png", dpi=_FIGURE_DPI)


def write_restore(result, staging: Path, figures: bool, env: dict[str, Any]) -> list[str]:
    """Models, figure and ``results.json`` of the restoration task."""
    import torch

    from deformconv.demo.encoder_decoder import save_encoder_decoder

    files = {
        "encoder-decoder": "restore_regular.pt",
        "deformable encoder-decoder": "restore_deformable.pt",
    }
    for name, model in result.models.items():
        save_encoder_decoder(model, staging / files[name], {"seed": result.config.seed})
    if figures:
        from deformconv.demo.figures import restoration_figure

        inputs = result.test_input.images[:6]
        with torch.no_grad():
            outputs = {name: model.eval()(inputs).cpu() for name, model in result.models.items()}
        warp = result.config.occlusion
        restoration_figure(
            inputs,
            outputs,
            result.test_target.images[:6],
            f"Restoring held-out digits from a {warp.shape} over {100 * warp.fraction:g}% of "
            "each digit\ninput, the encoder-decoders' outputs and the clean digit (target)",
        ).savefig(staging / "restore.png", dpi=_FIGURE_DPI)
    return _manifest(staging, {**result.to_dict(), "environment": env})


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _classify_tables(result) -> list:
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
        for name in ("plain", "deformed", "occluded", "params", "trained", "s/epoch", "epochs"):
            table.add_column(name, justify="right", no_wrap=True)
        for row in protocol.rows:
            table.add_row(
                row.name,
                _percent(row.plain_accuracy),
                _percent(row.deformed_accuracy),
                _percent(row.occluded_accuracy),
                f"{row.parameters:,}",
                f"{row.trainable_parameters:,}",
                f"{row.seconds_per_epoch:.2f}",
                f"{len(row.training.history)} ({row.training.best_epoch})",
            )
        tables.append(table)
    return tables


def _data_line(config, sizes: dict[str, int]) -> str:
    return (
        f"{config.data}: {sizes['train']} train / {sizes['val']} validation / {sizes['test']} "
        f"test images, {config.size}x{config.size}"
    )


def _occluder_text(occlusion, measured: float) -> str:
    return (
        f"a {'grey' if occlusion.fill else 'black'} {occlusion.shape} over "
        f"{100 * occlusion.fraction:g}% of each digit's pixels ({100 * measured:.1f}% on the "
        "test digits)"
    )


def _closing(console: Console, files: list[str], out: Path, env: dict[str, Any], seconds: float):
    console.print(
        f"total {seconds:.0f} s on {env['world_size']} process(es), "
        f"{env['threads_per_process']} thread(s) each, device {env['device']}; "
        "models selected on the validation split only",
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"wrote {len(files)} files to {out}: " + ", ".join(files), markup=False, soft_wrap=True
    )


def report_classify(
    console: Console,
    result,
    shares: dict[int, dict[str, float]],
    files: list[str],
    out: Path,
    env: dict[str, Any],
) -> None:
    """The classification run's description, tables and closing lines."""
    config = result.config
    warp = config.deformation
    described = (
        f"{_data_line(config, result.sizes)}; deformed = random scale "
        f"{warp.scale[0]:g}-{warp.scale[1]:g}, rotation +-{warp.rotation:g} deg, shift "
        f"+-{warp.translation:g} px"
    )
    if warp.elastic:
        described += f", elastic {warp.elastic:g} px"
    coverage = result.to_dict()["test_occluded_coverage"]
    described += f"; occluded = {_occluder_text(config.occlusion, coverage)}; seed {config.seed}"
    console.print(described, markup=False, soft_wrap=True)
    for table in _classify_tables(result):
        console.print(table)
    for protocol, share in shares.items():
        console.print(
            f"protocol {protocol} deformable CNN: {100 * share['occluded']:.1f}% of the sampling "
            "points of the unit on the digit fall on the occluder in the occluded test digits; "
            f"on the same digits unoccluded, {100 * share['plain']:.1f}% fall where it would be",
            markup=False,
            soft_wrap=True,
        )
    _closing(console, files, out, env, result.seconds)


def report_restore(
    console: Console, result, files: list[str], out: Path, env: dict[str, Any]
) -> None:
    """The restoration run's description, table and closing lines."""
    from rich import box
    from rich.table import Table

    from deformconv.demo.occlusion import coverage

    config = result.config
    measured = float(coverage(result.test_target.images, result.test_input.occluders).mean())
    console.print(
        f"{_data_line(config, result.sizes)}; input = the digit under "
        f"{_occluder_text(config.occlusion, measured)}, target = the clean digit; "
        f"seed {config.seed}",
        markup=False,
        soft_wrap=True,
    )
    table = Table(
        title="Restoring occluded digits - test error (mean squared, per pixel)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        caption="all: every pixel; occluded: the pixels under the occluder; same initial "
        "weights and schedule; epochs: trained (selected on occluded validation)",
        caption_justify="left",
    )
    table.add_column("model", no_wrap=True)
    for name in ("all", "occluded", "params", "s/epoch", "epochs"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in result.rows:
        trained = bool(row.history)
        table.add_row(
            row.name,
            f"{row.error:.4f}",
            f"{row.occluded_error:.4f}",
            f"{row.parameters:,}",
            f"{row.seconds_per_epoch:.2f}" if trained else "-",
            f"{len(row.history)} ({row.best_epoch})" if trained else "-",
        )
    console.print(table)
    _closing(console, files, out, env, result.seconds)
