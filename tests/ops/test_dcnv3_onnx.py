"""DCNv3 and DCNv4 export to ONNX as GridSample graphs that ONNX Runtime runs with the numbers of
PyTorch (to 1e-4, the issue's bar; float32)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from deformconv.nn import DCNv3, DCNv4
from deformconv.ops import dcnv3, dcnv4
from deformconv.ops.onnx import export_onnx


def _run_onnx(model: torch.nn.Module, inputs: tuple, path) -> None:
    export_onnx(model, inputs, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, (t.numpy() for t in inputs), strict=True)))
    with torch.no_grad():
        expected = model(*inputs).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Move the zero-initialised offset and mask branches so that points leave the grid."""
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "offset" in name or "mask" in name or "center" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(remove_center=True, center_feature_scale=True, norm_layer="BN"),
        dict(kernel_size=5, pad=4, dilation=2, offset_scale=0.5, act_layer="ReLU"),
    ],
    ids=["default", "rc-cfs-bn", "5x5-d2"],
)
def test_dcnv3_layer_runs_in_onnxruntime(kwargs: dict, tmp_path) -> None:
    model = _randomise(DCNv3(channels=16, group=2, **kwargs))
    _run_onnx(model, (torch.randn(2, 9, 8, 16),), tmp_path / "dcnv3.onnx")


class _DCNv4On(torch.nn.Module):
    """DCNv4 on a fixed (H, W), as a block of FlashInternImage calls it."""

    def __init__(self, shape: tuple[int, int], **kwargs) -> None:
        super().__init__()
        self.shape = shape
        self.dcn = DCNv4(**kwargs)

    def forward(self, x):
        return self.dcn(x, self.shape)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(dw_kernel_size=3, center_feature_scale=True, remove_center=True)],
    ids=["default", "dw-cfs-rc"],
)
def test_dcnv4_layer_runs_in_onnxruntime(kwargs: dict, tmp_path) -> None:
    model = _randomise(_DCNv4On((7, 6), channels=16, group=2, **kwargs))
    _run_onnx(model, (torch.randn(2, 42, 16),), tmp_path / "dcnv4.onnx")


class _Cores(torch.nn.Module):
    """Both cores with unequal padding and strides (DCNv3's H/W padding swap included)."""

    def forward(self, x, offset, mask, offset_mask):
        a = dcnv3(x, offset, mask, 3, 2, 2, 1, 2, 0, 1, 2, 2, 3, 1.3, False)
        b = dcnv4(x, offset_mask, 3, 2, 2, 1, 2, 0, 1, 2, 2, 3, 1.3, 256, False)
        return torch.cat((a.flatten(), b.flatten()))


def test_cores_with_unequal_padding_and_strides_run_in_onnxruntime(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 7, 6, 6, generator=gen)
    offset = torch.randn(1, 3, 8, 2 * 6 * 2, generator=gen) * 2  # H by pad_w: (7-3)//2+1
    mask = torch.rand(1, 3, 8, 2 * 6, generator=gen)
    offset_mask = torch.randn(1, 5, 4, 40, generator=gen)  # H by pad_h: (7+4-3)//2+1 = 5
    _run_onnx(_Cores().eval(), (x, offset, mask, offset_mask), tmp_path / "cores.onnx")


def test_dcnv3_layer_exports_with_a_dynamic_batch(tmp_path) -> None:
    model = _randomise(DCNv3(channels=16, group=2))
    path = tmp_path / "dynamic.onnx"
    export_onnx(model, (torch.randn(2, 7, 6, 16),), path,
                dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 7, 6, 16)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)
