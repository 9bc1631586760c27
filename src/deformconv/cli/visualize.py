"""``deformconv visualize``: where a saved deformable model samples on any image file.

The model is one that ``deformconv demo`` saved (``p1_deformable.pt``, ``p2_deformable.pt``).
The image is converted to grey, padded to a square, resized to the model's input size and, when
it shows a dark digit on a light background, inverted. The destinations are checked before any
work; each figure is written to a temporary file beside its target (with the user's umask) and
renamed into place, so a failure leaves nothing half-written.

Exit codes: 0 success; 2 invalid arguments or inputs (missing or unreadable image or model,
a model without deformable layers, an output path that cannot be written); 3 a missing optional
dependency.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from deformconv.cli._common import missing_packages, print_error
from deformconv.cli._files import OutputError, atomic_path, check_destination

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MISSING_DEPENDENCY = 3


def _unit(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        row, col = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ROW,COL (two numbers separated by a comma), got {text!r}"
        ) from None
    return row, col


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "visualize",
        help="draw where a saved deformable model samples on an image file",
        description="Draw the regular grid beside the points a saved deformable model "
        "(from `deformconv demo`) samples for a few top-layer units, followed back through its "
        "stacked deformable layers, on any image file; optionally also its offset field.",
        epilog="example: deformconv visualize my_digit.png --model deformconv-out/demo/"
        "p1_deformable.pt --out my_digit_sampling.png",
    )
    parser.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...)")
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a model saved by `deformconv demo` (p1_deformable.pt, ...)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="sampling figure to write (default IMAGE-STEM_sampling.png here)",
    )
    parser.add_argument(
        "--field", metavar="FILE", help="also write the offset-field figure to FILE"
    )
    parser.add_argument(
        "--unit",
        type=_unit,
        action="append",
        metavar="ROW,COL",
        help="top-layer unit to trace (repeatable; default: one on the digit, "
        "one on the background)",
    )
    parser.add_argument(
        "--no-fit",
        action="store_true",
        help="use the whole image as it is (default: crop to the content and centre it at the "
        "training digits' size, 5/8 of the side)",
    )
    parser.add_argument(
        "--invert",
        choices=("auto", "yes", "no"),
        default="auto",
        help="invert to a bright digit on dark (default auto: when the border is bright)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    def fail(message: str, code: int = EXIT_USAGE) -> int:
        print_error("visualize", message)
        return code

    missing = missing_packages({"matplotlib": "matplotlib", "PIL": "pillow"})
    if missing:
        return fail(
            f"visualize needs {', '.join(missing)}: pip install 'deformconv[demo]'",
            EXIT_MISSING_DEPENDENCY,
        )

    import torch

    from deformconv.demo.data import DataError, load_image
    from deformconv.demo.figures import unit_positions
    from deformconv.demo.models import load_checkpoint
    from deformconv.tools.visualize import (
        SamplingExample,
        offset_field_figure,
        sampling_figure,
    )

    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_sampling.png")
    field = Path(args.field) if args.field else None
    try:
        check_destination(out, "--out")
        if field is not None:
            check_destination(field, "--field")
    except OutputError as exc:
        return fail(str(exc))
    model_path = Path(args.model)
    if not model_path.is_file():
        return fail(f"model {model_path} does not exist or is not a file")
    try:
        model = load_checkpoint(model_path)
    except ValueError:
        return fail(
            f"--model {model_path} is not a model saved by `deformconv demo`: give one of the "
            "deformable models it writes (p1_deformable.pt or p2_deformable.pt in its output "
            "folder, deformconv-out/demo/ by default)"
        )
    deformable = sum(hasattr(conv, "conv_offset") for conv in model.convs)
    if deformable == 0:
        return fail(f"model {model_path} has no deformable layers: nothing to visualise")
    try:
        image = load_image(
            args.image, model.config.image_size, args.invert, None if args.no_fit else 0.625
        )
    except DataError as exc:
        return fail(str(exc))

    stack = model.sampling_stacks(image[None])[0]
    grid = stack[-1].offset.shape[-1]
    if args.unit:
        bad = [u for u in args.unit if not (0 <= u[0] <= grid - 1 and 0 <= u[1] <= grid - 1)]
        if bad:
            return fail(
                f"--unit must be ROW,COL within the top layer's {grid}x{grid} grid "
                f"(0 to {grid - 1}), got {bad[0][0]:g},{bad[0][1]:g}"
            )
        positions = list(args.unit)
        names: tuple[str, ...] = tuple(f"unit {r:g},{c:g}" for r, c in positions)
    else:
        positions = unit_positions(image, grid)
        names = ("unit on the digit", "unit on the background")
    with torch.no_grad():
        probabilities = torch.softmax(model(image[None]), dim=1)[0]
    predicted = int(probabilities.argmax())
    title = f"predicted {predicted} ({100 * float(probabilities[predicted]):.0f}%)"
    example = SamplingExample(image[0], stack, positions, title, names)

    figures = [
        (
            out,
            sampling_figure(
                [example],
                depth=deformable,
                title=f"{Path(args.image).name}: points sampled through {deformable} "
                "deformable layers",
            ),
        )
    ]
    if field is not None:
        figures.append((field, offset_field_figure([example], title=Path(args.image).name)))
    try:
        # Every figure goes to its temporary file first: both are replaced, or neither.
        with contextlib.ExitStack() as pending:
            for path, figure in figures:
                figure.savefig(pending.enter_context(atomic_path(path)), dpi=100, format="png")
    except OutputError as exc:
        return fail(str(exc))
    console = Console(highlight=False)
    console.print(
        f"{Path(args.image).name}: predicted {predicted} "
        f"(probability {float(probabilities[predicted]):.2f})",
        markup=False,
    )
    for path, _ in figures:
        console.print(f"wrote {path}", markup=False, soft_wrap=True)
    return EXIT_OK
