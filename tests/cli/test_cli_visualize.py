"""``deformconv visualize``: the model file it needs, and figures written atomically with the
user's umask (both figures or neither). A deformable demo model is built untrained: where it
samples does not matter here, only what is written."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from deformconv.cli import main
from deformconv.demo.models import DigitCNN, ModelConfig, save_checkpoint


@pytest.fixture
def inputs(tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "p1_deformable.pt"
    save_checkpoint(
        DigitCNN(ModelConfig(channels=(4, 4, 4, 4), deformable=2, image_size=16)), model
    )
    image = tmp_path / "digit.png"
    picture = Image.new("L", (16, 16), 255)
    picture.paste(0, (6, 3, 10, 13))
    picture.save(image)
    return image, model


def _visualize(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["visualize", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_model_not_made_by_the_demo_gets_one_line(capsys, inputs, tmp_path) -> None:
    image, _ = inputs
    other = tmp_path / "other.pt"
    torch.save(nn.Conv2d(1, 1, 3), other)
    code, out, err = _visualize(capsys, str(image), "--model", str(other))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "\x1b" not in err and "Traceback" not in err
    assert f"--model {other} is not a model saved by `deformconv demo`" in err
    assert "p1_deformable.pt or p2_deformable.pt" in err


def test_figures_take_the_users_umask(capsys, inputs, tmp_path) -> None:
    image, model = inputs
    out, field = tmp_path / "figs" / "sampling.png", tmp_path / "figs" / "field.png"
    previous = os.umask(0o002)
    try:
        code, printed, _ = _visualize(
            capsys, str(image), "--model", str(model), "--out", str(out), "--field", str(field)
        )
    finally:
        os.umask(previous)
    assert code == 0 and f"wrote {out}" in printed
    for path in (out, field):
        assert path.stat().st_mode & 0o777 == 0o664  # 0o666 less the umask, not mkstemp's 0o600
        with Image.open(path) as png:
            assert min(png.size) >= 300
    assert sorted(p.name for p in out.parent.iterdir()) == ["field.png", "sampling.png"]


@pytest.mark.parametrize("failing", [1, 2], ids=["first-figure", "second-figure"])
def test_a_failure_mid_write_leaves_both_files_as_they_were(
    capsys, monkeypatch, inputs, tmp_path, failing: int
) -> None:
    image, model = inputs
    folder = tmp_path / "figs"
    folder.mkdir()
    out, field = folder / "sampling.png", folder / "field.png"
    out.write_bytes(b"old figure")
    calls = []
    real_savefig = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        calls.append(fname)
        if len(calls) < failing:
            return real_savefig(self, fname, *args, **kwargs)
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(Figure, "savefig", savefig)
    code, out_text, err = _visualize(
        capsys, str(image), "--model", str(model), "--out", str(out), "--field", str(field)
    )
    assert code == 2 and out_text == ""
    failed = out if failing == 1 else field
    assert f"deformconv visualize: error: cannot write {failed}: No space left on device" in err
    assert ".tmp" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["sampling.png"]
    assert out.read_bytes() == b"old figure"


def test_an_unwritable_destination_is_refused_before_any_work(capsys, inputs) -> None:
    image, model = inputs
    code, out, err = _visualize(capsys, str(image), "--model", str(model), "--out", "/proc/x/s.png")
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "--out /proc/x/s.png cannot be written: its folder /proc/x cannot be created" in err
