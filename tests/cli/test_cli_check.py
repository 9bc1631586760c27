from __future__ import annotations

import subprocess
import sys

from deformconv.cli import main


def test_check_passes_and_reports_its_references(capsys) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for word in ("F.conv2d", "portable kernel", "torchvision", "float32", "float64", "passed"):
        assert word in out


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
