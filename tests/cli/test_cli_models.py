"""Model files on the command line (deformconv.cli._models): TorchScript loads as it is, a
``torch.save(model)`` pickle only with ``trust_pickle`` (torch.load's weights_only contract:
https://pytorch.org/docs/stable/generated/torch.load.html), anything else is refused in one line.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from deformconv.cli._models import ModelFileError, load_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _refused(path, **kwargs) -> str:
    with pytest.raises(ModelFileError) as caught:
        load_model(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message  # one line, no terminal codes
    return message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_a_pickled_model_loads_only_when_trusted(tmp_path, legacy: bool) -> None:
    model = _model()
    path = tmp_path / "full.pt"
    torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    message = _refused(path)
    assert "is a full pickle (torch.save(model))" in message and "--trust-pickle" in message
    loaded, kind = load_model(path, trust_pickle=True)
    assert kind == "pickle" and isinstance(loaded, nn.Sequential)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_torchscript_needs_no_trust(tmp_path) -> None:
    path = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_model()), path)
    loaded, kind = load_model(path)
    assert kind == "torchscript" and isinstance(loaded, torch.jit.ScriptModule)


@pytest.mark.parametrize("trust", [False, True])
def test_files_that_hold_no_model(tmp_path, trust: bool) -> None:
    torch.save(_model().state_dict(), tmp_path / "weights.pt")
    assert "holds a dict (a state_dict?), not a model" in _refused(
        tmp_path / "weights.pt", trust_pickle=trust
    )
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "holds a tensor of shape (3,), not a model" in _refused(
        tmp_path / "tensor.pt", trust_pickle=trust
    )
    (tmp_path / "junk.pt").write_text("not a model")
    assert "could not be loaded as a TorchScript or torch.save file" in _refused(
        tmp_path / "junk.pt", trust_pickle=trust
    )
    assert "does not exist" in _refused(tmp_path / "missing.pt", trust_pickle=trust)
