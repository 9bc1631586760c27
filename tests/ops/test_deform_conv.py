"""The deformable-convolution operator: parity with torchvision and a naive reference, gradients,
dtypes and layouts, the custom-op contract, bounded memory and argument checks."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from deform_reference import deform_conv2d_naive
from deformconv import deform_conv2d
from deformconv.ops import _portable, output_size


@dataclass(frozen=True)
class Config:
    batch: int
    in_channels: int
    out_channels: int
    groups: int
    offset_groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    size: tuple[int, int]
    mask: bool
    bias: bool

    def out_size(self) -> tuple[int, int]:
        return output_size(*self.size, self.kernel, self.stride, self.padding, self.dilation)

    def __str__(self) -> str:
        return (
            f"b{self.batch}-c{self.in_channels}-o{self.out_channels}-g{self.groups}"
            f"-og{self.offset_groups}-k{self.kernel}-s{self.stride}-p{self.padding}"
            f"-d{self.dilation}-{self.size}-{'v2' if self.mask else 'v1'}"
            f"{'-bias' if self.bias else ''}"
        )


def _random_configs(count: int, seed: int) -> list[Config]:
    rng = random.Random(seed)
    configs: list[Config] = []
    while len(configs) < count:
        groups = rng.choice([1, 1, 2])
        offset_groups = rng.choice([1, 1, 2, 4])
        lcm = groups * offset_groups // np.gcd(groups, offset_groups)
        cfg = Config(
            batch=[0, 1, 2, 3][len(configs) % 4],
            in_channels=lcm * rng.choice([1, 2]),
            out_channels=groups * rng.choice([1, 2, 3]),
            groups=groups,
            offset_groups=offset_groups,
            kernel=(rng.choice([1, 2, 3]), rng.choice([1, 2, 3])),
            stride=(rng.choice([1, 2]), rng.choice([1, 2, 3])),
            padding=(rng.choice([0, 1, 2]), rng.choice([0, 1])),
            dilation=(rng.choice([1, 2]), rng.choice([1, 3])),
            size=(rng.choice([5, 6, 7, 9]), rng.choice([4, 7, 8])),
            mask=rng.random() < 0.6,
            bias=rng.random() < 0.7,
        )
        if min(cfg.out_size()) >= 1:
            configs.append(cfg)
    return configs


CONFIGS = _random_configs(56, seed=2024)


def _tensors(cfg: Config, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = cfg.out_size()
    taps = cfg.kernel[0] * cfg.kernel[1]

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return {
        "input": rand(cfg.batch, cfg.in_channels, *cfg.size),
        "offset": rand(cfg.batch, 2 * cfg.offset_groups * taps, out_h, out_w, scale=2.0),
        "weight": rand(cfg.out_channels, cfg.in_channels // cfg.groups, *cfg.kernel),
        "bias": rand(cfg.out_channels) if cfg.bias else None,
        "mask": torch.sigmoid(rand(cfg.batch, cfg.offset_groups * taps, out_h, out_w))
        if cfg.mask
        else None,
    }


def _forward_backward(fn, cfg: Config, tensors: dict, grad_seed: int = 1):
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    out = fn(
        leaves["input"],
        leaves["offset"],
        leaves["weight"],
        leaves.get("bias"),
        stride=cfg.stride,
        padding=cfg.padding,
        dilation=cfg.dilation,
        mask=leaves.get("mask"),
    )
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], upstream, allow_unused=True)
    return out.detach(), dict(zip(names, grads, strict=True))


TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_matches_torchvision(cfg: Config, dtype: torch.dtype) -> None:
    tensors = _tensors(cfg, dtype)
    ours, our_grads = _forward_backward(deform_conv2d, cfg, tensors)
    theirs, their_grads = _forward_backward(torchvision.ops.deform_conv2d, cfg, tensors)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("cfg", CONFIGS[1:56:5], ids=str)
def test_matches_naive_reference(cfg: Config) -> None:
    tensors = _tensors(cfg, torch.float64, seed=3)
    ours = deform_conv2d(
        tensors["input"],
        tensors["offset"],
        tensors["weight"],
        tensors["bias"],
        stride=cfg.stride,
        padding=cfg.padding,
        dilation=cfg.dilation,
        mask=tensors["mask"],
    )
    expected = deform_conv2d_naive(
        tensors["input"].numpy(),
        tensors["offset"].numpy(),
        tensors["weight"].numpy(),
        None if tensors["bias"] is None else tensors["bias"].numpy(),
        cfg.stride,
        cfg.padding,
        cfg.dilation,
        None if tensors["mask"] is None else tensors["mask"].numpy(),
    )
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.batch > 0][:8], ids=str)
def test_portable_kernel_matches_dispatched_kernel(cfg: Config) -> None:
    """The portable kernel (the fallback on every device) agrees with what CPU dispatch runs."""
    tensors = _tensors(cfg, torch.float64, seed=5)
    params = (cfg.stride, cfg.padding, cfg.dilation)
    args = [tensors[k] for k in ("input", "offset", "mask", "weight", "bias")]
    portable = _portable.forward(*args, *params)
    dispatched = deform_conv2d(
        tensors["input"],
        tensors["offset"],
        tensors["weight"],
        tensors["bias"],
        *params,
        mask=tensors["mask"],
    )
    torch.testing.assert_close(portable, dispatched, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(portable)
    grads = _portable.backward(upstream, *args, *params)
    ref = torch.ops.deformconv.deform_conv2d_backward(
        upstream,
        *args,
        cfg.stride[0],
        cfg.stride[1],
        cfg.padding[0],
        cfg.padding[1],
        cfg.dilation[0],
        cfg.dilation[1],
    )
    for ours, theirs in zip(grads, ref, strict=True):
        if ours is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


GRADCHECK_CASES = [
    dict(stride=1, padding=1, dilation=1, offset_groups=1, groups=1, mask=True),
    dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2), offset_groups=2, groups=2, mask=True),
    dict(stride=1, padding=0, dilation=2, offset_groups=1, groups=1, mask=False),
]


@pytest.mark.parametrize(
    "case", GRADCHECK_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values())
)
def test_gradcheck(case: dict) -> None:
    gen = torch.Generator().manual_seed(7)
    kh, kw = 2, 3
    c, o = 4, 2
    s = F.conv2d(
        torch.zeros(1, 1, 6, 7),
        torch.zeros(1, 1, kh, kw),
        **{k: case[k] for k in ("stride", "padding", "dilation")},
    ).shape[2:]
    taps = kh * kw
    og = case["offset_groups"]
    x = torch.randn(2, c, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    offset = (
        torch.randn(2, 2 * og * taps, *s, dtype=torch.float64, generator=gen) * 1.5
    ).requires_grad_()
    weight = torch.randn(
        o, c // case["groups"], kh, kw, dtype=torch.float64, generator=gen, requires_grad=True
    )
    bias = torch.randn(o, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(2, og * taps, *s, dtype=torch.float64, generator=gen, requires_grad=True)
    inputs = (x, offset, weight, bias, mask) if case["mask"] else (x, offset, weight, bias)

    def fn(*args):
        return deform_conv2d(
            *args[:4],
            stride=case["stride"],
            padding=case["padding"],
            dilation=case["dilation"],
            mask=args[4] if len(args) == 5 else None,
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "stride,padding,dilation", [(1, 1, 1), (2, 0, 1), ((1, 2), (2, 1), (2, 1))]
)
def test_zero_offsets_unit_mask_equal_conv2d(dtype, stride, padding, dilation) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, 10, generator=gen).to(dtype)
    w = torch.randn(4, 3, 3, 3, generator=gen).to(dtype)
    b = torch.randn(4, generator=gen).to(dtype)
    expected = F.conv2d(x, w, b, stride, padding, dilation, groups=2)
    offset = torch.zeros(2, 2 * 2 * 9, *expected.shape[2:], dtype=dtype)
    mask = torch.ones(2, 2 * 9, *expected.shape[2:], dtype=dtype)
    tol = TOLERANCE[dtype] * 10
    torch.testing.assert_close(
        deform_conv2d(x, offset, w, b, stride, padding, dilation, mask),
        expected,
        rtol=tol,
        atol=tol,
    )
    torch.testing.assert_close(
        deform_conv2d(x, offset, w, b, stride, padding, dilation), expected, rtol=tol, atol=tol
    )


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]``, zero where that falls outside."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (abs(dx), abs(dx), abs(dy), abs(dy)))
    return padded[..., abs(dy) + dy : abs(dy) + dy + h, abs(dx) + dx : abs(dx) + dx + w]


@pytest.mark.parametrize("dy,dx", [(1, 0), (0, -2), (-1, 3), (2, 2), (-9, 0)])
def test_integer_offsets_equal_shifted_convolution(dy: int, dx: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 9, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64)
    expected = F.conv2d(_shift(F.pad(x, (1, 1, 1, 1)), dy, dx), w)
    offset = torch.zeros(2, 18, 8, 9, dtype=torch.float64)
    offset[:, 0::2] = dy
    offset[:, 1::2] = dx
    torch.testing.assert_close(deform_conv2d(x, offset, w, padding=1), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_torchvision_in_float32(dtype: torch.dtype) -> None:
    # The reference is torchvision.ops.deform_conv2d in float32 on the same (rounded) values,
    # independent of our kernels; the tolerance is that of one rounding to the low dtype.
    cfg = CONFIGS[3]
    tensors = _tensors(cfg, torch.float32)
    low = {k: None if v is None else v.to(dtype) for k, v in tensors.items()}
    out, grads = _forward_backward(deform_conv2d, cfg, low)
    ref, ref_grads = _forward_backward(
        torchvision.ops.deform_conv2d,
        cfg,
        {k: None if v is None else v.float() for k, v in low.items()},
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), ref_grads[name], rtol=3e-2, atol=3e-2, msg=name)


def test_channels_last_and_noncontiguous_inputs() -> None:
    cfg = Config(2, 4, 6, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), (8, 8), True, True)
    tensors = _tensors(cfg, torch.float64)
    ref, ref_grads = _forward_backward(deform_conv2d, cfg, tensors)
    strided = dict(tensors)
    strided["input"] = tensors["input"].to(memory_format=torch.channels_last)
    strided["weight"] = tensors["weight"].to(memory_format=torch.channels_last)
    # A transposed view: non-contiguous with the same values.
    strided["offset"] = tensors["offset"].transpose(2, 3).contiguous().transpose(2, 3)
    strided["mask"] = tensors["mask"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided["offset"].is_contiguous() and not strided["mask"].is_contiguous()
    out, grads = _forward_backward(deform_conv2d, cfg, strided)
    torch.testing.assert_close(out, ref)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)


def test_batch_zero() -> None:
    x = torch.zeros(0, 4, 7, 7, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    offset = torch.zeros(0, 18, 5, 5, requires_grad=True)
    out = deform_conv2d(x, offset, w)
    assert out.shape == (0, 3, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and offset.grad.shape == offset.shape
    assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
def test_non_finite_and_huge_offsets_read_zero(bad: float) -> None:
    """A tap at a non-finite or far-away position contributes zero and gets zero gradient."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    offset = torch.randn(1, 18, 4, 4, generator=gen, dtype=torch.float64)
    mask = torch.rand(1, 9, 4, 4, generator=gen, dtype=torch.float64)
    poisoned = offset.clone()
    poisoned[0, 8, 1, 2] = bad  # tap 4, vertical component, at output (1, 2)
    poisoned.requires_grad_(True)
    out = deform_conv2d(x, poisoned, w, mask=mask)
    silenced = mask.clone()
    silenced[0, 4, 1, 2] = 0
    expected = deform_conv2d(x, offset, w, mask=silenced)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.isfinite(poisoned.grad).all()
    assert poisoned.grad[0, 8, 1, 2] == 0 and poisoned.grad[0, 9, 1, 2] == 0


def test_repeated_backward_is_bit_identical() -> None:
    cfg = Config(3, 8, 8, 1, 2, (3, 3), (1, 1), (1, 1), (1, 1), (9, 9), True, True)
    tensors = _tensors(cfg, torch.float32)
    _, first = _forward_backward(deform_conv2d, cfg, tensors)
    _, second = _forward_backward(deform_conv2d, cfg, tensors)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_opcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=gen, requires_grad=True)
    offset = torch.randn(2, 2 * 2 * 9, 6, 6, generator=gen, requires_grad=True)
    mask = torch.rand(2, 2 * 9, 6, 6, generator=gen, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    for m, bias in ((mask, b), (None, None)):
        args = (x, offset, m, w, bias, 1, 1, 1, 1, 1, 1)
        torch.library.opcheck(torch.ops.deformconv.deform_conv2d.default, args)
    upstream = torch.randn(2, 6, 6, 6, generator=gen)
    torch.library.opcheck(
        torch.ops.deformconv.deform_conv2d_backward.default,
        (
            upstream,
            x.detach(),
            offset.detach(),
            mask.detach(),
            w.detach(),
            b.detach(),
            1,
            1,
            1,
            1,
            1,
            1,
        ),
    )


def test_compile_fullgraph_forward_and_backward() -> None:
    torch._dynamo.reset()

    def fn(x, offset, w, b, mask):
        return deform_conv2d(x, offset, w, b, stride=1, padding=1, mask=mask).relu().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(2, 4, 7, 7, generator=gen),
        torch.randn(2, 18, 7, 7, generator=gen),
        torch.randn(3, 4, 3, 3, generator=gen),
        torch.randn(3, generator=gen),
        torch.rand(2, 9, 7, 7, generator=gen),
    ]
    leaves = [a.clone().requires_grad_() for a in args]
    expected = fn(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    leaves = [a.clone().requires_grad_() for a in args]
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_export() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 4, 3, 3))

        def forward(self, x, offset, mask):
            return deform_conv2d(x, offset, self.weight, padding=1, mask=mask)

    args = (torch.randn(1, 4, 6, 6), torch.randn(1, 18, 6, 6), torch.rand(1, 9, 6, 6))
    exported = torch.export.export(Net(), args)
    assert any("deformconv.deform_conv2d" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*args), Net.forward(exported.module(), *args))


def test_forward_backward_of_a_large_batch_stays_within_the_budget() -> None:
    """Batch 256, 64 channels, 32x32: the column buffer alone would be 604 MB if unchunked."""
    script = textwrap.dedent(
        """
        import resource, torch
        from deformconv import deform_conv2d
        from deformconv.ops import set_workspace_budget
        torch.set_num_threads(2)
        budget = 32 * 2**20
        set_workspace_budget(budget)
        def run(n):
            x = torch.randn(n, 64, 32, 32, requires_grad=True)
            off = torch.randn(n, 18, 32, 32, requires_grad=True)
            m = torch.rand(n, 9, 32, 32, requires_grad=True)
            w = torch.randn(64, 64, 3, 3, requires_grad=True)
            out = deform_conv2d(x, off, w, padding=1, mask=m)
            out.backward(torch.ones_like(out))
            return x, off, m, w, out
        run(2)
        tensors = [torch.randn(256, 64, 32, 32) for _ in range(3)]  # touch memory for x, out, grad
        del tensors
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kept = run(256)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    added = int(result.stdout.strip().splitlines()[-1])
    # Inputs, outputs and gradients of the op: x, out, grad_out, grad_x (64 ch) plus
    # offsets, masks and their gradients (27 ch), float32.
    tensors = 256 * 32 * 32 * 4 * (4 * 64 + 2 * 27)
    unchunked_columns = 256 * 64 * 9 * 32 * 32 * 4
    assert added < tensors + 12 * 32 * 2**20, (added, tensors)
    assert added < unchunked_columns


@pytest.mark.parametrize("position", [-1.0, -0.5, 0.0, 5.0, 5.5, 6.0, -1.5], ids=str)
def test_gradients_on_the_image_edge_match_torchvision(position: float) -> None:
    """Taps placed exactly on and around the border, where one-sided derivatives differ."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 2, 1, 1, generator=gen, dtype=torch.float64)
    mask = torch.rand(1, 1, 6, 6, generator=gen, dtype=torch.float64)
    rows = torch.arange(6, dtype=torch.float64).view(6, 1).expand(6, 6)
    cols = torch.arange(6, dtype=torch.float64).view(1, 6).expand(6, 6)
    # Every output pixel samples row `position` (first offset) or column `position` (second).
    for dy, dx in ((position - rows, torch.zeros(6, 6)), (torch.zeros(6, 6), position - cols)):
        offset = torch.stack((dy, dx)).unsqueeze(0)
        tensors = {"input": x, "offset": offset, "weight": w, "bias": None, "mask": mask}
        cfg = Config(1, 2, 2, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), (6, 6), True, False)
        ours, our_grads = _forward_backward(deform_conv2d, cfg, tensors)
        theirs, their_grads = _forward_backward(torchvision.ops.deform_conv2d, cfg, tensors)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        for name in our_grads:
            torch.testing.assert_close(
                our_grads[name], their_grads[name], rtol=1e-12, atol=1e-12, msg=name
            )
