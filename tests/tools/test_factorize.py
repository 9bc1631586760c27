"""Separable approximations of trained convolutions and whole models (deformconv.tools.factorize
and deformconv.tools.model_factorization), checked against the original layers, NumPy's SVD,
FlopCounterMode and the arithmetic tool."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deformconv.nn.separable import SeparableConv2d
from deformconv.nn.spatial import SpatiallySeparableConv2d
from deformconv.tools.arithmetic import conv_cost
from deformconv.tools.factorize import (
    factorize_conv,
    full_rank,
    rank_errors,
    to_depthwise_separable,
    to_spatially_separable,
)
from deformconv.tools.model_factorization import conv_layers, factorize_layers, factorize_model
from deformconv.tools.module_spec import spec_from_module

LAYERS = [
    {"kernel_size": 3},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": 3, "padding": 2, "dilation": 2},
    {"kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)},
    {"kernel_size": (2, 4), "stride": (1, 3), "padding": (0, 1), "bias": False},
    {"kernel_size": 5, "padding": "same"},
    {"kernel_size": 4, "padding": "same", "dilation": (1, 2)},
    {"kernel_size": 3, "padding": "valid", "stride": 3},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": (3, 2), "padding": (2, 1), "padding_mode": "circular"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "replicate", "stride": 2},
    {"kernel_size": 4, "padding": "same", "padding_mode": "reflect"},
    {"kernel_size": (2, 3), "padding": "same", "padding_mode": "circular", "dilation": (1, 2)},
]
IDS = [f"layer{i}" for i in range(len(LAYERS))]


def _conv(in_channels: int, out_channels: int, seed: int = 0, **kwargs: object) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(in_channels, out_channels, **kwargs)  # type: ignore[arg-type]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().double().norm() / b.detach().double().norm())


@pytest.mark.parametrize("kwargs", LAYERS, ids=IDS)
@pytest.mark.parametrize(("c", "o"), [(3, 5), (6, 2)])
def test_spatial_full_rank_reproduces_the_layer(kwargs: dict, c: int, o: int) -> None:
    conv = _conv(c, o, **kwargs)
    x = torch.randn(2, c, 11, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch's note on even 'same' kernels
        layer = to_spatially_separable(conv)
        kh, kw = conv.kernel_size
        assert layer.mid_channels == min(c * kh, o * kw) == full_rank(conv, "spatial")
        out, expected = layer(x), conv(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.equivalent_weight(), conv.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs", LAYERS, ids=IDS)
@pytest.mark.parametrize(("c", "o"), [(3, 5), (4, 12)])
def test_depthwise_full_rank_reproduces_the_layer(kwargs: dict, c: int, o: int) -> None:
    conv = _conv(c, o, **kwargs)
    x = torch.randn(2, c, 11, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer = to_depthwise_separable(conv)
        kh, kw = conv.kernel_size
        assert layer.depth_multiplier == min(o, kh * kw) == full_rank(conv, "depthwise")
        out, expected = layer(x), conv(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_float64_layers_stay_float64() -> None:
    conv = _conv(3, 4, kernel_size=3, padding=1).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for layer in (to_spatially_separable(conv), to_depthwise_separable(conv)):
        assert next(layer.parameters()).dtype == torch.float64
        torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-12)


def test_depthwise_is_exact_once_the_multiplier_reaches_each_slice_rank() -> None:
    c, o, k, slice_rank = 3, 8, 3, 2
    conv = _conv(c, o, kernel_size=k, padding=1)
    with torch.no_grad():
        for ch in range(c):
            low = torch.randn(o, slice_rank) @ torch.randn(slice_rank, k * k)
            conv.weight[:, ch] = low.reshape(o, k, k)
    x = torch.randn(2, c, 9, 9)
    assert _relative(to_depthwise_separable(conv, 1)(x), conv(x)) > 1e-2
    assert _relative(to_depthwise_separable(conv, slice_rank)(x), conv(x)) < 1e-6


def test_spatial_is_exact_at_the_rank_of_the_reshaped_weight() -> None:
    c, o, k, rank = 4, 6, 3, 3
    # A weight whose (C * kh, O * kw) matrix has rank 3: M[(c, i), (o, j)] = W[o, c, i, j].
    matrix = torch.randn(c * k, rank) @ torch.randn(rank, o * k)
    conv = _conv(c, o, kernel_size=k)
    with torch.no_grad():
        conv.weight.copy_(matrix.reshape(c, k, o, k).permute(2, 0, 1, 3))
    x = torch.randn(2, c, 10, 10)
    assert _relative(to_spatially_separable(conv, rank - 1)(x), conv(x)) > 1e-2
    assert _relative(to_spatially_separable(conv, rank)(x), conv(x)) < 1e-6


@pytest.mark.parametrize("method", ["spatial", "depthwise"])
def test_weight_errors_match_numpy_truncated_svd(method: str) -> None:
    conv = _conv(5, 7, kernel_size=3)
    w = conv.weight.detach().double().numpy()
    o, c, kh, kw = w.shape
    errors, _ = rank_errors(conv, method)  # type: ignore[arg-type]
    for r in (1, 2, 4):
        if method == "spatial":
            s = np.linalg.svd(w.transpose(1, 2, 0, 3).reshape(c * kh, o * kw), compute_uv=False)
            residual = np.sum(s[r:] ** 2)
        else:
            residual = sum(
                np.sum(np.linalg.svd(w[:, ch].reshape(o, kh * kw), compute_uv=False)[r:] ** 2)
                for ch in range(c)
            )
        assert errors[r - 1] == pytest.approx(np.sqrt(residual / np.sum(w**2)), rel=1e-9)
    assert errors[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["spatial", "depthwise"])
def test_output_errors_per_rank_match_the_built_layers(method: str) -> None:
    conv = _conv(4, 6, kernel_size=3, stride=2, padding=1)
    x = torch.randn(3, 4, 10, 9)
    result = factorize_conv(conv, method, rank=2, inputs=x)  # type: ignore[arg-type]
    assert len(result.rank_errors) == result.full_rank
    build = to_spatially_separable if method == "spatial" else to_depthwise_separable
    for r in range(1, result.full_rank + 1):
        measured = _relative(build(conv, r)(x), conv(x))
        assert result.rank_errors[r - 1] == pytest.approx(measured, rel=1e-4, abs=1e-6)
    assert result.output_error == pytest.approx(result.rank_errors[1], rel=1e-4)
    assert result.rank_errors[-1] < 1e-6


@pytest.mark.parametrize("method", ["spatial", "depthwise"])
@pytest.mark.parametrize("kwargs", LAYERS[:5], ids=IDS[:5])
def test_counts_agree_with_the_arithmetic_tool_and_flop_counter(method: str, kwargs: dict) -> None:
    conv = _conv(6, 8, **kwargs)
    x = torch.randn(2, 6, 13, 14)
    result = factorize_conv(conv, method, rank=2, inputs=x)  # type: ignore[arg-type]
    module = result.module
    assert isinstance(module, SpatiallySeparableConv2d if method == "spatial" else SeparableConv2d)
    for layer, params, macs in (
        (conv, result.params_before, result.macs_before),
        (module, result.params_after, result.macs_after),
    ):
        cost = conv_cost(spec_from_module(layer), (13, 14))
        assert params == cost.params == sum(p.numel() for p in layer.parameters())
        assert macs == cost.macs
        if method == "depthwise" or layer is conv:
            # FlopCounterMode counts every multiply-add of the convolutions actually run
            # (the spatial vertical pass included, over the unpadded columns).
            with FlopCounterMode(display=False) as counter:
                layer(x[:1])
            assert macs == counter.get_total_flops() // 2


def test_spatial_counts_by_formula() -> None:
    c, o, k, r, h, w = 6, 8, 3, 5, 10, 12
    result = factorize_conv(_conv(c, o, kernel_size=k, padding=1), "spatial", rank=r)
    assert result.params_after == r * c * k + o * r * k + o
    h, w = result.input_shape[2:]
    assert result.macs_after == r * c * k * h * w + o * r * k * h * w


def test_max_error_picks_the_smallest_rank_within_it() -> None:
    conv = _conv(8, 8, kernel_size=3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    full = factorize_conv(conv, "spatial", inputs=x)
    bound = full.rank_errors[9]
    result = factorize_conv(conv, "spatial", max_error=bound, inputs=x)
    assert result.output_error <= bound + 1e-6
    assert all(e > bound for e in full.rank_errors[: result.rank - 1])
    assert full.rank == full.full_rank and full.output_error < 1e-6


def test_random_batch_is_reproducible() -> None:
    conv = _conv(3, 4, kernel_size=3)
    a = factorize_conv(conv, "depthwise", rank=1, generator=torch.Generator().manual_seed(1))
    b = factorize_conv(conv, "depthwise", rank=1, generator=torch.Generator().manual_seed(1))
    assert a.output_error == b.output_error and a.input_shape == (4, 3, 32, 32)


@pytest.mark.parametrize(
    ("conv", "method", "error", "match"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), "spatial", ValueError, "groups=2; only groups=1"),
        (nn.Conv2d(4, 4, 1), "depthwise", ValueError, "a 1 x 1 kernel has nothing to split"),
        (nn.Conv2d(4, 4, (1, 3)), "spatial", ValueError, "a 1 x 3 kernel has nothing to split"),
        (nn.Conv2d(4, 4, 3), "cp", ValueError, "method must be one of spatial, depthwise"),
        (nn.Linear(4, 4), "spatial", TypeError, "conv must be an nn.Conv2d, got Linear"),
    ],
)
def test_ineligible_layers(conv: nn.Module, method: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        factorize_conv(conv, method)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    conv = _conv(3, 4, kernel_size=3)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 9\], got 10"):
        to_spatially_separable(conv, 10)
    with pytest.raises(ValueError, match=r"depth_multiplier must be an int in \[1, 4\], got 0"):
        to_depthwise_separable(conv, 0)
    with pytest.raises(ValueError, match="give rank or max_error, not both"):
        factorize_conv(conv, rank=1, max_error=0.1)
    with pytest.raises(ValueError, match="max_error must be a number >= 0"):
        factorize_conv(conv, max_error=-1)
    with pytest.raises(ValueError, match=r"inputs must have shape \(B >= 1, 3, H, W\)"):
        factorize_conv(conv, inputs=torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match=r"inputs must have the layer's dtype torch\.float32"):
        factorize_conv(conv, inputs=torch.randn(1, 3, 8, 8, dtype=torch.float64))


def _low_rank_cnn() -> nn.Sequential:
    """A small CNN whose 3 x 3 layers are close to low rank, like trained ones: layer 2 for the
    spatial factorisation, layer 4 for the depthwise one."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(24, 8, 1),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():
        o, c, kh, kw = model[2].weight.shape
        low = torch.randn(c * kh, 6) @ torch.randn(6, o * kw) * 0.05
        model[2].weight.copy_(low.reshape(c, kh, o, kw).permute(2, 0, 1, 3))
        o, c, kh, kw = model[4].weight.shape
        low = torch.randn(c, o, 2) @ torch.randn(c, 2, kh * kw) * 0.1
        model[4].weight.copy_(low.permute(1, 0, 2).reshape(o, c, kh, kw))
        for index in (2, 4):
            model[index].weight.add_(torch.randn_like(model[index].weight) * 0.002)
    return model


@pytest.mark.parametrize("method", ["spatial", "depthwise", "best"])
def test_model_under_an_error_bound(method: str) -> None:
    model = _low_rank_cnn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    result = factorize_model(model, x, method=method, max_error=0.05)  # type: ignore[arg-type]
    by_name = {layer.name: layer for layer in result.layers}
    assert list(by_name) == ["0", "2", "4", "6", "7"]
    converted = [layer for layer in result.layers if layer.method is not None]
    assert converted, "the low-rank layers should convert"
    for layer in converted:
        assert layer.output_error <= 0.05
        assert layer.params_after < layer.params_before
        assert layer.macs_after < layer.macs_before
        assert layer.method in (("spatial", "depthwise") if method == "best" else (method,))
    assert by_name["6"].note == "a 1 x 1 kernel has nothing to split"
    assert by_name["7"].note.startswith("groups=2")
    # The converted model runs, holds the replacement modules and reproduces the reported error.
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
    assert result.params_after < result.params_before
    with torch.no_grad():
        error = _relative(result.model.eval()(x), model.eval()(x))
    assert error == pytest.approx(result.output_error, rel=1e-4, abs=1e-7)
    # The original model is untouched.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    assert type(model[2]) is nn.Conv2d


def test_model_layer_errors_are_those_of_the_replacements() -> None:
    model = _low_rank_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    result = factorize_model(model, x, max_error=0.1)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model[int(name)].register_forward_hook(
            lambda m, a, out, name=name: inputs.__setitem__(name, a[0])
        )
        for name in ("2", "4")
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for layer in result.layers:
        if layer.method is not None:
            replacement = result.model[int(layer.name)]
            with torch.no_grad():
                measured = _relative(
                    replacement(inputs[layer.name]), model[int(layer.name)](inputs[layer.name])
                )
            assert measured == pytest.approx(layer.output_error, rel=1e-3, abs=1e-6)


def test_model_under_a_parameter_budget() -> None:
    model = _low_rank_cnn()
    x = torch.randn(2, 3, 16, 16)
    total = sum(p.numel() for p in model.parameters())
    budgets = [total // 2, (3 * total) // 4]
    results = [factorize_model(model, x, max_params=b) for b in budgets]
    for budget, result in zip(budgets, results, strict=True):
        assert result.params_after <= budget
        assert result.params_before == total
    # The allocation spends the budget on the layers' squared output errors.
    spent = [sum(layer.output_error**2 for layer in r.layers) for r in results]
    assert spent[1] <= spent[0]
    everything = factorize_model(model, x, max_params=total)
    assert everything.output_error == 0.0
    assert all(layer.method is None for layer in everything.layers)
    with pytest.raises(ValueError, match="max_params=100 cannot be met"):
        factorize_model(model, x, max_params=100)


def test_model_progress_and_random_batch() -> None:
    calls: list[tuple[int, int, str]] = []
    result = factorize_model(
        _low_rank_cnn(),
        input_shape=(2, 3, 12, 12),
        max_error=0.2,
        generator=torch.Generator().manual_seed(0),
        progress=lambda done, total, name: calls.append((done, total, name)),
    )
    assert calls == [(1, 3, "0"), (2, 3, "2"), (3, 3, "4")]
    assert result.input_shape == (2, 3, 12, 12)


def test_model_shared_layers_and_already_separable_parts() -> None:
    torch.manual_seed(0)
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared, SeparableConv2d(4, 4, 3, padding=1))
    result = factorize_model(model, input_shape=(1, 4, 8, 8), max_params=200)
    assert [layer.name for layer in result.layers] == ["0"]
    assert result.model[0] is result.model[2]
    assert type(result.model[0]) is not nn.Conv2d


def test_model_errors() -> None:
    model = _low_rank_cnn()
    with pytest.raises(ValueError, match="give max_error, max_params or both"):
        factorize_model(model, input_shape=(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"give inputs \(a batch\) or input_shape"):
        factorize_model(model, max_error=0.1)
    with pytest.raises(ValueError, match=r"the model failed on an input of shape \(1, 5, 8, 8\)"):
        factorize_model(model, input_shape=(1, 5, 8, 8), max_error=0.1)
    with pytest.raises(ValueError, match="method must be 'spatial', 'depthwise' or 'best'"):
        factorize_model(model, input_shape=(1, 3, 8, 8), max_error=0.1, method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_params must be a positive int"):
        factorize_model(model, input_shape=(1, 3, 8, 8), max_params=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    with pytest.raises(TypeError, match="TorchScript module, which cannot be rewritten"):
        factorize_model(scripted, input_shape=(1, 3, 8, 8), max_error=0.1)


def test_torchscript_layers_are_analysed_one_by_one(tmp_path) -> None:
    model = _low_rank_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), tmp_path / "model.ts")
        loaded = torch.jit.load(tmp_path / "model.ts")
    assert isinstance(loaded, torch.jit.ScriptModule)
    layers = conv_layers(loaded)
    assert [name for name, _ in layers] == ["0", "2", "4", "6", "7"]
    for (_, copy), original in zip(
        layers, (model[0], model[2], model[4], model[6], model[7]), strict=True
    ):
        assert torch.equal(copy.weight, original.weight)
        assert copy.stride == original.stride and copy.dilation == original.dilation
    reports = factorize_layers(loaded, max_error=0.05, generator=torch.Generator().manual_seed(0))
    assert [r.method is not None for r in reports] == [False, True, True, False, False]
    assert all(r.output_error <= 0.05 for r in reports)
