"""``deformconv demo``: tables, files, the output folder written as a whole (with the user's
umask, never mixing runs, cleaned up on SIGTERM), one-line argument errors, the restoration task,
and ``deformconv visualize`` on a model the demo saved."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deformconv.cli import main
from deformconv.cli._demo_output import OutputFolder, Terminated, _signals_deferred, sigterm_raises
from deformconv.cli._files import OutputError

TINY = ["--epochs", "1", "--finetune-epochs", "1", "--limit", "32", "--size", "16"]
FIGURES = {
    "sampling_p1.png",
    "sampling_p2.png",
    "sampling_occluded_p3.png",
    "offsets_p1.png",
    "offsets_p2.png",
    "dilation_vs_scale.png",
    "training_curves.png",
}
MODELS = {"p1_deformable.pt", "p2_deformable.pt", "p3_deformable.pt"}
UMASK = 0o027


def _demo(*args: str) -> tuple[int, str, str]:
    """``deformconv demo ARGS`` in this process, with stdout and stderr captured as a log."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["demo", *args])
        except SystemExit as exc:
            code = int(exc.code)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    previous = os.umask(UMASK)
    try:
        code, printed, logged = _demo(*TINY, "--seed", "3", "--out", str(out))
    finally:
        os.umask(previous)
    return code, out, printed, logged


def test_demo_writes_tables_figures_models_and_json(demo_run):
    code, out, printed, _ = demo_run
    assert code == 0
    assert "Protocol 1: both trained on deformed digits" in printed
    assert "Protocol 2" in printed and "control: fine-tuned" in printed
    assert "Protocol 3: both trained on occluded digits" in printed
    assert "occluded = a grey rectangle over 30% of each digit's pixels" in printed
    assert f"to {out}" in printed
    names = {p.name for p in out.iterdir()}
    assert names == FIGURES | MODELS | {"results.json"}
    for name in FIGURES:
        with Image.open(out / name) as image:
            assert min(image.size) >= 300
    data = json.loads((out / "results.json").read_text())
    assert data["task"] == "classify" and sorted(data["files"]) == sorted(names)
    assert data["config"]["seed"] == 3 and data["config"]["limit"] == 32
    assert data["config"]["occlusion"]["fraction"] == 0.3
    assert data["environment"]["world_size"] == 1
    assert data["environment"]["deform_conv_kernel"] in ("numba", "portable")
    assert [len(p["rows"]) for p in data["protocols"]] == [2, 3, 2]
    # Nothing but the output folder appears beside it: no hidden staging folder is left.
    assert [p.name for p in out.parent.iterdir()] == ["run"]


def test_files_take_the_users_umask(demo_run):
    _, out, _, _ = demo_run
    assert out.stat().st_mode & 0o777 == 0o777 & ~UMASK
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK, path.name


def test_a_log_keeps_whole_lines(demo_run):
    """In a file (not a terminal) tables are not folded at 80 columns and progress comes as
    one complete line per epoch."""
    _, _, printed, logged = demo_run
    header = re.compile(
        r"model\s+plain\s+deformed\s+occluded\s+params\s+trained\s+s/epoch\s+epochs"
    )
    assert len([line for line in printed.splitlines() if header.search(line)]) == 3
    assert any(
        re.search(r"control: fine-tuned(\s+[\d.,]+){6}\s+\d+ \(\d+\)", line)
        for line in printed.splitlines()
    )
    epoch = re.compile(
        r"^(P[123] [\w :()-]+): epoch 1/1, loss \d+\.\d{4}, validation \d+\.\d%, \d+ s$"
    )
    tasks = [epoch.match(line).group(1) for line in logged.splitlines() if epoch.match(line)]
    assert tasks == [
        "P1 regular CNN",
        "P1 deformable CNN",
        "P2 regular CNN (plain)",
        "P2 deformable: offsets only",
        "P2 control: regular fine-tuned",
        "P3 regular CNN",
        "P3 deformable CNN",
    ]
    assert "\x1b" not in logged


def test_a_rerun_replaces_the_folder_as_a_whole(tmp_path):
    out = tmp_path / "run"
    assert _demo(*TINY, "--protocol", "1", "--no-figures", "--out", str(out))[0] == 0
    assert {p.name for p in out.iterdir()} == {"p1_deformable.pt", "results.json"}
    code, printed, _ = _demo(*TINY, "--protocol", "3", "--no-figures", "--out", str(out))
    assert code == 0 and "Protocol 3" in printed and "Protocol 1" not in printed
    # Nothing of the first run is left next to the second one's files.
    assert {p.name for p in out.iterdir()} == {"p3_deformable.pt", "results.json"}
    assert json.loads((out / "results.json").read_text())["config"]["protocols"] == [3]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_folder_with_other_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, printed, err = _demo(*TINY, "--out", str(out))
    assert code == 2 and printed == ""
    assert err.count("\n") == 1
    assert f"--out {out} holds files that deformconv demo did not write" in err
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt"]


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
def test_an_unwritable_folder_is_named_as_given():
    code, _, err = _demo(*TINY, "--out", "/proc/x")
    assert code == 2 and err.count("\n") == 1
    assert "cannot write the output folder /proc/x: cannot create a folder in /proc" in err
    assert ".partial" not in err and ".probe" not in err


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = _demo(*TINY, "--out", str(blocker / "sub"))
    assert code == 2
    assert f"cannot write the output folder {blocker / 'sub'}: {blocker} is a file" in err
    code, _, err = _demo(*TINY, "--out", str(blocker))
    assert code == 2
    assert "exists and is not a folder" in err
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def _interrupt_while_writing(monkeypatch, raise_it) -> None:
    import deformconv.cli._demo_report as report

    real = report.write_classify

    def broken(result, shares, staging, figures, env):
        (staging / "half.txt").write_text("a file of the run")
        raise_it()
        return real(result, shares, staging, figures, env)

    monkeypatch.setattr(report, "write_classify", broken)


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupt():
        raise KeyboardInterrupt

    _interrupt_while_writing(monkeypatch, interrupt)
    out = tmp_path / "a" / "b" / "run"
    code, printed, err = _demo(*TINY, "--protocol", "1", "--no-figures", "--out", str(out))
    assert code == 130
    assert "interrupted; nothing was written" in err
    assert "Protocol 1" not in printed
    # The staging folder and the parent folders the run created are gone.
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_names_the_users_folder(tmp_path, monkeypatch):
    def full():
        raise OSError(28, "No space left on device")

    _interrupt_while_writing(monkeypatch, full)
    out = tmp_path / "run"
    code, _, err = _demo(*TINY, "--protocol", "1", "--no-figures", "--out", str(out))
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and errors == [
        f"deformconv demo: error: cannot write the output folder {out}: No space left on device"
    ]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    _interrupt_while_writing(monkeypatch, lambda: signal.raise_signal(signal.SIGTERM))
    code, printed, err = _demo(
        *TINY, "--protocol", "1", "--no-figures", "--out", str(tmp_path / "run")
    )
    assert code == 143
    assert "terminated; nothing was written" in err and printed == ""
    assert list(tmp_path.iterdir()) == []
    # The handler is put back: SIGTERM is not turned into an exception after the run.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
def test_sigterm_during_training_in_a_real_process(tmp_path):
    out = tmp_path / "run"
    script = "import sys; from deformconv.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", script, "demo", *TINY[4:], "--epochs", "50"]
    command += ["--no-figures", "--out", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        # The log prints a line per epoch: training is under way once the first one appears.
        first = process.stderr.readline()
        assert "epoch 1/50" in first, first
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "deformconv demo: error: terminated; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_signals_wait_while_the_folders_are_swapped():
    reached = []
    with sigterm_raises():
        with pytest.raises(Terminated), _signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            reached.append("after the signal")
        assert reached == ["after the signal"]
        with pytest.raises(KeyboardInterrupt), _signals_deferred():
            signal.raise_signal(signal.SIGINT)
            reached.append("after Ctrl-C")
    assert reached[-1] == "after Ctrl-C"


def test_output_folder_replaces_only_demo_folders(tmp_path):
    target = tmp_path / "out"
    first = OutputFolder(target)
    staging = first.stage()
    assert staging.parent == tmp_path and staging.name.startswith(".out.partial-")
    (staging / "a.png").write_text("1")
    (staging / "results.json").write_text(json.dumps({"files": ["a.png", "results.json"]}))
    first.commit()
    assert first.committed and sorted(p.name for p in target.iterdir()) == ["a.png", "results.json"]
    second = OutputFolder(target)
    staging = second.stage()
    (staging / "results.json").write_text(json.dumps({"files": ["results.json"]}))
    second.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["results.json"]
    (target / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="holds files that deformconv demo did not write"):
        OutputFolder(target)
    (tmp_path / "empty").mkdir()
    OutputFolder(tmp_path / "empty").discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_output_folder_discard_removes_what_it_created(tmp_path):
    folder = OutputFolder(tmp_path / "x" / "y" / "run")
    assert list(tmp_path.iterdir()) == []  # checking creates nothing
    staging = folder.stage()
    assert staging.parent == tmp_path / "x" / "y"
    folder.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--occlusion", "1"], "argument --occlusion: expected a fraction in [0, 1), got '1'"),
        (
            ["--occlusion", "-0.2"],
            "argument --occlusion: expected a fraction in [0, 1), got '-0.2'",
        ),
        (["--occlusion", "half"], "argument --occlusion: expected a number, got 'half'"),
        (["--task", "segment"], "argument --task: invalid choice: 'segment'"),
        (["--protocol", "4"], "argument --protocol: expected 'all' or a comma-separated list"),
        (["--occluder", "circle"], "argument --occluder: invalid choice: 'circle'"),
        (["--occluder-fill", "2"], "expected a grey value in [0, 1], got '2'"),
        (["--epochs", "0"], "expected a positive integer"),
        (["--rotation", "-5"], "expected a number >= 0"),
        (["--data", "cifar10"], "invalid choice: 'cifar10'"),
    ],
)
def test_bad_arguments_get_one_line(args, message, tmp_path):
    code, printed, err = _demo(*args, "--out", str(tmp_path / "o"))
    assert code == 2 and printed == ""
    assert err.count("\n") == 1 and err.startswith("deformconv demo: error: ")
    assert message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scale", "2", "1"], "scale must be a range"),
        (["--size", "18"], "image_size must be a multiple of 4"),
        (["--task", "restore", "--size", "3"], "size must be an int >= 4, got 3"),
    ],
)
def test_bad_settings_get_one_line(args, message, tmp_path):
    code, _, err = _demo(*args, "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and message in err


def test_missing_mnist_folder(tmp_path):
    out = tmp_path / "out"
    code, _, err = _demo("--data", "mnist", "--root", str(tmp_path / "nowhere"), "--out", str(out))
    assert code == 2
    assert "MNIST root" in err and "is not a folder" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_mnist_without_root():
    code, _, err = _demo("--data", "mnist")
    assert code == 2 and "needs root" in err


def test_restore_task_writes_its_table_figure_and_models(tmp_path):
    from deformconv.demo.encoder_decoder import load_encoder_decoder

    out = tmp_path / "restore"
    code, printed, logged = _demo(
        "--task", "restore", "--size", "13", "--limit", "32", "--epochs", "1", "--out", str(out)
    )
    assert code == 0, logged
    assert "Restoring occluded digits - test error (mean squared, per pixel)" in printed
    assert re.search(r"input unchanged\s+0\.\d{4}\s+0\.\d{4}\s+0\s+-\s+-", printed)
    assert "deformable encoder-decoder" in printed
    names = {p.name for p in out.iterdir()}
    assert names == {"restore.png", "restore_regular.pt", "restore_deformable.pt", "results.json"}
    data = json.loads((out / "results.json").read_text())
    assert data["task"] == "restore" and data["rows"][0]["name"] == "input unchanged"
    model = load_encoder_decoder(out / "restore_deformable.pt")
    assert model(torch.zeros(2, 1, 13, 13)).shape == (2, 1, 13, 13)
    assert re.search(
        r"^deformable encoder-decoder: epoch 1/1, .*validation error 0\.\d{4}", logged, re.M
    )


def test_restore_refuses_several_processes(monkeypatch, tmp_path):
    import torch.distributed as dist

    import deformconv.demo.train as train
    from deformconv.demo.train import DistributedContext

    monkeypatch.setattr(train, "init_distributed", lambda device: DistributedContext(0, 2))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    code, _, err = _demo("--task", "restore", "--out", str(tmp_path / "o"))
    assert code == 2 and "--task restore trains in one process" in err


def test_cost_of_the_encoder_decoder_lists_the_transposed_layers(tmp_path, capsys):
    from deformconv.demo.encoder_decoder import EncoderDecoder, EncoderDecoderConfig

    path = tmp_path / "net.pt"
    torch.save(EncoderDecoder(EncoderDecoderConfig((29, 29), deformable=2)), path)
    assert main(["cost", str(path), "--input", "29x29x1", "--trust-pickle"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("up.", "head"))]
    transposed = [row for row in rows if row[1] == "ConvTranspose2d"]
    assert [(row[0], row[2]) for row in transposed] == [
        ("up.0.0", "15x15x32"),
        ("up.1.0", "29x29x16"),
    ]
    assert rows[-1][:3] == ["head", "Conv2d", "29x29x1"]
    assert "DeformableConv2d" in out


def test_visualize_a_saved_model(demo_run, tmp_path, capsys):
    _, out, *_ = demo_run
    image = Image.new("L", (40, 56), 255)
    image.paste(0, (14, 10, 26, 46))
    path = tmp_path / "one.png"
    image.save(path)
    figure, field = tmp_path / "fig" / "one.png", tmp_path / "field.png"
    code = main(
        [
            "visualize",
            str(path),
            "--model",
            str(out / "p1_deformable.pt"),
            "--out",
            str(figure),
            "--field",
            str(field),
            "--unit",
            "1,2",
        ]
    )
    assert code == 0
    assert "predicted" in capsys.readouterr().out
    for written in (figure, field):
        with Image.open(written) as png:
            assert min(png.size) >= 300
    assert sorted(p.name for p in figure.parent.iterdir()) == ["one.png"]


def test_visualize_errors(demo_run, tmp_path, capsys):
    _, out, *_ = demo_run
    model = str(out / "p1_deformable.pt")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    target = tmp_path / "figure.png"

    def run(*args: str) -> tuple[int, str]:
        code = main(["visualize", *args])
        return code, capsys.readouterr().err

    code, err = run(str(text), "--model", model, "--out", str(target))
    assert code == 2 and "is not an image file Pillow can read" in err
    code, err = run(str(text), "--model", str(tmp_path / "none.pt"))
    assert code == 2 and "does not exist" in err
    code, err = run(str(text), "--model", str(text))
    assert code == 2 and "is not a model saved by `deformconv demo`" in err
    good = tmp_path / "good.png"
    Image.new("L", (16, 16)).save(good)
    code, err = run(str(good), "--model", model, "--unit", "9,0", "--out", str(target))
    assert code == 2 and "within the top layer's 4x4 grid" in err
    code, err = run(str(good), "--model", model, "--out", str(text / "x.png"))
    assert code == 2 and f"--out {text / 'x.png'} cannot be written: {text} is not a folder" in err
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.png", "notes.png"]


def test_visualize_regular_model(tmp_path, capsys):
    import torch

    from deformconv.demo.models import DigitCNN, ModelConfig, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "regular.pt"
    save_checkpoint(DigitCNN(ModelConfig(channels=(4, 4, 4, 4), image_size=16)), path)
    image = tmp_path / "x.png"
    Image.new("L", (16, 16)).save(image)
    assert main(["visualize", str(image), "--model", str(path)]) == 2
    assert "has no deformable layers" in capsys.readouterr().err
    assert not Path("x_sampling.png").exists()


@pytest.mark.parametrize(("command", "module"), [("demo", "sklearn"), ("visualize", "PIL")])
def test_missing_optional_dependency(command, module, monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    args = (
        ["demo", "--out", str(tmp_path / "o")]
        if command == "demo"
        else ["visualize", "x.png", "--model", "m.pt"]
    )
    assert main(args) == 3
    assert "pip install 'deformconv[demo]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _write_fake_mnist(root: Path, train: int, test: int) -> None:
    """Random 28x28 images in torchvision's raw IDX layout (gzip-compressed)."""
    import gzip
    import struct

    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        header = struct.pack(">HBBIII", 0, 8, 3, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(header + images.tobytes())
        )
        header = struct.pack(">HBBI", 0, 8, 1, n)
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(header + labels.tobytes())
        )


def test_demo_on_a_local_mnist_copy(tmp_path, capsys):
    _write_fake_mnist(tmp_path / "data", train=120, test=30)
    out = tmp_path / "out"
    code = main(
        [
            "demo",
            "--data",
            "mnist",
            "--root",
            str(tmp_path / "data"),
            "--protocol",
            "1",
            "--epochs",
            "1",
            "--size",
            "16",
            "--no-figures",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["data"] == "mnist"
    assert data["dataset_sizes"] == {"train": 110, "val": 10, "test": 30}
    assert "mnist: 110 train / 10 validation / 30 test images" in capsys.readouterr().out
