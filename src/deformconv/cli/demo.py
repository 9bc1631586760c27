"""``deformconv demo``: a regular CNN against its deformable twin on real handwritten digits, and
an encoder-decoder that restores occluded digits.

``--task classify`` (the default) trains the three protocols of :mod:`deformconv.demo.protocols`
(deformed digits; plain digits then adapted; occluded digits), prints their tables and writes
the figures, ``results.json`` and the deformable models. ``--task restore`` trains the
encoder-decoders of :mod:`deformconv.demo.restore`. Each run replaces ``--out`` as a whole (see
:mod:`deformconv.cli._demo_output`): a failed or interrupted run leaves nothing, and a folder
that a demo run did not write is refused. Under ``torchrun --nproc_per_node=N`` the processes
share the classifiers' training (DistributedDataParallel) and rank 0 prints and writes.

Exit codes: 0 success; 2 invalid arguments or inputs (an unknown task or dataset, an occlusion
fraction outside [0, 1), a missing MNIST folder, an output folder that cannot be written or holds
other files), with a one-line message; 3 a missing optional dependency; 130 interrupted (Ctrl-C);
143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MISSING_DEPENDENCY = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

TASKS = ("classify", "restore")
DEFAULT_OUT = {"classify": "deformconv-out/demo", "restore": "deformconv-out/demo-restore"}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _grey(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a grey value in [0, 1], got {text!r}")
    return value


def _protocols(text: str) -> tuple[int, ...]:
    from deformconv.demo.protocols import PROTOCOLS

    if text.strip() == "all":
        return PROTOCOLS
    try:
        chosen = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        chosen = ()
    if not chosen or any(p not in PROTOCOLS for p in chosen):
        raise argparse.ArgumentTypeError(
            f"expected 'all' or a comma-separated list of {', '.join(map(str, PROTOCOLS))}, "
            f"got {text!r}"
        )
    return chosen


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Argument errors in one line (argparse would print the whole usage first)."""

    def error(message: str) -> NoReturn:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]


def register(subparsers: argparse._SubParsersAction) -> None:
    from deformconv.demo.data import DATASETS, Deformation
    from deformconv.demo.occlusion import OCCLUDERS, Occlusion
    from deformconv.demo.protocols import DemoConfig

    defaults = DemoConfig()
    deformation = Deformation()
    occlusion = Occlusion()
    parser = subparsers.add_parser(
        "demo",
        help="regular vs deformable CNN on real handwritten digits (deformed, occluded), "
        "and an encoder-decoder that restores occluded digits",
        description="Train a regular CNN and its deformable twin on real handwritten digits "
        "(scikit-learn's 1,797 8x8 digits, upsampled; nothing is downloaded). Protocol 1 trains "
        "both on randomly scaled, rotated and shifted digits; protocol 2 trains the regular CNN "
        "on plain digits, then only new offset branches on deformed digits (plus a control that "
        "fine-tunes all weights); protocol 3 trains both on occluded digits. Every model is "
        "tested on plain, deformed and occluded digits. --task restore trains encoder-decoders "
        "(strided convolutions down, transposed convolutions up) to restore occluded digits. "
        "Prints tables and writes figures, results.json and models to --out, replacing the "
        "folder of an earlier run.",
        epilog="examples: deformconv demo --seed 1 | deformconv demo --occlusion 0.4 --occluder "
        "blob | deformconv demo --task restore | torchrun --nproc_per_node=2 --no-python "
        "deformconv demo | deformconv demo --data mnist --root ~/data --limit 6000",
    )
    _one_line_errors(parser)
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="classify",
        help="classify: the three protocols (default); restore: encoder-decoders that restore "
        "occluded digits",
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
        "--out",
        metavar="DIR",
        help=f"output folder, new, empty or from an earlier run, which it replaces (default "
        f"{DEFAULT_OUT['classify']}, or {DEFAULT_OUT['restore']} with --task restore)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help=f"seed of split, weights, batches and deformations (default {defaults.seed})",
    )
    parser.add_argument(
        "--protocol",
        type=_protocols,
        default="all",
        metavar="LIST",
        help="which protocols to run: all (default) or a list such as 1,3",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=defaults.epochs,
        help=f"epochs of training from scratch, for every task (default {defaults.epochs})",
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
        help=f"image side in pixels, a multiple of 4 for classify, any side >= 4 for restore "
        f"(default {defaults.size})",
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
        "--occlusion",
        type=_fraction,
        default=occlusion.fraction,
        metavar="FRACTION",
        help="fraction of each digit's pixels the occluder covers, in [0, 1) "
        f"(default {occlusion.fraction:g})",
    )
    parser.add_argument(
        "--occluder",
        choices=OCCLUDERS,
        default=occlusion.shape,
        help=f"shape of the occluder (default {occlusion.shape})",
    )
    parser.add_argument(
        "--occluder-fill",
        type=_grey,
        default=occlusion.fill,
        metavar="GREY",
        help=f"grey value of the occluder, 0 erases (default {occlusion.fill:g})",
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


def _occlusion(args: argparse.Namespace):
    from deformconv.demo.occlusion import Occlusion

    return Occlusion(fraction=args.occlusion, shape=args.occluder, fill=args.occluder_fill)


def _classify_config(args: argparse.Namespace):
    from deformconv.demo.data import Deformation
    from deformconv.demo.protocols import DemoConfig

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
        occlusion=_occlusion(args),
        deformable=args.deformable_layers,
        modulated=args.modulated,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        offset_lr_mult=args.offset_lr_mult,
        protocols=args.protocol,
        seed=args.seed,
    )


def _restore_config(args: argparse.Namespace):
    from deformconv.demo.restore import RestoreConfig

    return RestoreConfig(
        data=args.data,
        root=args.root,
        size=args.size,
        limit=args.limit,
        occlusion=_occlusion(args),
        modulated=args.modulated,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )


def _missing(args: argparse.Namespace) -> list[str]:
    from deformconv.cli._common import missing_packages

    needed: dict[str, str] = {}
    if args.data == "digits":
        needed["sklearn"] = "scikit-learn"
    if not args.no_figures:
        needed["matplotlib"] = "matplotlib"
    return missing_packages(needed)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    from deformconv.cli._common import print_error

    print_error("demo", message)
    return code


def run(args: argparse.Namespace) -> int:
    try:
        config = _classify_config(args) if args.task == "classify" else _restore_config(args)
    except ValueError as exc:
        return _fail(str(exc))
    missing = _missing(args)
    if missing:
        return _fail(
            f"the demo needs {', '.join(missing)}: pip install 'deformconv[demo]'",
            EXIT_MISSING_DEPENDENCY,
        )

    from deformconv.cli._demo_output import OutputFolder, Terminated, sigterm_raises
    from deformconv.cli._files import OutputError
    from deformconv.demo.train import every_process_ok, init_distributed

    try:
        context = init_distributed(args.device)
    except ValueError as exc:
        return _fail(str(exc))
    out = Path(args.out or DEFAULT_OUT[args.task])
    output: OutputFolder | None = None
    try:
        with sigterm_raises():
            if args.task == "restore" and context.world_size > 1:
                return _fail("--task restore trains in one process: start it without torchrun")
            problem = None
            if context.is_main:
                try:
                    output = OutputFolder(out)
                except OutputError as exc:
                    problem = str(exc)
            if not every_process_ok(problem is None, context):
                return _fail(problem or "the output folder cannot be written (see rank 0)")
            task = _classify if args.task == "classify" else _restore
            return task(config, context, output, out, not args.no_figures)
    except KeyboardInterrupt:
        return _fail(_stopped("interrupted", output, out), EXIT_INTERRUPTED)
    except Terminated:
        return _fail(_stopped("terminated", output, out), EXIT_TERMINATED)
    except OutputError as exc:
        return _fail(str(exc))
    finally:
        if output is not None:
            output.discard()
        if context.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _stopped(how: str, output, out: Path) -> str:
    if output is not None and output.committed:
        return f"{how} after the results were written to {out}"
    return f"{how}; nothing was written"


def _publish(output, out: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """Stage the run's files with ``write``, then put the folder in place."""
    from deformconv.cli._files import OutputError, _reason

    staging = output.stage()
    try:
        files = write(staging)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        reason = _reason(exc).replace(str(staging), str(out))
        raise OutputError(f"cannot write the output folder {out}: {reason}") from None
    output.commit()
    return files


def _classify(config, context, output, out: Path, figures: bool) -> int:
    from rich.console import Console

    from deformconv.cli import _demo_report as report
    from deformconv.demo.data import DataError
    from deformconv.demo.protocols import load_data, run_demo
    from deformconv.demo.train import every_process_ok

    problem = None
    try:
        splits = load_data(config)
    except (DataError, ValueError) as exc:
        problem = str(exc)
    if not every_process_ok(problem is None, context):
        return _fail(problem or "the data could not be loaded (see rank 0)")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with report.progress_display(err, context.is_main) as progress:
        result = run_demo(config, context.device, progress, context.world_size, splits)
    if context.is_main:
        env = report.environment(context.world_size, str(context.device))
        shares = report.occluder_shares(result)
        files = _publish(
            output,
            out,
            lambda staging: report.write_classify(result, shares, staging, figures, env),
        )
        report.report_classify(report.stdout_console(), result, shares, files, out, env)
    return EXIT_OK


def _restore(config, context, output, out: Path, figures: bool) -> int:
    from rich.console import Console

    from deformconv.cli import _demo_report as report
    from deformconv.demo.data import DataError
    from deformconv.demo.restore import run_restore

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with report.progress_display(err, True) as progress:
            result = run_restore(config, context.device, progress)
    except DataError as exc:
        return _fail(str(exc))
    env = report.environment(1, str(context.device))
    files = _publish(
        output, out, lambda staging: report.write_restore(result, staging, figures, env)
    )
    report.report_restore(report.stdout_console(), result, files, out, env)
    return EXIT_OK
