"""Run by test_demo_ddp.py under ``torchrun --nproc_per_node=2``: each process starts from
different random weights, trains through :func:`deformconv.demo.train.train` for a few steps and
saves what it holds to ``OUT/rank<R>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from deformconv.demo.data import Deformation, Split
from deformconv.demo.models import DigitCNN, ModelConfig
from deformconv.demo.train import TrainConfig, init_distributed, train


def main(out: Path) -> None:
    context = init_distributed("cpu")
    assert context.world_size == 2 and dist.get_backend() == "gloo"
    # Different weights per process: DistributedDataParallel must copy rank 0's to the others.
    torch.manual_seed(100 + context.rank)
    model = DigitCNN(ModelConfig(channels=(4, 4, 8, 8), deformable=2, image_size=16))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 16, 16, generator=g)
    labels = torch.randint(0, 10, (40,), generator=g)
    split = Split(images, labels)
    result = train(model, split, split, TrainConfig(epochs=2, batch_size=16), Deformation())
    torch.save(
        {
            "initial": initial,
            "state": model.state_dict(),
            "val": [r.val_accuracy for r in result.history],
            "best_epoch": result.best_epoch,
        },
        out / f"rank{context.rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
