"""The DCNv3 and DCNv4 layers: upstream state_dict keys and shapes, loading a checkpoint built from
upstream's names and reproducing upstream's forward (written out here with functional PyTorch and
the grid_sample reference core), the initial state (DCNv3's uniform mask, DCNv4's zero core
output), gradients, torch.compile and argument checks.

Upstream: InternImage ``classification/ops_dcnv3/modules/dcnv3.py`` (``DCNv3``, with
``build_norm_layer`` and ``build_act_layer``) and DCNv4 ``DCNv4_op/DCNv4/modules/dcnv4.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dcnv_reference import dcnv3_grid_sample, dcnv4_grid_sample
from deformconv.nn import DCNv3, DCNv4


def dcnv3_keys(channels, group, points, dw_kernel, norm, center_feature_scale):
    """Upstream DCNv3's state_dict: name -> shape."""
    keys = {
        "dw_conv.0.weight": (channels, 1, dw_kernel, dw_kernel),
        "dw_conv.0.bias": (channels,),
        "offset.weight": (group * points * 2, channels),
        "offset.bias": (group * points * 2,),
        "mask.weight": (group * points, channels),
        "mask.bias": (group * points,),
        "input_proj.weight": (channels, channels),
        "input_proj.bias": (channels,),
        "output_proj.weight": (channels, channels),
        "output_proj.bias": (channels,),
    }
    if norm == "LN":  # Sequential(to_channels_last(), LayerNorm)
        keys |= {"dw_conv.1.1.weight": (channels,), "dw_conv.1.1.bias": (channels,)}
    else:  # Sequential(BatchNorm2d, to_channels_last())
        keys |= {
            f"dw_conv.1.0.{name}": (channels,)
            for name in ("weight", "bias", "running_mean", "running_var")
        } | {"dw_conv.1.0.num_batches_tracked": ()}
    if center_feature_scale:
        keys |= {
            "center_feature_scale_proj_weight": (group, channels),
            "center_feature_scale_proj_bias": (group,),
        }
    return keys


def dcnv4_keys(channels, group, points, dw_kernel, center_feature_scale, output_bias, pointwise):
    """Upstream DCNv4's state_dict: name -> shape."""
    width = int(math.ceil(group * points * 3 / 8) * 8)
    keys = {"offset_mask.weight": (width, channels), "offset_mask.bias": (width,)}
    if dw_kernel is not None:
        keys |= {
            "offset_mask_dw.weight": (channels, 1, dw_kernel, dw_kernel),
            "offset_mask_dw.bias": (channels,),
        }
    if pointwise:
        keys |= {
            "value_proj.weight": (channels, channels),
            "value_proj.bias": (channels,),
            "output_proj.weight": (channels, channels),
        }
        if output_bias:
            keys["output_proj.bias"] = (channels,)
    if center_feature_scale:
        keys |= {
            "center_feature_scale_proj_weight": (group, channels),
            "center_feature_scale_proj_bias": (group,),
        }
    return keys


def _checkpoint(keys: dict, seed: int) -> dict:
    """Random tensors under upstream's names (running_var positive, counters integral)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in keys.items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        else:
            sd[name] = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
    return sd


def _center_scale(sd, feature, group_channels):
    gate = F.linear(
        feature, sd["center_feature_scale_proj_weight"], sd["center_feature_scale_proj_bias"]
    ).sigmoid()
    return gate[..., None].repeat(1, 1, 1, 1, group_channels).flatten(-2)


def upstream_dcnv3(sd, cfg, input):
    """``DCNv3.forward`` of InternImage, with ``dcnv3_core_pytorch`` as the core (eval mode)."""
    n, h, w, c = input.shape
    g, k = cfg["group"], cfg.get("kernel_size", 3)
    x = F.linear(input, sd["input_proj.weight"], sd["input_proj.bias"])
    x_proj = x
    dwk = cfg.get("dw_kernel_size") or k
    x1 = F.conv2d(input.permute(0, 3, 1, 2), sd["dw_conv.0.weight"], sd["dw_conv.0.bias"],
                  padding=(dwk - 1) // 2, groups=c)  # fmt: skip
    if cfg.get("norm_layer", "LN") == "LN":
        x1 = F.layer_norm(x1.permute(0, 2, 3, 1), (c,), sd["dw_conv.1.1.weight"],
                          sd["dw_conv.1.1.bias"], eps=1e-6)  # fmt: skip
    else:
        x1 = F.batch_norm(x1, sd["dw_conv.1.0.running_mean"], sd["dw_conv.1.0.running_var"],
                          sd["dw_conv.1.0.weight"], sd["dw_conv.1.0.bias"]).permute(0, 2, 3, 1)  # fmt: skip
    x1 = {"GELU": F.gelu, "ReLU": F.relu, "SiLU": F.silu}[cfg.get("act_layer", "GELU")](x1)
    offset = F.linear(x1, sd["offset.weight"], sd["offset.bias"])
    mask = F.linear(x1, sd["mask.weight"], sd["mask.bias"]).reshape(n, h, w, g, -1)
    mask = F.softmax(mask, -1).reshape(n, h, w, -1)
    p = cfg.get("pad", 1)
    rc = int(cfg.get("remove_center", False))
    x = dcnv3_grid_sample(x, offset, mask, k, k, 1, 1, p, p, cfg.get("dilation", 1),
                          cfg.get("dilation", 1), g, c // g, cfg.get("offset_scale", 1.0), rc)  # fmt: skip
    if cfg.get("center_feature_scale"):
        scale = _center_scale(sd, x1, c // g)
        x = x * (1 - scale) + x_proj * scale
    return F.linear(x, sd["output_proj.weight"], sd["output_proj.bias"])


def upstream_dcnv4(sd, cfg, input, shape):
    """``DCNv4.forward`` of the DCNv4 package, with its CUDA core's semantics (no softmax)."""
    n, length, c = input.shape
    h, w = shape
    g, k = cfg["group"], cfg.get("kernel_size", 3)
    pointwise = not cfg.get("without_pointwise", False)
    x = F.linear(input, sd["value_proj.weight"], sd["value_proj.bias"]) if pointwise else input
    x = x.reshape(n, h, w, -1)
    om_in = input
    if cfg.get("dw_kernel_size") is not None:
        dwk = cfg["dw_kernel_size"]
        om_in = F.conv2d(input.view(n, h, w, c).permute(0, 3, 1, 2), sd["offset_mask_dw.weight"],
                         sd["offset_mask_dw.bias"], padding=(dwk - 1) // 2, groups=c)  # fmt: skip
        om_in = om_in.permute(0, 2, 3, 1).reshape(n, length, c)
    om = F.linear(om_in, sd["offset_mask.weight"], sd["offset_mask.bias"]).reshape(n, h, w, -1)
    x_proj = x
    rc = int(cfg.get("remove_center", False))
    p, d = cfg.get("pad", 1), cfg.get("dilation", 1)
    x = dcnv4_grid_sample(x, om, k, k, 1, 1, p, p, d, d, g, c // g,
                          cfg.get("offset_scale", 1.0), 256, rc)  # fmt: skip
    if cfg.get("center_feature_scale"):
        scale = _center_scale(sd, x, c // g)
        x = x * (1 - scale) + x_proj * scale
    x = x.reshape(n, length, -1)
    if pointwise:
        x = F.linear(x, sd["output_proj.weight"], sd.get("output_proj.bias"))
    return x


DCNV3_CONFIGS = [
    dict(channels=16, group=4),
    dict(channels=24, group=3, norm_layer="BN", act_layer="ReLU", offset_scale=0.5),
    dict(channels=20, group=2, kernel_size=5, pad=2, dw_kernel_size=3, act_layer="SiLU"),
    dict(channels=32, group=4, center_feature_scale=True, remove_center=True, dw_kernel_size=5),
    dict(channels=12, group=4, dilation=2, pad=2),
]


@pytest.mark.parametrize(
    "cfg", DCNV3_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
def test_dcnv3_loads_upstream_checkpoint_and_matches_upstream(cfg: dict) -> None:
    k = cfg.get("kernel_size", 3)
    points = k * k - int(cfg.get("remove_center", False))
    keys = dcnv3_keys(cfg["channels"], cfg["group"], points, cfg.get("dw_kernel_size") or k,
                      cfg.get("norm_layer", "LN"), cfg.get("center_feature_scale", False))  # fmt: skip
    layer = DCNv3(**cfg).double().eval()
    assert {n: tuple(t.shape) for n, t in layer.state_dict().items()} == keys
    sd = _checkpoint(keys, seed=len(keys))
    layer.load_state_dict(sd)
    x = torch.randn(2, 7, 6, cfg["channels"], dtype=torch.float64)
    torch.testing.assert_close(layer(x), upstream_dcnv3(sd, cfg, x), rtol=1e-10, atol=1e-10)


DCNV4_CONFIGS = [
    dict(channels=16, group=4),
    dict(channels=24, group=3, dw_kernel_size=3, offset_scale=0.7),
    dict(channels=32, group=2, center_feature_scale=True, output_bias=False),
    dict(channels=12, group=2, kernel_size=5, pad=2, remove_center=True, without_pointwise=True),
]


@pytest.mark.parametrize(
    "cfg", DCNV4_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
def test_dcnv4_loads_upstream_checkpoint_and_matches_upstream(cfg: dict) -> None:
    k = cfg.get("kernel_size", 3)
    points = k * k - int(cfg.get("remove_center", False))
    keys = dcnv4_keys(cfg["channels"], cfg["group"], points, cfg.get("dw_kernel_size"),
                      cfg.get("center_feature_scale", False), cfg.get("output_bias", True),
                      not cfg.get("without_pointwise", False))  # fmt: skip
    layer = DCNv4(**cfg).double()
    assert {n: tuple(t.shape) for n, t in layer.state_dict().items()} == keys
    sd = _checkpoint(keys, seed=len(keys))
    layer.load_state_dict(sd)
    x = torch.randn(2, 6 * 5, cfg["channels"], dtype=torch.float64)
    torch.testing.assert_close(
        layer(x, shape=(6, 5)), upstream_dcnv4(sd, cfg, x, (6, 5)), rtol=1e-10, atol=1e-10
    )


def test_dcnv4_default_shape_is_square() -> None:
    layer = DCNv4(channels=16, group=2).double()
    x = torch.randn(1, 36, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer(x, shape=(6, 6)))


def test_dcnv3_starts_with_regular_points_and_a_uniform_mask() -> None:
    """Upstream ``_reset_parameters``: offset and mask branches zero, so offsets are 0 and the
    softmax mask is 1 / P; the projections are Xavier-uniform with zero bias."""
    torch.manual_seed(0)
    layer = DCNv3(channels=32, group=4, remove_center=True)
    offset, mask, _ = layer.offsets_and_mask(torch.randn(2, 5, 5, 32))
    assert torch.count_nonzero(offset) == 0
    torch.testing.assert_close(mask, torch.full_like(mask, 1 / 8))
    assert torch.count_nonzero(layer.input_proj.bias) == 0
    bound = math.sqrt(6 / 64)
    assert layer.input_proj.weight.abs().max() <= bound


def test_dcnv4_core_output_is_zero_at_initialisation() -> None:
    """``offset_mask`` starts at zero, so every mask value, hence the core's output, is zero;
    the layer's output is output_proj's (zero) bias."""
    torch.manual_seed(0)
    layer = DCNv4(channels=32, group=2, dw_kernel_size=3)
    x = torch.randn(2, 25, 32)
    core = torch.ops.deformconv.dcnv4(
        layer.value_proj(x).reshape(2, 5, 5, 32), layer.offset_mask(x).reshape(2, 5, 5, -1),
        3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0, False,
    )  # fmt: skip
    assert torch.count_nonzero(core) == 0
    assert torch.count_nonzero(layer(x)) == 0


@pytest.mark.parametrize("layer_cls", [DCNv3, DCNv4])
def test_layers_train(layer_cls) -> None:
    torch.manual_seed(0)
    layer = layer_cls(channels=16, group=2)
    for p in layer.parameters():  # move off the initial zeros so every branch gets a gradient
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 6, 6, 16)
    x = x if layer_cls is DCNv3 else x.flatten(1, 2)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_layers_compile_fullgraph() -> None:
    torch._dynamo.reset()
    layer = DCNv3(channels=16, group=2)
    x = torch.randn(1, 5, 5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda: DCNv3(channels=30, group=4),
            ValueError,
            r"channels must be divisible by group, got 30 and 4",
        ),
        (lambda: DCNv3(norm_layer="GN"), ValueError, r"norm_layer must be 'LN' or 'BN', got 'GN'"),
        (
            lambda: DCNv3(act_layer="Tanh"),
            ValueError,
            r"act_layer must be one of ReLU, SiLU, GELU, got 'Tanh'",
        ),
        (
            lambda: DCNv3(kernel_size=4, remove_center=True),
            ValueError,
            r"remove_center needs an odd kernel_size of 3 or more, got kernel_size=4",
        ),
        (lambda: DCNv3(group=0), ValueError, r"group must be a positive int, got 0"),
        (
            lambda: DCNv4(channels=16, group=2, mlp_ratio=4),
            TypeError,
            r"DCNv4 got unexpected keyword arguments: mlp_ratio",
        ),
        (
            lambda: DCNv4(channels=16, group=3),
            ValueError,
            r"channels must be divisible by group, got 16 and 3",
        ),
    ],
)
def test_constructor_checks(make, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_dcnv4_ignores_the_norm_and_act_arguments_as_upstream() -> None:
    layer = DCNv4(channels=16, group=2, act_layer="GELU", norm_layer="LN")
    assert layer(torch.randn(1, 16, 16)).shape == (1, 16, 16)


def test_forward_checks() -> None:
    with pytest.raises(ValueError, match=r"DCNv3 predicts offsets for every input pixel, so "
                       r"kernel_size=3, stride=2, pad=1, dilation=1 must keep the size of its "
                       r"input, but turn 6x6 into 3x3"):  # fmt: skip
        DCNv3(channels=16, group=2, stride=2)(torch.randn(1, 6, 6, 16))
    with pytest.raises(
        ValueError, match=r"input must have shape \(N, H, W, 16\) \(channels-last\)"
    ):
        DCNv3(channels=16, group=2)(torch.randn(1, 16, 6, 6))
    with pytest.raises(ValueError, match=r"shape \(H, W\) must have H \* W = L = 30, got \(5, 5\)"):
        DCNv4(channels=16, group=2)(torch.randn(1, 30, 16), shape=(5, 5))
    with pytest.raises(ValueError, match=r"L is not a square: pass shape"):
        DCNv4(channels=16, group=2)(torch.randn(1, 30, 16))
