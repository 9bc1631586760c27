from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from deformconv.cli import main

# The commands of the README (docs/family-and-arithmetic.md) and what the notes say they show.
NOTES = [
    (
        "cost conv separable --input 12x12x3 --out 256 --kernel 5",
        ["8x8x256", "1,228,800", "53,952", "75"],
    ),
    (
        "cost conv separable --input 12x12x16 --out 32 --kernel 3 --no-bias",
        ["4,608", "656"],
    ),
    (
        "cost depthwise --input 12x12x3 --kernel 5 --depth-multiplier 2",
        ["8x8x6", "depthwise output per input channel: 8x8x2"],
    ),
]


def _run(capsys, command: str) -> tuple[int, str, str]:
    code = main(command.split())
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("command", "expected"), NOTES)
def test_notes_examples(capsys, command, expected):
    code, out, _ = _run(capsys, command)
    assert code == 0
    for text in expected:
        assert text in out


def test_installed_command_prints_the_first_example():
    executable = shutil.which("deformconv")
    command = [executable] if executable else [sys.executable, "-m", "deformconv.cli"]
    result = subprocess.run(
        [*command, *NOTES[0][0].split()], capture_output=True, text=True, check=True, timeout=120
    )
    assert "1,228,800" in result.stdout and "53,952" in result.stdout


def test_json_output(capsys):
    code, out, _ = _run(capsys, "cost conv separable --input 12x12x3 --out 256 --kernel 5 --json")
    assert code == 0
    document = json.loads(out)
    assert document["input"] == {"height": 12, "width": 12, "channels": 3, "batch": 1}
    conv, separable = document["results"]
    assert (conv["type"], conv["macs"], conv["macs_per_output"]) == ("conv", 1228800, 75.0)
    assert separable["output_shape"] == {"channels": 256, "height": 8, "width": 8}
    assert [(s["name"], s["macs"]) for s in separable["steps"]] == [
        ("depthwise", 4800),
        ("pointwise", 49152),
    ]


def test_describe_shows_steps_and_summary(capsys):
    code, out, _ = _run(
        capsys, "cost deformable-v2 --input 16x16x8 --out 8 --padding 1 --offset-groups 2"
    )
    assert code == 0
    assert out.splitlines()[0] == "deformable convolution v2: 16x16x8 -> 16x16x8"
    for text in (
        "offset branch",
        "16x16x54",
        "bilinear sampling",
        "modulation",
        "total",
        "3x3 (nominal sampling grid)",
    ):
        assert text in out


def test_per_type_options_and_batch(capsys):
    code, out, _ = _run(
        capsys,
        "cost conv conv:groups=4 spatial:per-channel=yes --input 8x8x8 --out 8 --padding same --batch 2 --json",
    )
    assert code == 0
    conv, grouped, spatial = json.loads(out)["results"]
    assert conv["macs"] == 2 * 64 * 8 * 72 and grouped["macs"] == conv["macs"] // 4
    assert spatial["spec"]["per_channel"] and spatial["macs_per_output"] == 6


def test_options_apply_to_the_types_that_take_them(capsys):
    code, out, _ = _run(
        capsys, "cost conv separable --input 12x12x3 --out 9 --depth-multiplier 2 --groups 3 --json"
    )
    assert code == 0
    conv, separable = (result["spec"] for result in json.loads(out)["results"])
    assert (conv["groups"], conv["depth_multiplier"]) == (3, 1)
    assert (separable["groups"], separable["depth_multiplier"]) == (1, 2)


@pytest.mark.parametrize(("columns", "tables"), [("80", 2), ("200", 1)])
def test_many_types_are_split_into_tables_that_fit(capsys, monkeypatch, columns, tables):
    monkeypatch.setenv("COLUMNS", columns)
    types = "conv grouped dilated transposed depthwise separable spatial deformable-v1 deformable-separable"
    command = f"cost {types} --input 16x16x4 --out 8 --groups 2 --dilation 2 --padding 2"
    code, out, _ = _run(capsys, command)
    assert code == 0
    assert out.splitlines()[0] == "9 layer types on a 16x16x4 (HxWxC) input"
    assert out.count("MACs per output") == tables
    assert max(map(len, out.splitlines())) <= int(columns)
    code, document, _ = _run(capsys, command + " --json")
    for result in json.loads(document)["results"]:
        assert f"{result['macs']:,}" in out


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("cost conv --input 12x12 --out 4", "--input must be HEIGHTxWIDTHxCHANNELS"),
        ("cost conv --input 12x12x3", "type 'conv' needs the output channels: give --out N"),
        ("cost full --input 12x12x3 --out 4", "unknown type 'full'"),
        ("cost conv --input 2x2x3 --out 4 --kernel 5", "the kernel extent along height is 5"),
        (
            "cost conv --input 12x12x6 --out 4 --groups 4",
            "in_channels=6 must be divisible by groups=4",
        ),
        (
            "cost conv --input 12x12x6 --out 4 --padding -1",
            "--padding must be N or HxW with non-negative integers, got '-1'",
        ),
        (
            "cost conv --input 12x12x6 --out 4 --kernel 0",
            r"kernel_size\[0\] \(height\) must be >= 1, got 0",
        ),
        ("cost grouped --input 12x12x6 --out 4", "type 'grouped' needs groups > 1"),
        ("cost dilated --input 12x12x6 --out 4", "type 'dilated' needs dilation > 1"),
        ("cost conv:size=3 --input 12x12x6 --out 4", "options after ':' are key=value"),
        (
            "cost conv:groups=4 --input 12x12x3 --out 8",
            "conv:groups=4: in_channels=3 must be divisible by groups=4",
        ),
        (
            "cost transposed --input 12x12x3 --out 8 --padding same",
            "padding='same' applies to kinds conv",
        ),
        ("cost conv --input 12x12x3 --out 8 --batch 0", "--batch must be >= 1, got 0"),
        (
            "cost depthwise --input 12x12x3 --out 8",
            r"--out applies to none of the listed types \(depthwise\)",
        ),
        (
            "cost separable spatial --input 12x12x3 --out 8 --groups 3",
            "--groups applies to none of the listed types",
        ),
        (
            "cost spatial:per-channel=maybe --input 12x12x3 --out 3",
            "spatial:per-channel must be yes or no",
        ),
    ],
)
def test_errors_exit_2_with_a_message(capsys, command, message):
    code, out, err = _run(capsys, command)
    assert code == 2 and not out
    assert "deformconv cost: error:" in err
    assert re.search(message, " ".join(err.split()))
