"""Whole-network CPU benchmark: ResNet-50 with DCNv2 (R50-DCN) against the plain ResNet-50.

    python benchmarks/bench_resnet.py

The protocol:

- the network is torchvision's ResNet-50 (random weights); its R50-DCN version, as in
  mmdetection's recipe (``stage_with_dcn=(False, True, True, True)``), makes conv2 of every
  bottleneck of layer2-4 (13 layers) a DCNv2 layer whose offsets and mask come from a 3x3
  convolution of the layer's input (``deformconv.tools.convert_to_deformable``). The batch
  norms get the statistics of one random batch and the offset branch random weights, so that
  offsets are a pixel or so (standard deviation 1.0-1.5 in every layer, in both modes) rather
  than zero: the layers sample between pixels, as a trained network does;
- "torchvision's op" is the same network with the same weights where each deformable layer
  calls ``torchvision.ops.deform_conv2d`` instead (a small converter below);
- float32, ``torch.set_num_threads(2)`` (``--threads``); inference: eval mode,
  ``torch.no_grad()``, a batch of 1x3x512x512; training step: train mode, forward of
  2x3x320x320, the sum of the output as the loss and its backward pass (no optimizer step);
- the three networks are timed in interleaved rounds (``--rounds``, default 3) after a warm-up
  call each, so a drift of the machine's speed affects all alike; each figure is the median of
  its rounds, quoted with its ratio to the plain ResNet-50 measured in the same run.

It prints a Markdown table; ``benchmarks/bench_cpu.py`` appends the same rows to its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

THREADS = 2
INFERENCE_INPUT = (1, 3, 512, 512)
TRAINING_INPUT = (2, 3, 320, 320)
NETWORKS = ("plain", "deformconv", "torchvision")
LABELS = {
    "plain": "plain ResNet-50",
    "deformconv": "R50-DCN, deformconv",
    "torchvision": "R50-DCN, torchvision's op",
}


class TorchvisionDCN(nn.Module):
    """A ``deformconv.nn.DeformableConv2d`` computed with ``torchvision.ops.deform_conv2d``:
    the same weights, offset branch and mask (``2 * sigmoid``, deformconv's convention)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.conv_offset = layer.conv_offset
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.taps = layer.kernel_size[0] * layer.kernel_size[1] * layer.offset_groups

    def forward(self, input: Tensor) -> Tensor:
        import torchvision

        out = self.conv_offset(input)
        offset, mask = out[:, : 2 * self.taps], 2 * torch.sigmoid(out[:, 2 * self.taps :])
        return torchvision.ops.deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )


def networks(seed: int = 0) -> dict[str, nn.Module]:
    """The plain ResNet-50 and its two R50-DCN versions (deformconv's and torchvision's op)."""
    import torchvision

    from deformconv.nn import DeformableConv2d
    from deformconv.tools import convert_to_deformable

    torch.manual_seed(seed)
    plain = torchvision.models.resnet50(weights=None)
    _calibrate_batch_norm(plain, seed)
    dcn = convert_to_deformable(plain, stages=(False, True, True, True)).model
    gen = torch.Generator().manual_seed(seed)
    for module in dcn.modules():
        if isinstance(module, DeformableConv2d):
            branch = module.conv_offset
            fan_in = branch.weight[0].numel()
            with torch.no_grad():
                branch.weight.copy_(
                    torch.randn(branch.weight.shape, generator=gen) * 2 / fan_in**0.5
                )
    peer = _with_torchvision_op(dcn)
    return {"plain": plain, "deformconv": dcn, "torchvision": peer}


def _calibrate_batch_norm(model: nn.Module, seed: int) -> None:
    """Give the batch norms the statistics of one batch, as training would: with the default
    statistics (mean 0, variance 1) a random network's activations grow from stage to stage in
    eval mode, and so would the offsets (to 20-30 pixels in layer4, most of them outside the
    image); with these, they stay a pixel or so in both modes."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(TRAINING_INPUT, generator=torch.Generator().manual_seed(seed)))
    for norm in norms:
        norm.momentum = 0.1


def _with_torchvision_op(model: nn.Module) -> nn.Module:
    import copy

    from deformconv.nn import DeformableConv2d

    peer = copy.deepcopy(model)
    for name, module in list(peer.named_modules()):
        if isinstance(module, DeformableConv2d):
            parent, _, attr = name.rpartition(".")
            setattr(peer.get_submodule(parent), attr, TorchvisionDCN(module))
    return peer


def steps(nets: dict[str, nn.Module]) -> dict[tuple[str, str], Callable[[], object]]:
    """(network, workload) -> a call of that workload."""
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(INFERENCE_INPUT, generator=gen)
    batch = torch.randn(TRAINING_INPUT, generator=gen)
    calls = {}
    for name, net in nets.items():

        def infer(net=net):
            net.eval()
            with torch.no_grad():
                return net(image)

        def train(net=net):
            net.train()
            net.zero_grad(set_to_none=True)
            net(batch).sum().backward()

        calls[(name, "inference")] = infer
        calls[(name, "training step")] = train
    return calls


def measure(rounds: int = 3, names: tuple[str, ...] = NETWORKS) -> dict[tuple[str, str], float]:
    """Median wall time in ms of each (network, workload), the networks interleaved."""
    nets = networks()
    calls = {key: call for key, call in steps(nets).items() if key[0] in names}
    for call in calls.values():
        call()  # warm-up: compiles kernels, sizes buffers
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def rows(results: dict[tuple[str, str], float]) -> list[str]:
    """Markdown rows: one per workload, a column per network, ratios to the plain network."""
    lines = []
    for workload, shape in (("inference", INFERENCE_INPUT), ("training step", TRAINING_INPUT)):
        plain = results[("plain", workload)]
        cells = [f"{plain:.0f}"]
        for name in NETWORKS[1:]:
            value = results.get((name, workload))
            cells.append("-" if value is None else f"{value:.0f} ({value / plain:.2f}x)")
        size = "x".join(str(n) for n in shape)
        lines.append(f"| {workload}, {size} | " + " | ".join(cells) + " |")
    return lines


def table(results: dict[tuple[str, str], float]) -> str:
    header = "| workload (ms) | " + " | ".join(LABELS[n] for n in NETWORKS) + " |"
    return "\n".join([header, "|---" * (len(NETWORKS) + 1) + "|", *rows(results)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--networks",
        default=",".join(NETWORKS),
        help="comma-separated networks (default: all; plain is always timed): "
        + ", ".join(NETWORKS),
    )
    parser.add_argument("--threads", type=int, default=THREADS, help=f"default {THREADS}")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    chosen = ("plain", *(n for n in NETWORKS[1:] if n in args.networks.split(",")))
    load = os.getloadavg()[0]
    results = measure(args.rounds, chosen)
    print(
        f"`python benchmarks/bench_resnet.py` ({args.threads} threads; load average {load:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after). Medians of {args.rounds} interleaved rounds, "
        "in ms; in brackets the ratio to the plain ResNet-50."
    )
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
