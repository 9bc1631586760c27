from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from deformconv.cli import main

TINY = ["--epochs", "1", "--finetune-epochs", "1", "--limit", "32", "--size", "16"]
FIGURES = {
    "sampling_p1.png",
    "sampling_p2.png",
    "offsets_p1.png",
    "offsets_p2.png",
    "dilation_vs_scale.png",
    "training_curves.png",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", *TINY, "--seed", "3", "--out", str(out)])
    return code, out, printed.getvalue()


def test_demo_writes_tables_figures_models_and_json(demo_run):
    code, out, printed = demo_run
    assert code == 0
    assert "Protocol 1: both trained on deformed digits" in printed
    assert "Protocol 2" in printed and "control: fine-tuned" in printed
    assert "deformed" in printed and "s/epoch" in printed
    assert f"to {out}" in printed
    names = {p.name for p in out.iterdir()}
    assert names == FIGURES | {"results.json", "p1_deformable.pt", "p2_deformable.pt"}
    for name in FIGURES:
        with Image.open(out / name) as image:
            assert min(image.size) >= 300
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["seed"] == 3 and data["config"]["limit"] == 32
    assert data["environment"]["world_size"] == 1
    assert [len(p["rows"]) for p in data["protocols"]] == [2, 3]
    # Nothing but the output folder appears beside it: the staging folder is gone.
    assert [p.name for p in out.parent.iterdir()] == ["run"]


def test_unknown_dataset(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--data", "cifar10"])
    assert exc.value.code == 2
    assert "invalid choice: 'cifar10'" in capsys.readouterr().err


def test_missing_mnist_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["demo", "--data", "mnist", "--root", str(tmp_path / "nowhere"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "MNIST root" in err and "is not a folder" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_mnist_without_root(capsys):
    assert main(["demo", "--data", "mnist"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code = main(["demo", *TINY, "--out", str(blocker / "sub")])
    assert code == 2
    assert "cannot write the output folder" in capsys.readouterr().err
    code = main(["demo", *TINY, "--out", str(blocker)])
    assert code == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    import deformconv.cli.demo as cli_demo

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_demo, "_write_outputs", broken)
    code = main(["demo", *TINY, "--protocol", "1", "--no-figures", "--out", str(tmp_path / "run")])
    assert code == 130
    captured = capsys.readouterr()
    assert "interrupted; nothing was written" in captured.err
    assert "Protocol 1" not in captured.out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "expected a positive integer"),
        (["--rotation", "-5"], "expected a number >= 0"),
        (["--scale", "2", "1"], "scale must be a range"),
        (["--size", "18"], "image_size must be a multiple of 4"),
    ],
)
def test_bad_numbers(args, message, capsys):
    try:
        code = main(["demo", *args])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_visualize_a_saved_model(demo_run, tmp_path, capsys):
    _, out, _ = demo_run
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
    _, out, _ = demo_run
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
    assert code == 2 and "cannot write the figures" in err
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
