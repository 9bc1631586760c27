"""The workspace budget: process default, per-thread and per-task contexts, argument checks.

Expected behaviour is that of ``contextvars`` (PEP 567): a value set in one thread or asyncio
task is invisible to the others, and ``reset`` restores what the enclosing context had.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from deformconv.ops import get_workspace_budget, set_workspace_budget, workspace_budget
from deformconv.ops._workspace import batch_chunks

DEFAULT = 256 * 2**20


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("DEFORMCONV_WORKSPACE_MB", raising=False)
    yield
    set_workspace_budget(None)


def test_nested_contexts_in_two_threads_do_not_leak_into_each_other() -> None:
    # Both threads enter, nest and leave their contexts in lock step, so each step of one
    # thread happens while the other holds a different budget.
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(name: str, outer: int, inner: int) -> None:
        try:
            log = seen[name]
            barrier.wait()
            log.append(get_workspace_budget())
            with workspace_budget(outer):
                barrier.wait()
                log.append(get_workspace_budget())
                with workspace_budget(inner):
                    barrier.wait()
                    log.append(get_workspace_budget())
                    log.append(batch_chunks(10, inner // 2)[0][1])
                    barrier.wait()
                barrier.wait()
                log.append(get_workspace_budget())
            barrier.wait()
            log.append(get_workspace_budget())
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=worker, args=("a", 1000, 100)),
        threading.Thread(target=worker, args=("b", 5000, 700)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert seen["a"] == [DEFAULT, 1000, 100, 2, 1000, DEFAULT]
    assert seen["b"] == [DEFAULT, 5000, 700, 2, 5000, DEFAULT]
    assert get_workspace_budget() == DEFAULT


def test_process_default_reaches_every_thread_below_their_contexts() -> None:
    set_workspace_budget(4096)
    seen: list[int] = []

    def worker() -> None:
        seen.append(get_workspace_budget())
        with workspace_budget(64):
            seen.append(get_workspace_budget())
            with workspace_budget(None):  # lifts the context: the process default again
                seen.append(get_workspace_budget())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=60)
    assert seen == [4096, 64, 4096]
    assert get_workspace_budget() == 4096


def test_asyncio_tasks_keep_their_own_budget() -> None:
    async def task(nbytes: int, ready: asyncio.Event, other: asyncio.Event) -> tuple[int, int]:
        with workspace_budget(nbytes):
            ready.set()
            await other.wait()  # the other task has entered its own context by now
            inside = get_workspace_budget()
        return inside, get_workspace_budget()

    async def main() -> list[tuple[int, int]]:
        first, second = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(task(111, first, second), task(222, second, first))

    assert asyncio.run(main()) == [(111, DEFAULT), (222, DEFAULT)]


def test_context_is_restored_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="inside"), workspace_budget(123):
        raise RuntimeError("inside")
    assert get_workspace_budget() == DEFAULT


def test_environment_variable_is_the_default_below_the_settings(monkeypatch) -> None:
    monkeypatch.setenv("DEFORMCONV_WORKSPACE_MB", "2")
    assert get_workspace_budget() == 2 * 2**20
    set_workspace_budget(77)
    assert get_workspace_budget() == 77
    monkeypatch.setenv("DEFORMCONV_WORKSPACE_MB", "lots")
    set_workspace_budget(None)
    with pytest.raises(ValueError, match="DEFORMCONV_WORKSPACE_MB must be a number of MiB"):
        get_workspace_budget()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "nbytes must be a positive int, got 0"),
        (-5, ValueError, "nbytes must be a positive int, got -5"),
        (1.5, TypeError, "nbytes must be an int, got float 1.5"),
        (True, TypeError, "nbytes must be an int, got bool True"),
    ],
)
def test_bad_budgets_are_refused(value, error, message) -> None:
    with pytest.raises(error, match=message):
        set_workspace_budget(value)
    with pytest.raises(error, match=message), workspace_budget(value):
        pass
    assert get_workspace_budget() == DEFAULT


def test_a_backward_on_another_thread_keeps_the_forward_budget(monkeypatch) -> None:
    # CUDA runs backward passes on autograd's device threads, which do not see the forward's
    # context; here the backward is run from a fresh thread on purpose.
    import torch

    from deformconv import deform_conv2d
    from deformconv.ops import _portable, use_kernel

    seen: list[int] = []

    def recording(batch: int, bytes_per_image: int) -> list[tuple[int, int]]:
        seen.append(get_workspace_budget())
        return batch_chunks(batch, bytes_per_image)

    monkeypatch.setattr(_portable, "batch_chunks", recording)
    x = torch.rand(2, 2, 5, 5, requires_grad=True)
    w = torch.rand(3, 2, 3, 3)
    with use_kernel("portable", "cpu"), workspace_budget(4096):
        out = deform_conv2d(x, torch.zeros(2, 18, 3, 3), w)
        thread = threading.Thread(target=out.sum().backward)
        thread.start()
        thread.join(timeout=60)
    assert x.grad is not None
    assert seen == [4096, 4096]
