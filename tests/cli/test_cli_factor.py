"""``deformconv factor``: kernels by name and inline, model files, tables and JSON, bad input,
``--trust-pickle``, and ``--output`` checked first and written atomically."""

from __future__ import annotations

import errno
import json
import os
import warnings

import pytest
import torch
from torch import nn

import deformconv.cli.factor as factor_cli
from deformconv.cli import main

TRUST = "--trust-pickle"


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["factor", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["factor", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return " ".join(captured.err.split())


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path


def test_named_separable_kernel_table(capsys) -> None:
    assert main(["factor", "sobel"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "separable exactly (rank 1): column [1, 2, 1] x row [-1, 0, 1]" in out
    assert "singular value" in out and "relative error" in out


def test_laplacian_table_says_it_cannot_be_separated(capsys) -> None:
    assert main(["factor", "laplacian"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "cannot be separated exactly: rank 2" in out
    assert "relative error 0.1005" in out


@pytest.mark.parametrize(
    ("args", "rank"),
    [
        (("laplacian",), 2),
        (("gaussian", "--size", "5", "--sigma", "1.2"), 1),
        (("1 2 1; 2 4 2; 1 2 1",), 1),
        (("[[1, 0], [0, 1]]",), 2),
        (("laplacian", "--tol", "0.2"), 1),
        (("laplacian8",), 2),
    ],
)
def test_kernel_json(capsys, args: tuple[str, ...], rank: int) -> None:
    data = _json(capsys, *args)
    assert data["rank"] == rank and data["separable"] == (rank == 1)
    assert len(data["relative_errors"]) == len(data["kernel"])
    assert data["summary"]


def test_inline_kernel_factors(capsys) -> None:
    data = _json(capsys, "1 2 1; 2 4 2; 1 2 1")
    assert data["kernel_name"] == "inline kernel"
    assert data["column"] == [1.0, 2.0, 1.0] and data["row"] == [1.0, 2.0, 1.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1 2 3; 4 5 6",), "kernel must be square (k x k), got 2 x 3"),
        (("1 2; 3",), "kernel rows must all have the same length"),
        (("",), "kernel must have at least one value"),
        (("[]",), "kernel must have at least one value"),
        (("1 a; 2 3",), "could not read 'a' (row 1, value 2) as a number"),
        (("sobbel",), "unknown kernel name 'sobbel'; choose from"),
        (("sobel", "--size", "4"), "size of the sobel_x kernel must be an odd size >= 3"),
        (("1 2; 3 4", "--size", "3"), "--size and --sigma apply to named kernels only"),
        (("laplacian", "--tol", "2"), "tol must be a number in [0, 1)"),
        (("missing.pt",), "model file 'missing.pt' does not exist"),
        (("[[1, 0], [0, x]]",), "could not read 'x' (row 2, value 2) as a number"),
        (("models/net",), "model file 'models/net' does not exist"),
    ],
)
def test_bad_kernels_and_names(capsys, args: tuple[str, ...], message: str) -> None:
    err = _fails(capsys, *args)
    assert err.startswith("deformconv factor: error:")
    assert message in err


def test_model_file_that_does_not_load(capsys, tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    assert "could not be loaded as a TorchScript or torch.save file" in _fails(capsys, str(junk))
    weights = tmp_path / "weights.pt"
    torch.save(nn.Conv2d(1, 1, 3).state_dict(), weights)
    assert "holds a dict (a state_dict?), not a model" in _fails(capsys, str(weights))


def test_a_pickled_model_needs_trust_pickle(capsys, model_file, tmp_path) -> None:
    out_file = tmp_path / "converted.pt"
    assert main(["factor", str(model_file), "--output", str(out_file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1  # one line
    err = " ".join(captured.err.split())
    assert "is a full pickle (torch.save(model)), and loading it runs code stored in it" in err
    assert "pass --trust-pickle" in err
    assert not out_file.exists()
    assert main(["factor", str(model_file), TRUST, "--max-error", "0.9"]) == 0
    captured = capsys.readouterr()
    assert "model parameters:" in captured.out
    assert "warning:" in captured.err and "use it only with files you trust" in captured.err


def test_model_table_and_converted_file(capsys, model_file, tmp_path) -> None:
    out_file = tmp_path / "converted.pt"
    args = [str(model_file), TRUST, "--input-shape", "2,3,16,16", "--max-error", "0.9"]
    assert main(["factor", *args, "--output", str(out_file)]) == 0
    out = capsys.readouterr().out
    for text in ("layer", "method", "params", "MACs/image", "model parameters:", "4 kept:"):
        assert text in out
    assert f"converted model saved to {out_file}" in " ".join(out.split())
    converted = torch.load(out_file, weights_only=False)
    assert converted(torch.randn(1, 3, 16, 16)).shape == (1, 4, 8, 8)


def test_model_json_reports_what_the_converted_model_does(capsys, model_file, tmp_path) -> None:
    batch = torch.randn(3, 3, 12, 12)
    torch.save(batch, tmp_path / "batch.pt")
    out_file = tmp_path / "converted.pt"
    data = _json(
        capsys,
        str(model_file),
        TRUST,
        "--inputs",
        str(tmp_path / "batch.pt"),
        "--budget",
        "60%",
        "--output",
        str(out_file),
    )
    assert data["measured_on"] == f"the batch in {tmp_path / 'batch.pt'}"
    assert data["input_shape"] == [3, 3, 12, 12]
    assert data["params_after"] <= 0.6 * data["params_before"]
    assert [layer["name"] for layer in data["layers"]] == ["0", "2", "4"]
    original = torch.load(model_file, weights_only=False)
    converted = torch.load(out_file, weights_only=False)
    assert data["params_after"] == sum(p.numel() for p in converted.parameters())
    with torch.no_grad():
        reference, approx = original(batch), converted(batch)
    error = float((approx - reference).norm() / reference.norm())
    assert error == pytest.approx(data["output_error"], rel=1e-4, abs=1e-7)


def test_model_default_batch_and_error_bound(capsys, model_file) -> None:
    data = _json(capsys, str(model_file), TRUST)
    assert data["max_error"] == 0.05 and data["max_params"] is None
    assert data["measured_on"] == "a random normal batch of shape (4, 3, 32, 32) (seed 0)"


def test_torchscript_model(capsys, model_file, tmp_path) -> None:
    scripted = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.load(model_file, weights_only=False)), scripted)
    # TorchScript needs no unpickling of arbitrary classes: no --trust-pickle, no warning.
    assert main(["factor", str(scripted), "--max-error", "0.9"]) == 0
    captured = capsys.readouterr()
    assert "TorchScript model" in captured.out and captured.err == ""
    data = _json(capsys, str(scripted), "--max-error", "0.9")
    assert data["torchscript"] and [layer["name"] for layer in data["layers"]] == ["0", "2", "4"]
    assert "cannot be rewritten" in _fails(capsys, str(scripted), "--output", "x.pt")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--input-shape", "1,3,8"), "--input-shape must be four positive ints B,C,H,W"),
        (("--budget", "half"), "--budget must be a parameter count or a percentage"),
        (("--budget", "10"), "max_params=10 cannot be met"),
        (("--budget", "150%"), "--budget must be a percentage in (0, 100%], got 150%"),
        (("--budget", "0%"), "--budget must be a percentage in (0, 100%], got 0%"),
        (("--budget", "0"), "--budget must be a parameter count in [1, 2,836]"),
        (("--budget", "5000"), "--budget must be a parameter count in [1, 2,836]"),
        (("--input-shape", "1,5,8,8"), "the model failed on an input of shape (1, 5, 8, 8)"),
    ],
)
def test_bad_model_options(capsys, model_file, args: tuple[str, ...], message: str) -> None:
    assert message in _fails(capsys, str(model_file), TRUST, *args)


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the command starts measuring layers."""

    def forbidden(*args, **kwargs):
        raise AssertionError("factorize_model ran before the destination was checked")

    monkeypatch.setattr(factor_cli, "factorize_model", forbidden)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("/proc/x/m.pt", "--output /proc/x/m.pt cannot be written: its folder /proc/x cannot be"),
        ("{tmp}", "--output {tmp} is a folder; give a file name"),
        ("{tmp}/plain.txt/m.pt", "--output {tmp}/plain.txt/m.pt cannot be written"),
    ],
    ids=["proc", "folder", "under-a-file"],
)
def test_unwritable_output_is_refused_before_any_work(
    capsys, model_file, tmp_path, no_work, output: str, message: str
) -> None:
    (tmp_path / "plain.txt").write_text("a file, not a folder")
    output, message = output.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert main(["factor", str(model_file), TRUST, "--budget", "50%", "--output", output]) == 2
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(error) == 1 and message in error[0]
    assert "Traceback" not in captured.err and captured.out == ""


def _failing_save(real_save):
    """torch.save that writes part of the file, then fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    return save


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replace"])
def test_a_failure_mid_write_leaves_no_partial_file(
    capsys, monkeypatch, model_file, tmp_path, existing: bool
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    out_file = folder / "converted.pt"
    if existing:
        out_file.write_bytes(b"old content")
    monkeypatch.setattr(torch, "save", _failing_save(torch.save))
    assert main(["factor", str(model_file), TRUST, "--output", str(out_file)]) == 2
    err = capsys.readouterr().err
    assert f"deformconv factor: error: cannot write {out_file}: No space left on device" in err
    assert ".tmp" not in err  # the user's path, never the temporary one
    assert [p.name for p in folder.iterdir()] == (["converted.pt"] if existing else [])
    if existing:
        assert out_file.read_bytes() == b"old content"


def test_output_takes_the_users_umask(model_file, tmp_path) -> None:
    out_file = tmp_path / "converted.pt"
    previous = os.umask(0o027)
    try:
        assert main(["factor", str(model_file), TRUST, "--output", str(out_file), "--json"]) == 0
    finally:
        os.umask(previous)
    # 0o666 less the umask, as open() creates files (tempfile.mkstemp would give 0o600).
    assert out_file.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.pt", "model.pt"]
