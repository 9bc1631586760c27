"""Kernel separability: the named bank, the inline parser and factorize_kernel, checked against
NumPy's SVD and rank and against applying the 1-D factors as two convolutions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deformconv.tools.kernels import kernel_names, named_kernel, parse_kernel
from deformconv.tools.separability import factorize_kernel

SEPARABLE = [
    ("sobel_x", 3),
    ("sobel_y", 3),
    ("sobel_x", 5),
    ("sobel_y", 7),
    ("scharr_x", 3),
    ("scharr_y", 3),
    ("prewitt_x", 3),
    ("prewitt_y", 5),
    ("box", 1),
    ("box", 3),
    ("box", 4),
    ("box", 5),
    ("gaussian", 3),
    ("gaussian", 5),
    ("gaussian", 8),
    ("binomial", 2),
    ("binomial", 3),
    ("binomial", 7),
]
NOT_SEPARABLE = [
    ("laplacian", 3, 2),
    ("laplacian8", 3, 2),
    ("log", 5, 2),
    ("log", 7, 2),
    ("sharpen", 3, 2),
]


def _best_rank_error(kernel: np.ndarray, r: int) -> float:
    """Relative Frobenius error of NumPy's truncated SVD with r terms."""
    u, s, vt = np.linalg.svd(kernel)
    approx = (u[:, :r] * s[:r]) @ vt[:r]
    return float(np.linalg.norm(kernel - approx) / np.linalg.norm(kernel))


@pytest.mark.parametrize(("name", "size"), SEPARABLE)
def test_separable_kernels_factor_exactly(name: str, size: int) -> None:
    kernel = named_kernel(name, size)
    result = factorize_kernel(kernel)
    assert np.linalg.matrix_rank(kernel.numpy()) == 1
    assert result.rank == 1 and result.separable and result.exact
    assert result.column is not None and result.row is not None
    assert result.column.shape == result.row.shape == (size,)
    assert (torch.outer(result.column, result.row) - kernel).abs().max() < 1e-6
    assert result.summary().startswith("separable exactly (rank 1): column [")


@pytest.mark.parametrize(("name", "size"), SEPARABLE)
def test_factors_applied_as_two_convolutions_equal_the_kernel(name: str, size: int) -> None:
    kernel = named_kernel(name, size)
    result = factorize_kernel(kernel)
    assert result.column is not None and result.row is not None
    x = torch.randn(2, 1, 12, 13, dtype=torch.float64)
    rows = F.conv2d(x, result.column.reshape(1, 1, size, 1))
    separable = F.conv2d(rows, result.row.reshape(1, 1, 1, size))
    torch.testing.assert_close(separable, F.conv2d(x, kernel[None, None]), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "column", "row"),
    [
        ("sobel_x", [1, 2, 1], [-1, 0, 1]),
        ("sobel_y", [-1, 0, 1], [1, 2, 1]),
        ("scharr_x", [3, 10, 3], [-1, 0, 1]),
        ("prewitt_x", [1, 1, 1], [-1, 0, 1]),
        ("binomial", [0.25, 0.5, 0.25], [0.25, 0.5, 0.25]),
        ("box", [1 / 3] * 3, [1 / 3] * 3),
    ],
)
def test_factors_are_the_familiar_ones(name: str, column: list[float], row: list[float]) -> None:
    result = factorize_kernel(named_kernel(name))
    assert result.column is not None and result.row is not None
    torch.testing.assert_close(result.column, torch.tensor(column, dtype=torch.float64))
    torch.testing.assert_close(result.row, torch.tensor(row, dtype=torch.float64))


def test_gaussian_factors_are_the_1d_gaussian() -> None:
    size, sigma = 7, 1.5
    result = factorize_kernel(named_kernel("gaussian", size, sigma=sigma))
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    assert result.column is not None and result.row is not None
    np.testing.assert_allclose(result.column.numpy(), g, atol=1e-12)
    np.testing.assert_allclose(result.row.numpy(), g, atol=1e-12)


@pytest.mark.parametrize(("name", "size", "rank"), NOT_SEPARABLE)
def test_named_kernels_that_do_not_separate(name: str, size: int, rank: int) -> None:
    kernel = named_kernel(name, size)
    result = factorize_kernel(kernel)
    assert result.rank == rank == np.linalg.matrix_rank(kernel.numpy())
    assert not result.separable and result.column is None and result.row is None
    assert result.relative_errors[0] == pytest.approx(_best_rank_error(kernel.numpy(), 1))
    assert result.relative_errors[0] > 0.05
    assert result.summary().startswith(f"cannot be separated exactly: rank {rank} (")
    assert f"relative error {result.relative_errors[0]:.4g}" in result.summary()


def test_laplacian_answer_is_plain() -> None:
    result = factorize_kernel(named_kernel("laplacian"))
    assert result.rank == 2
    assert result.relative_errors[0] == pytest.approx(0.1005, abs=1e-4)
    assert "cannot be separated exactly: rank 2" in result.summary()


@pytest.mark.parametrize("size", [2, 3, 5, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_kernels_against_numpy(size: int, seed: int) -> None:
    kernel = np.random.default_rng(seed).standard_normal((size, size))
    result = factorize_kernel(kernel)
    assert result.rank == np.linalg.matrix_rank(kernel) == size
    np.testing.assert_allclose(result.singular_values.numpy(), np.linalg.svd(kernel)[1])
    expected = [_best_rank_error(kernel, r) for r in range(1, size + 1)]
    np.testing.assert_allclose(result.relative_errors, expected, atol=1e-12)
    for r in range(1, size + 1):
        columns, rows = result.terms(r)
        assert columns.shape == (r, size) and rows.shape == (r, size)
        approx = result.approximation(r).numpy()
        error = np.linalg.norm(kernel - approx) / np.linalg.norm(kernel)
        assert error == pytest.approx(result.relative_errors[r - 1], abs=1e-12)
    assert result.relative_errors[-1] == 0.0
    assert result.best_rank(result.relative_errors[1]) <= 2


def test_low_rank_kernel_is_a_sum_of_that_many_terms() -> None:
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((6, 3)) @ rng.standard_normal((3, 6))
    result = factorize_kernel(kernel)
    assert result.rank == 3 and result.exact
    assert result.relative_errors[2] < 1e-12 < result.relative_errors[1]
    assert "3 separable terms are exact" in result.summary()


def test_default_tolerance_follows_the_dtype() -> None:
    gaussian = named_kernel("gaussian", 5).float()
    assert factorize_kernel(gaussian).rank == 1
    assert factorize_kernel(gaussian, tol=1e-14).rank > 1
    assert factorize_kernel(gaussian).tol == pytest.approx(5 * torch.finfo(torch.float32).eps)


def test_loose_tolerance_says_it_is_not_exact() -> None:
    result = factorize_kernel(named_kernel("laplacian"), tol=0.2)
    assert result.rank == 1 and result.separable and not result.exact
    assert result.summary().startswith("separable within the tolerance (rank 1")


def test_zero_kernel_has_rank_zero() -> None:
    result = factorize_kernel(torch.zeros(3, 3))
    assert result.rank == 0 and result.separable
    assert result.relative_errors == (0.0, 0.0, 0.0)
    assert result.summary().startswith("all zeros: rank 0")


def test_to_dict_is_json_ready() -> None:
    import json

    data = json.loads(json.dumps(factorize_kernel(named_kernel("sobel")).to_dict()))
    assert data["rank"] == 1 and data["column"] == [1.0, 2.0, 1.0] and data["exact"]


@pytest.mark.parametrize(
    ("kernel", "error", "match"),
    [
        (torch.zeros(0, 0), ValueError, r"kernel must not be empty, got shape \(0, 0\)"),
        (torch.zeros(2, 3), ValueError, r"kernel must be square \(k x k\), got 2 x 3"),
        (torch.zeros(3), ValueError, r"kernel must be 2-D \(height, width\), got shape \(3,\)"),
        (torch.zeros(1, 3, 3), ValueError, r"kernel must be 2-D"),
        (torch.tensor([[1.0, float("nan")], [0, 1]]), ValueError, "finite"),
        ([["a", "b"], ["c", "d"]], TypeError, "kernel must be a 2-D tensor, array or nested list"),
        (torch.ones(2, 2, dtype=torch.bool), TypeError, "real numbers"),
    ],
)
def test_bad_kernels(kernel: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        factorize_kernel(kernel)  # type: ignore[arg-type]


@pytest.mark.parametrize("tol", [-0.1, 1.0, "0.1", True])
def test_bad_tolerance(tol: object) -> None:
    with pytest.raises(ValueError, match=r"tol must be a number in \[0, 1\)"):
        factorize_kernel(named_kernel("sobel"), tol=tol)  # type: ignore[arg-type]


def test_terms_rejects_a_bad_count() -> None:
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 3\], got 4"):
        factorize_kernel(named_kernel("sobel")).terms(4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 2 1; 2 4 2; 1 2 1", [[1, 2, 1], [2, 4, 2], [1, 2, 1]]),
        ("1,2\n3,4", [[1, 2], [3, 4]]),
        ("[[1, 2], [3, 4]]", [[1, 2], [3, 4]]),
        ("[[1/4, -1/2], [1e-1, 2]]", [[0.25, -0.5], [0.1, 2]]),
        ("  7  ", [[7]]),
    ],
)
def test_parse_kernel(text: str, expected: list[list[float]]) -> None:
    torch.testing.assert_close(parse_kernel(text), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "kernel must have at least one value, got ''"),
        ("[]", "kernel must have at least one value"),
        (" ; ", "kernel must have at least one value"),
        ("1 2; 3", "row 1 has 2 values, row 2 has 1"),
        ("1 a; 2 3", r"could not read 'a' \(row 1, value 2\) as a number"),
        ("1 2; 3 1/0", r"could not read '1/0' \(row 2, value 2\)"),
        ("1 inf; 2 3", "is not finite"),
        ("[[1, 2], [3, 4]", "expected a list of rows"),
        ("[[1, 2] x [3, 4]]", "expected a list of rows"),
    ],
)
def test_parse_kernel_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_kernel(text)


def test_named_kernel_bank() -> None:
    names = kernel_names()
    assert {"sobel", "sobel_x", "laplacian", "gaussian", "binomial", "box", "log"} <= set(names)
    torch.testing.assert_close(named_kernel("sobel"), named_kernel("SOBEL_X"))
    torch.testing.assert_close(named_kernel("sobel_y", 5), named_kernel("sobel_x", 5).T)
    for name in ("box", "gaussian", "binomial"):
        assert named_kernel(name, 5).sum().item() == pytest.approx(1.0)
    assert named_kernel("log").shape == (5, 5)
    torch.testing.assert_close(
        named_kernel("sobel_x", 5)[0], torch.tensor([-1.0, -2, 0, 2, 1], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("sobbel",), "name must be one of .*sobel.*; got 'sobbel'"),
        (("sobel", 4), "size of the sobel_x kernel must be an odd size >= 3, got 4"),
        (("laplacian", 5), "size of the laplacian kernel must be size 3, got 5"),
        (("box", 0), "size of the box kernel must be a size >= 1, got 0"),
        (("sobel", None, 1.0), "sigma applies to the gaussian and log kernels only"),
        (("gaussian", 5, -1.0), "sigma must be a positive finite number, got -1.0"),
    ],
)
def test_named_kernel_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        named_kernel(*args)
