"""benchmarks/gpu_check.py must not rot before it meets a GPU: its --smoke run (CPU, tiny shapes,
Triton kernels in the interpreter) runs here, in CI, and its verdict must follow the results.

It has four sections: deform_conv2d parity and benchmarks (gpu_check.py), DCNv3/DCNv4 parity and
benchmarks (_gpu_check_dcnv.py). What the DCNv3/DCNv4 configurations must cover is the brief of
the GPU check (the upstream semantics they exercise: InternImage's dcnv3_core_pytorch and DCNv4's
CUDA kernel, see tests/dcnv_reference.py)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcnv_cases import random_cases, tensors, upstream_grad
from dcnv_reference import dcnv3_grid_sample, dcnv4_grid_sample
from deformconv.ops import _dcnv3_triton, _launch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
METHODS = {"dense", "torchvision", "portable", "triton"}
DCNV_METHODS = {"depthwise", "grid_sample", "portable", "triton"}
SECTIONS = ("environment", "parity", "dcnv_parity", "benchmarks", "dcnv_benchmarks")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "summary.json"
    # CUDA_VISIBLE_DEVICES="" keeps the smoke run on the CPU on GPU machines too.
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    return result, json.loads(out.read_text())


def test_smoke_run_passes_and_prints_one_summary(smoke) -> None:
    result, summary = smoke
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary["passed"] and summary["failures"] == []
    assert summary["sections"] == dict.fromkeys(SECTIONS, "ok")
    assert summary["environment"]["interpreter"] is True
    assert result.stdout.count("# deformconv GPU check") == 1
    assert "GPU check PASSED" in result.stdout.splitlines()[-1]
    assert "parity 1/" in result.stdout and "dcnv_parity 1/" in result.stdout  # progress lines
    for title in ("deform_conv2d parity:", "DCNv3/DCNv4 parity:", "DCNv3 core on InternImage-T"):
        assert result.stdout.count(title) == 1, title


def test_smoke_parity_covers_the_required_kinds_of_configuration(smoke) -> None:
    _, summary = smoke
    by_name = {r["name"]: r for r in summary["parity"]}
    for name in (
        "channels_last",
        "strided input",
        "float16",
        "bfloat16",
        "batch 0",
        "split launches",
        "deterministic",
    ):
        assert by_name[name]["status"] == "pass", by_name[name]
        assert set(by_name[name]["errors"]) >= {"vs portable", "vs torchvision"}
    assert "bit-identical over two runs" in by_name["deterministic"]["notes"]
    assert by_name["cuda:1"]["status"] == "skipped"  # needs two GPUs
    for r in summary["parity"]:
        if r["status"] == "pass":
            assert r["max_error"] <= r["tolerance"]
            assert set(r["errors"]["vs portable"]) >= {"output", "input", "offset", "weight"}


def test_smoke_benchmarks_time_every_method_in_both_dtypes(smoke) -> None:
    _, summary = smoke
    rows = summary["benchmarks"]
    assert {(r["method"], r["dtype"]) for r in rows} == {
        (m, d) for m in METHODS for d in ("float32", "float16")
    }
    for r in rows:
        assert "error" not in r, r
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0
        if r["method"] != "dense":
            assert r["forward_ratio"] == pytest.approx(
                r["forward_ms"]
                / next(
                    d["forward_ms"]
                    for d in rows
                    if d["method"] == "dense" and d["dtype"] == r["dtype"]
                )
            )


@pytest.fixture
def benchmarks_path(monkeypatch):
    """The benchmarks folder on sys.path (the script imports its helper modules from there) for
    one test, and the modules imported from it forgotten afterwards."""
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    yield
    for name in set(sys.modules) - before:  # the script's helper modules
        if name.startswith("_gpu_check"):
            del sys.modules[name]


@pytest.fixture
def dcnv(benchmarks_path):
    return importlib.import_module("_gpu_check_dcnv")


@pytest.fixture
def gpu_check(benchmarks_path, monkeypatch):
    """The script as a module, with one configuration in each parity section."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    smoke_configs = module.parity_configs(smoke=True)
    monkeypatch.setattr(module, "parity_configs", lambda smoke: smoke_configs[:1])
    dcnv = module.dcnv()  # the module the script imports, from sys.modules
    dcnv_configs = dcnv.parity_configs(smoke=True)
    monkeypatch.setattr(dcnv, "parity_configs", lambda smoke: dcnv_configs[:1])
    return module


def test_a_parity_failure_makes_the_exit_code_non_zero(gpu_check, monkeypatch, tmp_path) -> None:
    real = gpu_check._TritonOnCpu.forward

    def wrong(ctx, *args):
        return real(ctx, *args) * 1.01

    monkeypatch.setattr(gpu_check._TritonOnCpu, "forward", staticmethod(wrong))
    out = tmp_path / "s.json"
    assert gpu_check.main(["--smoke", "--skip-bench", "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["failures"] == ["base"] and summary["parity"][0]["status"] == "FAIL"


def test_a_crashing_section_is_reported_and_the_others_still_run(
    gpu_check, monkeypatch, tmp_path, capsys
) -> None:
    def broken(device, smoke):
        raise RuntimeError("no GPU properties")

    monkeypatch.setattr(gpu_check, "environment", broken)
    out = tmp_path / "s.json"
    assert gpu_check.main(["--smoke", "--skip-bench", "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["sections"]["environment"].startswith("ERROR: RuntimeError: no GPU properties")
    assert summary["parity"][0]["status"] == "pass"
    assert "FAILED: section environment" in capsys.readouterr().out


def test_dcnv_sections_that_cannot_even_import_leave_the_others(
    gpu_check, monkeypatch, tmp_path, capsys
) -> None:
    def missing():
        raise ImportError("cannot import name 'dcnv4' from 'deformconv.ops'")

    monkeypatch.setattr(gpu_check, "dcnv", missing)
    monkeypatch.setattr(gpu_check, "METHODS", {"dense": "dense `F.conv2d`"})  # a quick bench
    out = tmp_path / "s.json"
    assert gpu_check.main(["--smoke", "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    for section in ("dcnv_parity", "dcnv_benchmarks"):
        assert summary["sections"][section].startswith("ERROR: ImportError: cannot import name")
    assert summary["sections"]["parity"] == summary["sections"]["benchmarks"] == "ok"
    assert summary["parity"][0]["status"] == "pass"
    assert {r["method"] for r in summary["benchmarks"]} == {"dense"}
    assert all("error" not in r for r in summary["benchmarks"])
    assert "FAILED: section dcnv_parity; section dcnv_benchmarks" in capsys.readouterr().out


def test_a_dcnv_parity_failure_fails_the_check_and_leaves_the_other_section(
    gpu_check, monkeypatch, tmp_path
) -> None:
    real = gpu_check.dcnv()._TritonOnCpu.forward

    def wrong(ctx, *args):
        return real(ctx, *args) * 1.01

    monkeypatch.setattr(gpu_check.dcnv()._TritonOnCpu, "forward", staticmethod(wrong))
    out = tmp_path / "s.json"
    assert gpu_check.main(["--smoke", "--skip-bench", "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["failures"] == ["dcnv3 base"]
    assert summary["dcnv_parity"][0]["status"] == "FAIL"
    assert summary["parity"][0]["status"] == "pass"


def test_a_crash_in_one_dcnv_configuration_is_recorded_and_the_next_one_runs(
    gpu_check, monkeypatch, tmp_path
) -> None:
    tiny = {"batch": 1, "size": (4, 5), "group_channels": 4}
    configs = [gpu_check.dcnv().DcnvConfig(name, **tiny) for name in ("dcnv3 will crash", "next")]
    monkeypatch.setattr(gpu_check.dcnv(), "parity_configs", lambda smoke: configs)
    real = gpu_check.dcnv().make_tensors

    def crash_first(cfg, device):
        if cfg.name == "dcnv3 will crash":
            raise RuntimeError("illegal memory access")
        return real(cfg, device)

    monkeypatch.setattr(gpu_check.dcnv(), "make_tensors", crash_first)
    out = tmp_path / "s.json"
    assert gpu_check.main(["--smoke", "--skip-bench", "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    crashed, ran = summary["dcnv_parity"]
    assert crashed["status"] == "ERROR" and "illegal memory access" in crashed["error"]
    assert ran["status"] == "pass"
    assert summary["failures"] == ["dcnv3 will crash"]


def test_past_the_time_limit_nothing_starts_and_the_check_fails(gpu_check, tmp_path) -> None:
    out = tmp_path / "s.json"
    assert gpu_check.main(["--smoke", "--time-limit", "0", "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    for key in ("parity", "dcnv_parity"):
        assert [r["status"] for r in summary[key]] == ["NOT RUN"]
    for key in ("benchmarks", "dcnv_benchmarks"):
        assert summary[key] and all(r["error"] == "not run: time limit" for r in summary[key])
    assert summary["failures"] == ["base", "dcnv3 base"]


# ---------------------------------------------------------------------------------------------
# The DCNv3/DCNv4 sections in detail.


def _missing_kinds(configs: list[dict]) -> list[str]:
    """The kinds of configuration the GPU check's brief asks for that ``configs`` lack."""
    kinds = {
        "dcnv3": lambda c: c["op"] == "dcnv3",
        "float64": lambda c: c["dtype"] == "float64",
        "float32": lambda c: c["dtype"] == "float32",
        "float16": lambda c: c["dtype"] == "float16",
        "bfloat16": lambda c: c["dtype"] == "bfloat16",
        "remove_center": lambda c: c["remove_center"],
        "offset_scale != 1": lambda c: c["offset_scale"] != 1.0,
        "stride 2": lambda c: 2 in c["stride"],
        "dilation 2": lambda c: 2 in c["dilation"],
        "non-square kernel": lambda c: c["kernel"][0] != c["kernel"][1],
        "group width not a multiple of 16": lambda c: c["group_channels"] % 16 != 0,
        "batch 0": lambda c: c["batch"] == 0,
        "strided tensors": lambda c: c["layout"] == "strided",
        "dcnv4 with padding columns": lambda c: c["op"] == "dcnv4" and c["padded"],
        "deterministic backward": lambda c: c["deterministic"],
        "split launches": lambda c: c["max_grid_x"] is not None,
        "int64 indexing": lambda c: c["index_limit"] is not None,
    }
    return [kind for kind, has in kinds.items() if not any(has(c) for c in configs)]


def test_smoke_dcnv_parity_covers_every_required_kind_and_passes(smoke) -> None:
    _, summary = smoke
    results = summary["dcnv_parity"]
    by_name = {r["name"]: r for r in results}
    assert by_name.pop("dcnv3 cuda:1")["status"] == "skipped"  # needs two GPUs
    for r in by_name.values():
        assert r["status"] == "pass" and r["max_error"] <= r["tolerance"], r
        assert set(r["errors"]["vs portable"]) >= {"output", "input", "offset", "mask"}
        if r["config"]["batch"]:
            # The offset gradient jumps at pixel borders: compared with the portable kernel only.
            assert set(r["errors"]["vs grid_sample"]) == {"output", "input", "mask"} | (
                {"padding"} if r["config"]["op"] == "dcnv4" else set()
            )
    assert _missing_kinds([r["config"] for r in by_name.values()]) == []
    assert "padding" in by_name["dcnv4 padding columns"]["errors"]["vs portable"]
    assert "bit-identical over two runs" in by_name["dcnv3 deterministic backward"]["notes"]
    assert "forward in 2 launches of at most 2 programs" in by_name["dcnv3 split launches"]["notes"]
    assert "int64 indexing in 2 of 2 launches" in by_name["dcnv3 int64 indexing"]["notes"]


def test_smoke_dcnv_benchmarks_time_every_method_in_both_dtypes(smoke) -> None:
    _, summary = smoke
    rows = summary["dcnv_benchmarks"]
    assert {(r["method"], r["dtype"]) for r in rows} == {
        (m, d) for m in DCNV_METHODS for d in ("float32", "float16")
    }
    depthwise = {r["dtype"]: r for r in rows if r["method"] == "depthwise"}
    for r in rows:
        assert "error" not in r and "agreement_error" not in r, r
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0
        for key in ("forward", "forward_backward"):
            expected = r[f"{key}_ms"] / depthwise[r["dtype"]][f"{key}_ms"]
            assert r[f"{key}_ratio"] == pytest.approx(expected)
        if r["method"] in ("portable", "triton"):
            tolerance = {"float32": 1e-4, "float16": 1e-2}[r["dtype"]]
            assert 0 <= r["forward_error_vs_grid_sample"] <= tolerance


def test_gpu_dcnv_configurations_cover_every_required_kind_and_are_valid(dcnv) -> None:
    """The GPU list (not run here: the larger shapes would take minutes in the interpreter):
    every kind is there, and every configuration's tensors pass the operators' checks (on meta
    tensors, so nothing is computed)."""
    configs = dcnv.parity_configs(smoke=False)
    assert _missing_kinds([dataclasses.asdict(c) for c in configs]) == []
    assert any(c.device_index == 1 for c in configs)
    assert any(c.packed and not c.padded for c in configs)
    names = [c.name for c in configs]
    assert len(set(names)) == len(names)
    assert f"on {len(configs)} configurations" in " ".join(SCRIPT.read_text().split())
    for cfg in configs:
        t, upstream = dcnv.make_tensors(cfg, torch.device("meta"))
        out = dcnv._operator(cfg, t["input"], t.get("offset_mask", t.get("offset")), t.get("mask"))
        assert out.shape == upstream.shape and out.shape[0] == cfg.batch


def test_the_gpu_split_launch_configuration_needs_13_launches(dcnv, monkeypatch) -> None:
    """As the module's docstring says, which also says why the limit is lowered: at CUDA's real
    limit that shape would need over 10 million images."""
    (cfg,) = [c for c in dcnv.parity_configs(smoke=False) if c.max_grid_x is not None]
    monkeypatch.setattr(_launch, "MAX_GRID_X", cfg.max_grid_x)
    launches = list(_dcnv3_triton._launches(cfg.batch, cfg.sampling()))
    assert len(launches) == 13 and max(grid[0] for _, _, grid in launches) <= cfg.max_grid_x
    monkeypatch.setattr(_launch, "MAX_GRID_X", _launch.INT32_MAX)
    assert len(list(_dcnv3_triton._launches(10_000_000, cfg.sampling()))) == 1


def _smoke_config(dcnv, name: str):
    (cfg,) = [c for c in dcnv.parity_configs(smoke=True) if c.name == name]
    return cfg


def test_gradients_in_dcnv4_padding_columns_fail_the_check(dcnv, monkeypatch) -> None:
    """DCNv4's padding columns are ignored upstream (DCNv4_op/DCNv4/modules/dcnv4.py pads the
    width for alignment only), so their gradient must be zero."""
    cfg = _smoke_config(dcnv, "dcnv4 padding columns")
    real = _dcnv3_triton.backward

    def junk_in_padding(grad, input, offset, mask, s):
        gi, go, gm = real(grad, input, offset, mask, s)
        go[..., 3 * s.group * s.points :] = 1.0
        return gi, go, gm

    monkeypatch.setattr(_dcnv3_triton, "backward", junk_in_padding)
    result = dcnv.check_config(cfg, torch.device("cpu"))
    assert result["status"] == "FAIL"
    errors = result["errors"]["vs portable"]
    assert errors["padding"] > result["tolerance"] and errors["offset"] <= result["tolerance"]


def test_a_backward_that_varies_between_runs_fails_the_deterministic_check(
    dcnv, monkeypatch
) -> None:
    cfg = _smoke_config(dcnv, "dcnv3 deterministic backward")
    real = _dcnv3_triton.backward
    calls = []

    def varying(grad, input, offset, mask, s):
        calls.append(1)
        gi, go, gm = real(grad, input, offset, mask, s)
        return gi + 1e-9 * len(calls), go, gm  # far within the tolerance, but not the same bits

    monkeypatch.setattr(_dcnv3_triton, "backward", varying)
    result = dcnv.check_config(cfg, torch.device("cpu"))
    assert result["status"] == "FAIL" and "NOT bit-identical" in result["notes"]
    assert result["errors"]["vs portable"]["input"] <= result["tolerance"]


def test_launches_that_were_not_split_fail_the_split_check(dcnv) -> None:
    cfg = dataclasses.replace(_smoke_config(dcnv, "dcnv3 split launches"), max_grid_x=10**6)
    result = dcnv.check_config(cfg, torch.device("cpu"))
    assert result["status"] == "FAIL" and "forward in 1 launches" in result["notes"][0]
    assert result["errors"]["launches"] == {"split": float("inf")}


def test_rel_error_counts_a_nan_or_infinity_that_the_reference_lacks(benchmarks_path) -> None:
    from _gpu_check_common import rel_error

    ref = torch.tensor([0.0, 2.0, float("nan"), float("inf")])
    assert rel_error(ref.clone(), ref) == 0.0  # the same non-finite values in the same places
    assert rel_error(torch.tensor([0.0, 2.0, 1.0, float("inf")]), ref) == float("inf")
    assert rel_error(torch.tensor([float("nan"), 2.0, float("nan"), float("inf")]), ref) == float(
        "inf"
    )
    assert rel_error(torch.tensor([0.1, 2.0, float("nan"), float("inf")]), ref) == pytest.approx(
        0.05
    )


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_the_grid_sample_formulation_matches_the_tests_reference(dcnv, packed: bool) -> None:
    """The check's own grid_sample formulation (its second, independent reference and a
    benchmarked method) against tests/dcnv_reference.py, forward and gradients, on the random
    configurations of tests/dcnv_cases.py."""
    for case in random_cases(6, seed=11, packed=packed):
        if case.batch == 0:
            continue
        t = {k: v.requires_grad_() for k, v in tensors(case, torch.float64, packed).items()}
        cfg = dcnv.DcnvConfig(
            "case", op="dcnv4" if packed else "dcnv3", batch=case.batch,
            size=(case.height, case.width), group=case.group,
            group_channels=case.group_channels, kernel=case.kernel, stride=case.stride,
            pad=case.pad, dilation=case.dilation, offset_scale=case.offset_scale,
            remove_center=case.remove_center,
        )  # fmt: skip
        if packed:
            got = dcnv._grid_sample(cfg, t["input"], t["offset_mask"], None)
            ref = dcnv4_grid_sample(t["input"], t["offset_mask"], *case.args()[:-1], 64,
                                    case.remove_center)  # fmt: skip
        else:
            got = dcnv._grid_sample(cfg, t["input"], t["offset"], t["mask"])
            ref = dcnv3_grid_sample(t["input"], t["offset"], t["mask"], *case.args())
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=str(case))
        grad = upstream_grad(ref)
        for a, b in zip(
            torch.autograd.grad(got, list(t.values()), grad),
            torch.autograd.grad(ref, list(t.values()), grad),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=str(case))
