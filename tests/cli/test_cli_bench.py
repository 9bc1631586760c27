"""``deformconv bench``: what it times (the right computation), the ratios it prints, its options
and errors. No speed is asserted: times come from a stand-in clock or are only checked to be
positive and consistent with the printed ratios."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

import deformconv.cli.bench as bench_cli
from deformconv import deform_conv2d
from deformconv.cli import main
from deformconv.cli.bench import BenchConfig, benchmark

TINY = ["--batch", "1", "--in-channels", "4", "--out-channels", "4", "--size", "6x7"]
COLUMNS = ["implementation", "forward ms", "forward / dense", "fwd+bwd ms", "fwd+bwd / dense"]


def _table(out: str) -> dict[str, list[str]]:
    """The rows of the printed table by implementation name (cells between the rules)."""
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        if len(cells) == len(COLUMNS) and cells[0] in (
            "dense F.conv2d",
            "deformconv",
            "torchvision",
        ):
            rows[cells[0]] = cells[1:]
    return rows


def test_the_table_shows_each_time_and_its_ratio_to_dense(capsys, monkeypatch) -> None:
    # A stand-in clock: per implementation, forward then forward+backward, in call order.
    times = iter([2.0, 4.0, 5.0, 12.0, 3.0, 6.0])
    monkeypatch.setattr(bench_cli, "_median_ms", lambda fn, min_run_time: next(times))
    assert main(["bench", *TINY, "--kernel", "3x2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "implementation" in line)
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")] == COLUMNS
    assert _table(out) == {
        "dense F.conv2d": ["2.00", "1.00x", "4.00", "1.00x"],
        "deformconv": ["5.00", "2.50x", "12.00", "3.00x"],
        "torchvision": ["3.00", "1.50x", "6.00", "1.50x"],
    }
    assert "batch 1, 4 -> 4 channels, 6x7, kernel 3x2" in " ".join(out.split())


def test_forward_only_leaves_the_backward_columns_empty(capsys, monkeypatch) -> None:
    times = iter([2.0, 8.0, 4.0])
    monkeypatch.setattr(bench_cli, "_median_ms", lambda fn, min_run_time: next(times))
    assert main(["bench", *TINY, "--v1", "--forward-only"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["deformconv"] == ["8.00", "4.00x", "-", "-"]
    assert rows["torchvision"] == ["4.00", "2.00x", "-", "-"]


@pytest.mark.parametrize(
    "cfg",
    [
        BenchConfig(batch=2, in_channels=4, out_channels=6, size=(7, 6), kernel=(3, 2)),
        BenchConfig(1, 4, 4, (8, 8), stride=(2, 1), groups=2, offset_groups=2, modulated=False),
    ],
    ids=["v2", "v1-groups"],
)
def test_it_times_the_same_call_as_torchvision_and_dense(cfg: BenchConfig) -> None:
    # The closures that are timed compute what they claim: deformconv and torchvision give the
    # same output and gradients on the bench's tensors, dense is F.conv2d on them.
    tensors = bench_cli._tensors(cfg)
    ours_f, ours_fb = bench_cli._steps(deform_conv2d, tensors, cfg)
    theirs_f, theirs_fb = bench_cli._steps(torchvision.ops.deform_conv2d, tensors, cfg)
    dense_f, _ = bench_cli._steps(None, tensors, cfg)
    torch.testing.assert_close(ours_f(), theirs_f(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(ours_fb(), theirs_fb(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    conv = {"stride": cfg.stride, "padding": cfg.padding, "dilation": cfg.dilation}
    expected = F.conv2d(
        tensors["input"], tensors["weight"], tensors["bias"], groups=cfg.groups, **conv
    )
    torch.testing.assert_close(dense_f(), expected)


def test_benchmark_rows_hold_measured_times_and_their_ratios() -> None:
    rows = benchmark(BenchConfig(batch=1, in_channels=2, out_channels=2, size=(5, 5)), 0.01)
    assert [r.name for r in rows] == ["dense F.conv2d", "deformconv", "torchvision"]
    dense = rows[0]
    for row in rows:
        assert row.forward_ms > 0 and row.forward_backward_ms > 0
        assert row.forward_ratio == pytest.approx(row.forward_ms / dense.forward_ms)
        assert row.forward_backward_ratio == pytest.approx(
            row.forward_backward_ms / dense.forward_backward_ms
        )


def test_bench_rejects_a_kernel_larger_than_the_input(capsys) -> None:
    assert main(["bench", *TINY, "--kernel", "9", "--padding", "0", "--min-run-time", "0.01"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("deformconv bench: error:") and captured.err.count("\n") == 1
    assert "does not fit the input" in captured.err


def test_bench_rejects_a_malformed_pair() -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--size", "6by7"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is printed without CUDA only")
def test_no_cuda_runtime_message_on_a_machine_without_cuda() -> None:
    # torch.utils.cpp_extension logs "No CUDA runtime is found" when first imported on such a
    # machine (torch/utils/cpp_extension.py); bench's timer imports it through
    # torch.utils.benchmark. A fresh process, so that the module is not imported yet.
    script = "from deformconv.cli.bench import _median_ms; print(_median_ms(lambda: None, 1e-3))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert float(result.stdout) > 0
    assert "No CUDA runtime" not in result.stderr
