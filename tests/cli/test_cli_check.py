from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from deformconv.cli import main
from deformconv.tools.selfcheck import device_problem, run_self_check


def test_check_passes_and_reports_its_references(capsys) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for word in ("F.conv2d", "portable kernel", "torchvision", "float32", "float64", "passed"):
        assert word in out
    assert "skipped" not in out


def test_check_names_the_comparisons_it_skips_without_torchvision(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "all 6 comparisons passed (4 skipped)" in out
    skipped = [line for line in out.splitlines() if line.startswith("skipped:")]
    assert skipped == [
        "skipped: forward (float32) vs torchvision, 5 gradients (float32) vs torchvision, "
        "forward (float64) vs torchvision, 5 gradients (float64) vs torchvision: torchvision "
        "is not installed; `pip install torchvision` adds these comparisons"
    ]


def test_a_torchvision_without_the_devices_kernel_is_skipped(monkeypatch) -> None:
    import torchvision

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'torchvision::deform_conv2d' with arguments")

    monkeypatch.setattr(torchvision.ops, "deform_conv2d", no_kernel)
    results = run_self_check(dtypes=(torch.float64,))
    skipped = [r for r in results if r.skipped]
    assert [r.reference for r in skipped] == ["torchvision", "torchvision"]
    assert "no cpu kernel" in skipped[0].skipped
    assert all(r.passed for r in results if not r.skipped)


def test_check_on_cuda_without_a_gpu_says_so_in_one_line() -> None:
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this holds on machines with one too.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "deformconv", "check", "--device", "cuda"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deformconv check --device cuda: no CUDA device is available")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"),
        ("mps", "the self-check runs on 'cpu' and 'cuda' devices, got 'mps'"),
    ],
)
def test_check_refuses_other_devices_in_one_line(capsys, device, message) -> None:
    assert main(["check", "--device", device]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"deformconv check --device {device}: {message}"
    with pytest.raises(ValueError, match=re.escape(message)):
        run_self_check(device=device)


def test_device_problem_names_missing_cuda_devices() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problem = device_problem(f"cuda:{count + 7}")
    assert problem is not None and ("no CUDA device" in problem or "is not available" in problem)
    assert device_problem("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_check_on_cuda_passes_on_a_gpu(capsys) -> None:
    assert main(["check", "--device", "cuda"]) == 0
    assert "self-check on cuda" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_console_script_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deformconv", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("deformconv ")
