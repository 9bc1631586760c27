"""Separability of 2-D kernels: numerical rank, exact 1-D factors, best separable approximations.

A ``k x k`` kernel ``K`` is separable, i.e. equal to a ``k x 1`` convolution followed by a
``1 x k`` one, exactly when it is an outer product ``K = column ⊗ row``: when its matrix rank
is 1. Sobel, Scharr, Prewitt, box, Gaussian and binomial kernels are; the Laplacian is not (rank
2). The singular value decomposition ``K = sum_t s_t u_t v_t^T`` gives both the numerical rank
and, by the Eckart-Young theorem, the best sum of ``r`` separable terms in the Frobenius norm,
whose relative error is ``sqrt(s_{r+1}^2 + ... ) / sqrt(s_1^2 + ...)``.

:func:`factorize_kernel` is the entry point; layers and whole models are converted by
:mod:`deformconv.tools.factorize`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deformconv._validation import check_int

__all__ = ["KernelFactorization", "factorize_kernel"]


def _as_kernel(kernel: Tensor | np.ndarray | Sequence[Sequence[float]]) -> tuple[Tensor, float]:
    """The kernel as a float64 ``Tensor[n, n]`` and the machine epsilon of its own dtype."""
    if isinstance(kernel, Tensor):
        source = kernel.detach().cpu()
    else:
        try:
            source = torch.as_tensor(np.asarray(kernel, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"kernel must be a 2-D tensor, array or nested list of numbers, got {kernel!r}"
            ) from exc
    if source.dtype == torch.bool or source.is_complex():
        raise TypeError(f"kernel must hold real numbers, got dtype {source.dtype}")
    if source.dim() != 2:
        raise ValueError(f"kernel must be 2-D (height, width), got shape {tuple(source.shape)}")
    if source.numel() == 0:
        raise ValueError(f"kernel must not be empty, got shape {tuple(source.shape)}")
    if source.shape[0] != source.shape[1]:
        raise ValueError(
            f"kernel must be square (k x k), got {source.shape[0]} x {source.shape[1]}; "
            "layers with non-square kernels are handled by deformconv.tools.factorize"
        )
    eps = torch.finfo(source.dtype).eps if source.dtype.is_floating_point else np.finfo(float).eps
    values = source.to(torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("kernel must hold finite values only, got NaN or infinity")
    return values, float(eps)


def _orient(column: Tensor, row: Tensor) -> tuple[Tensor, Tensor]:
    """Flip both signs so the factor with a non-zero sum (the smoothing one) sums positive."""
    for factor in (column, row):
        total = float(factor.sum())
        if abs(total) > 1e-12 * float(factor.abs().sum()):
            return (column, row) if total > 0 else (-column, -row)
    first = column[column.abs().argmax()]
    return (column, row) if first > 0 else (-column, -row)


def _integer_pair(kernel: Tensor) -> tuple[Tensor, Tensor] | None:
    """Integer factors of an integer rank-1 kernel, e.g. ``[1, 2, 1]`` and ``[-1, 0, 1]``."""
    if not torch.equal(kernel, kernel.round()):
        return None
    pivot = int(kernel.abs().argmax())
    i, j = divmod(pivot, kernel.shape[1])
    column = kernel[:, j] / math.gcd(*(int(v) for v in kernel[:, j]))
    row = kernel[i, :] / column[i]
    if not torch.equal(row, row.round()) or not torch.equal(torch.outer(column, row), kernel):
        return None
    return column, row


def _balanced_pair(u: Tensor, s: float, v: Tensor) -> tuple[Tensor, Tensor]:
    """Rank-1 factors ``a u`` and ``(s / a) v``; equal sums when possible (a Gaussian's ``g, g``)."""
    su, sv = float(u.sum()), float(v.sum())
    a = math.sqrt(s * sv / su) if su * sv > 1e-24 else math.sqrt(s)
    return u * a, v * (s / a)


@dataclass(frozen=True)
class KernelFactorization:
    """What :func:`factorize_kernel` found out about a kernel.

    Attributes:
        kernel: the kernel, ``Tensor[k, k]`` in float64.
        rank: numerical rank: singular values at most ``tol * singular_values[0]`` count as 0.
        tol: the relative tolerance used for ``rank``.
        singular_values: ``Tensor[k]``, descending.
        relative_errors: entry ``r - 1`` is ``||K - K_r|| / ||K||`` (Frobenius) for the best sum
            ``K_r`` of ``r`` separable terms, ``r = 1 .. k``; the last entry is 0.
        column: when ``rank <= 1``, the vertical factor ``Tensor[k]`` (a ``k x 1`` kernel) with
            ``kernel == outer(column, row)``; ``None`` otherwise.
        row: when ``rank <= 1``, the horizontal factor ``Tensor[k]`` (a ``1 x k`` kernel).
        exact: whether ``rank`` separable terms reproduce the kernel to the precision of its
            dtype (``False`` when a loose ``tol`` gave a lower rank than that).
    """

    kernel: Tensor
    rank: int
    tol: float
    singular_values: Tensor
    relative_errors: tuple[float, ...]
    column: Tensor | None
    row: Tensor | None
    exact: bool

    @property
    def separable(self) -> bool:
        """Whether the kernel is exactly one ``k x 1`` then one ``1 x k`` convolution."""
        return self.rank <= 1

    def terms(self, r: int) -> tuple[Tensor, Tensor]:
        """The best ``r`` separable terms: ``kernel ≈ sum_t outer(columns[t], rows[t])``.

        Args:
            r: number of terms, ``1 <= r <= k``.

        Returns:
            ``(columns, rows)``, each ``Tensor[r, k]``. For ``r = 1`` and a separable kernel they
            are :attr:`column` and :attr:`row`.
        """
        check_int(r, "r", 1, self.kernel.shape[0])
        if r == 1 and self.column is not None and self.row is not None:
            return self.column[None], self.row[None]
        u, s, vh = torch.linalg.svd(self.kernel)
        scale = s[:r].sqrt()
        return (u[:, :r] * scale).T.contiguous(), vh[:r] * scale[:, None]

    def approximation(self, r: int) -> Tensor:
        """The best ``r``-term separable approximation of the kernel, ``Tensor[k, k]``."""
        columns, rows = self.terms(r)
        return columns.T @ rows

    def best_rank(self, max_error: float) -> int:
        """The fewest separable terms whose relative error is at most ``max_error``."""
        if not (isinstance(max_error, int | float) and max_error >= 0):
            raise ValueError(f"max_error must be a number >= 0, got {max_error!r}")
        return next(r for r, e in enumerate(self.relative_errors, 1) if e <= max_error)

    def summary(self) -> str:
        """A one-line verdict, e.g. ``"cannot be separated exactly: rank 2 ..."``."""
        tol = f"singular values <= {self.tol:.2g} x the largest count as zero"
        if self.rank == 0:
            return f"all zeros: rank 0 ({tol})"
        error = self.relative_errors[self.rank - 1]
        if self.separable:
            assert self.column is not None and self.row is not None
            factors = f"column {_format(self.column)} x row {_format(self.row)}"
            if self.exact:
                return f"separable exactly (rank 1): {factors}"
            return f"separable within the tolerance (rank 1, {tol}): {factors}, relative error {error:.4g}"
        reach = "are exact" if self.exact else f"leave a relative error of {error:.4g}"
        return (
            f"cannot be separated exactly: rank {self.rank} ({tol}); best rank-1 "
            f"approximation has relative error {self.relative_errors[0]:.4g}; "
            f"{self.rank} separable terms {reach}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and lists, ready for ``json.dumps``."""
        return {
            "kernel": self.kernel.tolist(),
            "rank": self.rank,
            "tol": self.tol,
            "separable": self.separable,
            "singular_values": self.singular_values.tolist(),
            "relative_errors": list(self.relative_errors),
            "column": None if self.column is None else self.column.tolist(),
            "row": None if self.row is None else self.row.tolist(),
            "exact": self.exact,
            "summary": self.summary(),
        }


def _format(vector: Tensor) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in vector.tolist()) + "]"


def factorize_kernel(
    kernel: Tensor | np.ndarray | Sequence[Sequence[float]], tol: float | None = None
) -> KernelFactorization:
    """Test a 2-D kernel for separability, factor it when it is, approximate it when it is not.

    The work is done in float64 on a singular value decomposition. The default tolerance
    follows ``numpy.linalg.matrix_rank`` with the epsilon of the kernel's own dtype (a float32
    Gaussian is rank 1 although its float32 rounding is not exactly so).

    Args:
        kernel: ``k x k`` real values: a tensor, NumPy array or nested list (see
            :func:`deformconv.tools.kernels.named_kernel` and
            :func:`~deformconv.tools.kernels.parse_kernel`).
        tol: relative tolerance; singular values at most ``tol * largest`` count as zero.
            ``None`` for ``k * eps`` of the kernel's dtype (float64 for lists and integers).

    Returns:
        A :class:`KernelFactorization`: rank, singular values, exact 1-D factors when the rank is
        1 (integer factors for integer kernels, equal-sum factors for smoothing kernels), the
        relative error of the best ``r``-term approximation for every ``r``, and ``summary()``.

    Example:
        >>> from deformconv.tools.kernels import named_kernel
        >>> result = factorize_kernel(named_kernel("sobel_x"))
        >>> result.summary()
        'separable exactly (rank 1): column [1, 2, 1] x row [-1, 0, 1]'
        >>> lap = factorize_kernel(named_kernel("laplacian"))
        >>> lap.rank, round(lap.relative_errors[0], 4)
        (2, 0.1005)
        >>> lap.summary().split(" (")[0]
        'cannot be separated exactly: rank 2'
    """
    values, eps = _as_kernel(kernel)
    k = values.shape[0]
    exact_tol = k * eps
    if tol is None:
        tol = exact_tol
    elif isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    u, s, vh = torch.linalg.svd(values)
    largest = float(s[0])
    rank = int((s > tol * largest).sum()) if largest > 0 else 0
    energy = s.flip(0).square().cumsum(0).flip(0)
    total = float(energy[0])
    errors = tuple(
        math.sqrt(float(energy[r]) / total) if r < k and total > 0 else 0.0 for r in range(1, k + 1)
    )
    column = row = None
    if rank == 0:
        column, row = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    elif rank == 1:
        pair = _integer_pair(values) or _balanced_pair(u[:, 0], largest, vh[0])
        column, row = _orient(*pair)
    return KernelFactorization(
        kernel=values,
        rank=rank,
        tol=float(tol),
        singular_values=s,
        relative_errors=errors,
        column=column,
        row=row,
        exact=rank == 0 or errors[rank - 1] <= exact_tol,
    )
