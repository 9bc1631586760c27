from __future__ import annotations

import pytest

from deformconv.cli import main
from deformconv.cli.bench import BenchConfig, benchmark

TINY = ["--batch", "1", "--in-channels", "4", "--out-channels", "4", "--size", "6x7"]


def test_bench_prints_times_and_ratios_for_every_implementation(capsys) -> None:
    assert main(["bench", *TINY, "--kernel", "3x2", "--min-run-time", "0.01"]) == 0
    out = capsys.readouterr().out
    for word in (
        "forward / dense",
        "fwd+bwd / dense",
        "dense F.conv2d",
        "deformconv",
        "torchvision",
    ):
        assert word in out
    assert "1.00x" in out


@pytest.mark.parametrize(
    "extra",
    [["--v1", "--forward-only"], ["--groups", "2", "--offset-groups", "2", "--stride", "2"]],
    ids=["v1-forward-only", "groups"],
)
def test_bench_options(capsys, extra: list[str]) -> None:
    assert main(["bench", *TINY, "--min-run-time", "0.01", *extra]) == 0
    out = capsys.readouterr().out
    assert "forward / dense" in out
    if "--forward-only" in extra:
        assert "-" in out


def test_bench_rejects_a_kernel_larger_than_the_input(capsys) -> None:
    assert main(["bench", *TINY, "--kernel", "9", "--padding", "0", "--min-run-time", "0.01"]) == 2
    assert "does not fit the input" in capsys.readouterr().out


def test_bench_rejects_a_malformed_pair() -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--size", "6by7"])


def test_benchmark_returns_dense_first_with_unit_ratio() -> None:
    rows = benchmark(BenchConfig(batch=1, in_channels=2, out_channels=2, size=(5, 5)), 0.01)
    assert rows[0].name == "dense F.conv2d"
    assert rows[0].forward_ratio == 1.0 and rows[0].forward_backward_ratio == 1.0
    assert all(r.forward_ms > 0 and r.forward_backward_ms > 0 for r in rows)
