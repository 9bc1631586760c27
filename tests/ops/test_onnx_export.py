"""Deformable layers export to ONNX DeformConv and run in ONNX Runtime with the same numbers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from deformconv.nn import DeformableConv2d, DeformConv2d
from deformconv.ops.onnx import export_onnx


class _WithOffsets(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = DeformConv2d(
            4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2
        )

    def forward(self, x, offset):
        return self.conv(x, offset)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(modulated=False, offset_groups=2, stride=2),
        dict(groups=2, dilation=2, padding=2),
    ],
    ids=["v2", "v1-og2-s2", "g2-d2"],
)
def test_self_offsetting_layer_runs_in_onnxruntime(kwargs: dict, tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        DeformableConv2d(4, 6, 3, **({"padding": 1} | kwargs)), torch.nn.ReLU()
    ).eval()
    torch.nn.init.normal_(model[0].conv_offset.weight, std=0.3)
    x = torch.randn(2, 4, 11, 10)
    path = tmp_path / "model.onnx"
    export_onnx(model, (x,), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_layer_with_given_offsets_runs_in_onnxruntime(tmp_path) -> None:
    torch.manual_seed(1)
    model = _WithOffsets().eval()
    x = torch.randn(1, 4, 9, 9)
    offset = torch.randn(1, 2 * 6, 5, 7) * 2
    path = tmp_path / "model.onnx"
    export_onnx(model, (x, offset), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, (x.numpy(), offset.numpy()), strict=True)))
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x, offset).numpy(), rtol=1e-5, atol=1e-5)


def test_old_opset_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"opset_version must be >= 19 \(ONNX DeformConv\), got 17"
    ):
        export_onnx(torch.nn.Identity(), (torch.zeros(1),), opset_version=17)
