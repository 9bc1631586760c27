from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_two_processes_hold_identical_parameters(tmp_path):
    # --standalone gives torchrun a free local rendezvous port, so parallel runs cannot clash.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # They started apart, were synchronised, trained, and ended identical.
    assert any(
        not torch.equal(ranks[0]["initial"][k], ranks[1]["initial"][k]) for k in ranks[0]["initial"]
    )
    assert any(
        not torch.equal(ranks[0]["initial"][k], ranks[0]["state"][k]) for k in ranks[0]["initial"]
    )
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    assert ranks[0]["val"] == ranks[1]["val"]
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"]
