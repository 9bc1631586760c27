"""Random DCNv3/DCNv4 configurations and their tensors, shared by the operator and kernel tests."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dcnv_reference import output_size, points


@dataclass(frozen=True)
class Case:
    batch: int
    height: int
    width: int
    group: int
    group_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]  # (pad_h, pad_w) as the operators take them
    dilation: tuple[int, int]
    offset_scale: float
    remove_center: bool
    contiguous: bool = True

    @property
    def points(self) -> int:
        return len(points(*self.kernel, self.remove_center))

    def out_size(self, packed: bool) -> tuple[int, int]:
        # DCNv3's reference pads H by pad_w and W by pad_h; DCNv4's CUDA kernel does not swap.
        rows, cols = (self.pad[0], self.pad[1]) if packed else (self.pad[1], self.pad[0])
        return output_size(
            self.height, self.width, self.kernel, self.stride, rows, cols, self.dilation
        )

    def args(self) -> tuple:
        """kernel_h ... remove_center, in the operators' order (without DCNv4's im2col_step)."""
        return (
            *self.kernel, *self.stride, *self.pad, *self.dilation, self.group,
            self.group_channels, self.offset_scale, self.remove_center,
        )  # fmt: skip

    def __str__(self) -> str:
        return (
            f"b{self.batch}-{self.height}x{self.width}-g{self.group}x{self.group_channels}"
            f"-k{self.kernel}-s{self.stride}-p{self.pad}-d{self.dilation}-os{self.offset_scale}"
            f"{'-rc' if self.remove_center else ''}{'' if self.contiguous else '-strided'}"
        )


def random_cases(count: int, seed: int, packed: bool) -> list[Case]:
    """``count`` configurations with a valid output, covering batch 0 to 3, strides and
    dilations 1 and 2, paddings 0 to 2 (unequal included), offset scales other than 1,
    1x1 / 2x3 / 3x3 / 5x5 / non-square kernels, remove_center, group widths 1 to 17 (few multiples
    of 16) and strided tensors."""
    rng = random.Random(seed)
    cases: list[Case] = []
    while len(cases) < count:
        kernel = rng.choice([(1, 1), (3, 3), (3, 3), (5, 5), (2, 3), (3, 1), (1, 2), (2, 2)])
        rc = kernel[0] == kernel[1] and kernel[0] % 2 == 1 and kernel[0] > 1 and rng.random() < 0.4
        case = Case(
            batch=[0, 1, 2, 3][len(cases) % 4],
            height=rng.choice([4, 5, 7, 9]),
            width=rng.choice([3, 6, 8]),
            group=rng.choice([1, 2, 3, 4]),
            group_channels=rng.choice([1, 2, 3, 5, 8, 16, 17]),
            kernel=kernel,
            stride=(rng.choice([1, 2]), rng.choice([1, 2])),
            pad=(rng.choice([0, 1, 2]), rng.choice([0, 1, 2])),
            dilation=(rng.choice([1, 2]), rng.choice([1, 2])),
            offset_scale=rng.choice([1.0, 1.0, 0.5, 1.75]),
            remove_center=rc,
            contiguous=rng.random() < 0.7,
        )
        if min(case.out_size(packed)) >= 1:
            cases.append(case)
    return cases


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (a transposed copy, transposed back)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def tensors(case: Case, dtype: torch.dtype, packed: bool, seed: int = 0) -> dict:
    """Input, offsets (``randn * 2``, as the benchmarks) and mask (softmax-like, positive) of a
    case; for DCNv4 packed into ``offset_mask`` padded to a multiple of 8 with junk values in the
    padding (which the operator must ignore)."""
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = case.out_size(packed)
    n, g, p = case.batch, case.group, case.points

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = rand(n, case.height, case.width, g * case.group_channels)
    offset = rand(n, out_h, out_w, g, p, 2, scale=2.0)
    mask = torch.rand(n, out_h, out_w, g, p, generator=gen, dtype=torch.float64).to(dtype)
    if not packed:
        result = {"input": x, "offset": offset.flatten(3), "mask": mask.flatten(3)}
    else:
        width = -(-(3 * g * p) // 8) * 8
        body = torch.cat((offset.flatten(4), mask), dim=-1).flatten(3)
        junk = rand(n, out_h, out_w, width - 3 * g * p, scale=100.0)
        result = {"input": x, "offset_mask": torch.cat((body, junk), dim=-1)}
    if not case.contiguous:
        result = {k: _strided(v) for k, v in result.items()}
    return result


def upstream_grad(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
