"""What the sections of benchmarks/gpu_check.py share: progress lines, the error measure, the
loops that isolate each configuration and measurement, timing and the benchmark tables.

The sections (deformable convolution in gpu_check.py, DCNv3/DCNv4 in _gpu_check_dcnv.py) only
describe their configurations and how to run one; these loops give every section the same rules:
nothing starts past the deadline, a crash is recorded and the next one runs, and the JSON summary
is saved after each result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.benchmark import Timer

from deformconv.ops import KernelFallbackWarning, _launch, workspace_budget

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# max |got - reference| / max |reference|, per tensor. Low precision is compared with float32
# references on the same rounded inputs.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


def describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))
    return f"{type(exc).__name__}: {exc} (at {where})"


def leaf(v: Tensor) -> Tensor:
    """A copy of ``v`` with the same strides (``clone`` would make a strided view contiguous)."""
    copy = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
    return copy.copy_(v).requires_grad_(True)


def rel_error(got: Tensor | None, ref: Tensor | None) -> float:
    """``max |got - ref| / max |ref|`` (``ref``'s finite values), ``inf`` for a missing tensor,
    another shape, or a NaN or infinity in one tensor where the other has something else."""
    if got is None or ref is None:
        return 0.0 if got is None and ref is None else float("inf")
    if got.shape != ref.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    g, r = got.double(), ref.double()
    same = (g == r) | (g.isnan() & r.isnan())
    diff = torch.where(same, 0.0, (g - r).abs())
    if not bool(diff.isfinite().all()):
        return float("inf")
    scale = torch.where(r.isfinite(), r.abs(), 0.0).max().clamp_min(1e-6)
    return float(diff.max() / scale)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@contextlib.contextmanager
def no_fallback() -> Iterator[None]:
    """Inside the block a kernel fallback (``KernelFallbackWarning``) is an error: a check or a
    benchmark of a fast kernel must not quietly measure the portable one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        yield


def start_check(cfg: Any, base_device: torch.device) -> tuple[dict, torch.device | None]:
    """A configuration's result record and the device it runs on: ``base_device``, or
    ``cuda:<cfg.device_index>`` (``None``, the result marked skipped, when there is none)."""
    result = {"name": cfg.name, "config": dataclasses.asdict(cfg), "notes": []}
    if cfg.device_index is None:
        return result, base_device
    if base_device.type != "cuda" or torch.cuda.device_count() <= cfg.device_index:
        result.update(status="skipped", notes=[f"needs {cfg.device_index + 1} GPUs"])
        return result, None
    return result, torch.device("cuda", cfg.device_index)


def reference_copies(
    t: dict[str, Tensor | None], upstream: Tensor, dtype: str
) -> tuple[dict[str, Tensor | None], Tensor]:
    """The tensors the references get: float32 copies of float16/bfloat16 ones (the same rounded
    values), the tensors themselves otherwise."""
    if dtype not in ("float16", "bfloat16"):
        return t, upstream
    return {k: None if v is None else v.float() for k, v in t.items()}, upstream.float()


@contextlib.contextmanager
def kernel_settings(cfg: Any) -> Iterator[None]:
    """The settings a configuration asks of the kernel: a workspace budget, a lowered grid-axis
    limit (``max_grid_x``) or int32 threshold (``index_limit``), deterministic mode."""
    with contextlib.ExitStack() as stack:
        if cfg.budget is not None:
            stack.enter_context(workspace_budget(cfg.budget))
        for attribute, value in (
            ("MAX_GRID_X", cfg.max_grid_x),
            ("INDEX_LIMIT", getattr(cfg, "index_limit", None)),
        ):
            if value is not None:
                stack.callback(setattr, _launch, attribute, getattr(_launch, attribute))
                setattr(_launch, attribute, value)
        if cfg.deterministic:
            stack.enter_context(deterministic())
        yield


def run_under_test(
    run: Callable[[], tuple[Tensor, dict[str, Tensor | None]]],
    cfg: Any,
    device: torch.device,
    result: dict,
    errors: dict[str, dict[str, float]],
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """``run()`` (the kernel under test: output and gradients) under the configuration's
    :func:`kernel_settings`; in deterministic mode twice, noting whether the two runs are
    bit-identical. Outputs not of the configuration's dtype and device are errors."""
    with kernel_settings(cfg):
        out, grads = run()
        if cfg.deterministic:
            again, again_grads = run()
            same = torch.equal(out, again) and all(
                g is None or torch.equal(g, again_grads[k]) for k, g in grads.items()
            )
            result["notes"].append("bit-identical over two runs" if same else "NOT bit-identical")
            if not same:
                errors["determinism"] = {"two runs": float("inf")}
    dtype = DTYPES[cfg.dtype]
    wrong = [
        k
        for k, v in {"output": out, **grads}.items()
        if v is not None and (v.dtype != dtype or v.device != device)
    ]
    if wrong:
        errors["dtype/device"] = {k: float("inf") for k in wrong}
    return out, grads


def run_checks(
    label: str,
    items: list[Any],
    check: Callable[[Any], dict],
    deadline: float,
    results: list[dict],
    save: Callable[[], None],
) -> list[dict]:
    """``check(item)`` for each parity configuration (with a ``name``), appended to ``results``
    and saved as each one ends; past ``deadline`` the rest are ``NOT RUN``."""
    log(f"{label}: {len(items)} configurations")
    for i, item in enumerate(items, 1):
        if time.monotonic() > deadline:
            result = {"name": item.name, "status": "NOT RUN", "error": "time limit"}
        else:
            try:
                result = check(item)
            except Exception as exc:  # one configuration's crash must not lose the others
                result = {"name": item.name, "status": "ERROR", "error": describe(exc)}
        results.append(result)
        save()
        detail = result.get("error") or "; ".join(result.get("notes", []))
        err = f"max error {result['max_error']:.2e}" if "max_error" in result else ""
        log(f"{label} {i}/{len(items)} {item.name}: {result['status']} {err} {detail}".rstrip())
    return results


def verdict(result: dict, errors: dict[str, dict[str, float]], tolerance: float) -> dict:
    """Fill in ``result``'s errors, worst error, tolerance and pass/FAIL status."""
    result["errors"] = errors
    worst = max((e for errs in errors.values() for e in errs.values()), default=0.0)
    result.update(max_error=worst, tolerance=tolerance)
    result["status"] = "pass" if worst <= tolerance else "FAIL"
    return result


def failed(results: list[dict]) -> list[str]:
    return [r["name"] for r in results if r["status"] not in ("pass", "skipped")]


def parity_table(results: list[dict], references: tuple[str, ...]) -> str:
    """One Markdown row per configuration: status and the worst error against each reference."""
    head = " | ".join(f"max error vs {ref}" for ref in references)
    lines = [f"| configuration | result | {head} | tolerance |"]
    lines.append("|---" * (len(references) + 3) + "|")
    for r in results:
        errs = r.get("errors", {})
        worst = [
            f"{max(errs[f'vs {ref}'].values()):.1e}" if errs.get(f"vs {ref}") else "-"
            for ref in references
        ]
        note = r.get("error") or "; ".join(r.get("notes", []))
        status = r["status"] + (f" ({note})" if note else "")
        tol = f"{r['tolerance']:.0e}" if "tolerance" in r else "-"
        lines.append(f"| {r['name']} | {status} | " + " | ".join(worst) + f" | {tol} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Benchmarks.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """The memory one call of ``fn`` adds at its peak, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def time_steps(
    row: dict,
    forward: Callable[[], object],
    forward_backward: Callable[[], object],
    device: torch.device,
    min_run_time: float,
) -> None:
    """Medians (ms) of ``forward`` and ``forward_backward`` after a warm-up call each (which
    compiles Triton kernels), and the peak memory of one ``forward_backward``, into ``row``."""
    for key, fn in (("forward", forward), ("forward_backward", forward_backward)):
        fn()
        timer = Timer("fn()", globals={"fn": fn})
        row[f"{key}_ms"] = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    row["peak_mib"] = peak_mib(forward_backward, device)


def run_benchmarks(
    label: str,
    plan: Iterable[tuple[str, str, Callable[[], Any]]],
    methods: Iterable[str],
    measure: Callable[[str, Any, dict], None],
    deadline: float,
    rows: list[dict],
    save: Callable[[], None],
) -> list[dict]:
    """For each ``(dtype, shape, make_tensors)`` of ``plan`` and each method, a row that
    ``measure(method, tensors, row)`` fills in (an ``error`` when it raises or the deadline has
    passed), appended to ``rows`` and saved as each one ends."""
    methods = list(methods)
    for dtype, shape, make_tensors in plan:
        tensors: Any = None
        for method in methods:
            row = {"shape": shape, "dtype": dtype, "method": method}
            if time.monotonic() > deadline:
                row["error"] = "not run: time limit"
            else:
                try:
                    if tensors is None:
                        tensors = make_tensors()
                    measure(method, tensors, row)
                except Exception as exc:
                    row["error"] = describe(exc)
            rows.append(row)
            save()
            log(f"{label} {dtype} {shape} {method}: " + row_text(row))
        del tensors
    return rows


def row_text(row: dict) -> str:
    if "error" in row:
        return row["error"]
    peak = "" if row.get("peak_mib") is None else f", peak {row['peak_mib']:.0f} MiB"
    return (
        f"forward {row['forward_ms']:.3f} ms, forward+backward {row['forward_backward_ms']:.3f} ms"
        + peak
    )


def add_ratios(rows: list[dict], baseline: str) -> None:
    """``*_ratio``: each time over the ``baseline`` method's of the same shape and dtype."""
    base = {
        (r["shape"], r["dtype"]): r for r in rows if r["method"] == baseline and "error" not in r
    }
    for r in rows:
        b = base.get((r["shape"], r["dtype"]))
        for key in ("forward_ms", "forward_backward_ms"):
            if b is not None and key in r:
                r[key.replace("_ms", "_ratio")] = r[key] / b[key]


def bench_tables(rows: list[dict], methods: dict[str, str], baseline: str, versus: str) -> str:
    """Markdown tables, one per dtype: medians with ratios to ``baseline`` (described as
    ``versus``), then the peak memory of each method's forward+backward."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        out.append(f"\n{dtype}: medians in ms, in brackets the ratio to {versus}")
        out.append("| operation | " + " | ".join(shapes) + " |")
        out.append("|---" * (len(shapes) + 1) + "|")
        pick = {(r["shape"], r["method"]): r for r in rows if r["dtype"] == dtype}
        for key, label in (("forward", "forward"), ("forward_backward", "forward+backward")):
            for method, name in methods.items():
                cells = []
                for shape in shapes:
                    r = pick.get((shape, method), {})
                    if f"{key}_ms" not in r:
                        cells.append("n/a")
                        continue
                    ratio = r.get(f"{key}_ratio")
                    cells.append(
                        f"{r[key + '_ms']:.3f}"
                        + (f" ({ratio:.2f}x)" if method != baseline and ratio else "")
                    )
                out.append(f"| {name} {label} | " + " | ".join(cells) + " |")
        for method, name in methods.items():
            cells = []
            for shape in shapes:
                peak = pick.get((shape, method), {}).get("peak_mib")
                cells.append("n/a" if peak is None else f"{peak:.0f}")
            out.append(
                f"| peak memory of forward+backward, MiB: {name} | " + " | ".join(cells) + " |"
            )
    return "\n".join(out)
