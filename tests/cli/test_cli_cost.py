from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from deformconv.cli import main
from deformconv.nn import DeformableConv2d, SeparableConv2d
from deformconv.tools import model_cost

# The commands of docs/family-and-arithmetic.md and what that page says they show.
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
        ("cost conv --input 12x0x3 --out 4", "--input must be HEIGHTxWIDTHxCHANNELS of positive"),
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
            r"kernel_size must be >= 1, got \(0, 0\)",
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


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        SeparableConv2d(8, 16, 3, stride=2),
        DeformableConv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path, model


def test_a_model_file_gets_a_table_of_its_layers(capsys, model_file):
    path, model = model_file
    code, out, err = _run(capsys, f"cost {path} --input 32x32x3 --trust-pickle")
    assert code == 0
    assert "use it only with files you trust" in err  # the --trust-pickle warning
    # The same rows as the Python function on the same (batch, C, H, W) input.
    expected = model_cost(model, (1, 3, 32, 32))
    lines = out.splitlines()
    assert lines[0] == f"{path}: 7 layers on a 32x32x3 (HxWxC) input"
    rows = [
        line.split() for line in lines if line.split()[:1] in ([r.name] for r in expected.layers)
    ]
    assert [row[:2] for row in rows] == [[r.name, r.type] for r in expected.layers]
    assert [row[3:5] for row in rows] == [[f"{r.params:,}", f"{r.macs:,}"] for r in expected.layers]
    assert [row[2] for row in rows] == [
        "32x32x8",
        "32x32x8",
        "15x15x16",
        "15x15x16",
        "1x1x16",
        "16",
        "10",
    ]
    # By hand, field += (kernel - 1) * jump and jump *= stride: 3; 3 + 2 = 5 (then jump 2);
    # 5 + 2 * 2 = 9 for the deformable layer's nominal grid; none after global pooling.
    assert [row[5] for row in rows] == ["3x3", "3x3", "5x5", "9x9*", "-", "-", "-"]
    total = next(line.split() for line in lines if line.split()[:1] == ["total"])
    assert total == [
        "total",
        f"{sum(p.numel() for p in model.parameters()):,}",
        f"{expected.macs:,}",
    ]
    assert "* nominal sampling grid" in out


def test_a_model_file_as_json(capsys, model_file):
    path, model = model_file
    code, out, _ = _run(capsys, f"cost {path} --input 32x32x3 --batch 2 --json --trust-pickle")
    assert code == 0
    document = json.loads(out)
    assert document["model"] == str(path)
    assert document["input"] == {"height": 32, "width": 32, "channels": 3, "batch": 2}
    expected = model_cost(model, (2, 3, 32, 32)).to_dict()
    assert {k: document[k] for k in expected} == expected


def test_a_torchscript_model_file_is_refused(capsys, tmp_path):
    scripted = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))), scripted)
    code, out, err = _run(capsys, f"cost {scripted} --input 8x8x3")
    assert code == 2 and not out
    assert "is a TorchScript model, whose layers cannot be hooked one by one" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("", "is a full pickle (torch.save(model)), and loading it runs code stored in it"),
        ("--trust-pickle --kernel 5 --no-bias", "--kernel, --no-bias describe a layer type"),
        ("--trust-pickle --bytes 2", "--bytes describes a layer type"),
        ("--trust-pickle --batch 0", "--batch must be >= 1, got 0"),
    ],
)
def test_model_file_errors(capsys, model_file, extra, message):
    path, _ = model_file
    code, out, err = _run(capsys, f"cost {path} --input 32x32x3 {extra}")
    assert code == 2 and not out
    assert message in " ".join(err.split())


def test_a_model_that_fails_on_the_input_says_so_in_one_line(capsys, model_file):
    path, _ = model_file
    code, _, err = _run(capsys, f"cost {path} --input 32x32x5 --trust-pickle")
    assert code == 2
    error = [line for line in err.splitlines() if "error:" in line]
    assert len(error) == 1
    assert "failed on an input of shape (1, 5, 32, 32) (from --input 32x32x5)" in error[0]
    assert "Traceback" not in err
