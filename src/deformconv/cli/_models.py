"""Model files given on the command line: TorchScript, or ``torch.save(model)`` pickles.

A ``torch.save(model)`` file is a pickle, and unpickling it runs code stored in it. So it is
never unpickled by default: :func:`load_model` tries TorchScript, then ``torch.load`` with
``weights_only=True`` (which refuses every class outside torch's allowlist, nn.Module ones
included), and only with ``trust_pickle=True`` (``--trust-pickle``) a full ``torch.load``.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from deformconv.cli._common import first_line

__all__ = ["PICKLE_WARNING", "ModelFileError", "describe", "is_model_path", "load_model"]

Kind = Literal["torchscript", "pickle"]
PICKLE_WARNING = (
    "{path} is a full pickle, loaded because of --trust-pickle: unpickling can run any code "
    "stored in the file; use it only with files you trust"
)
_MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".pkl")


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message is one line naming the user's path."""


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def _unreadable(path: Path, reason: str) -> str:
    return (
        f"model file {str(path)!r} could not be loaded as a TorchScript or torch.save file: "
        f"{reason}"
    )


def is_model_path(target: str) -> bool:
    """``target`` names a model file: an existing file, a model suffix (``.pt``, ``.pth``,
    ``.ts``, ``.jit``, ``.pkl``), or a path-like name (letters and a slash, which no kernel or
    layer type has).

    Example:
        >>> is_model_path("model.pt"), is_model_path("models/net"), is_model_path("sobel")
        (True, True, False)
    """
    text = target.strip()
    path_like = re.search(r"[A-Za-z]", text) is not None and re.search(r"[/\\]", text) is not None
    return Path(text).is_file() or text.lower().endswith(_MODEL_SUFFIXES) or path_like


def describe(value: object) -> str:
    """What a loaded file holds, in a few words.

    Example:
        >>> describe({}), describe(torch.zeros(2, 3)), describe(1.5)
        ('a dict (a state_dict?)', 'a tensor of shape (2, 3)', 'a float')
    """
    if isinstance(value, dict):
        return "a dict (a state_dict?)"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def load_model(path: str | Path, *, trust_pickle: bool = False) -> tuple[nn.Module, Kind]:
    """Load a model saved with ``torch.jit.save`` or ``torch.save(model)``.

    Args:
        path: the file.
        trust_pickle: unpickle a ``torch.save(model)`` file, running the code stored in it;
            without it such a file is refused.

    Returns:
        ``(model, kind)``: the module (a ``torch.jit.ScriptModule`` for TorchScript files) and
        ``"torchscript"`` or ``"pickle"``.

    Raises:
        ModelFileError: the file is missing, does not load, needs ``trust_pickle``, or holds
            something other than a module (a ``state_dict``, a tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu"), "torchscript"
    except Exception:
        pass  # not TorchScript: a torch.save file, or not a model file at all
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Either weights_only refused a class (nn.Modules included) or the file is no pickle:
        # torch.save files are zip archives, and older ones name the class they need.
        if not trust_pickle:
            if not (zipfile.is_zipfile(path) or "Unsupported global" in str(exc)):
                raise ModelFileError(
                    _unreadable(path, "not a pickle torch.load can read")
                ) from None
            raise ModelFileError(
                f"model file {str(path)!r} is a full pickle (torch.save(model)), and loading "
                "it runs code stored in it; if you trust the file, pass --trust-pickle"
            ) from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelFileError(_unreadable(path, _error(exc))) from None
    except Exception as exc:
        raise ModelFileError(_unreadable(path, _error(exc))) from None
    if not isinstance(loaded, nn.Module):
        raise ModelFileError(
            f"model file {str(path)!r} holds {describe(loaded)}, not a model; save the whole "
            "module with torch.save(model) or torch.jit.save(torch.jit.script(model))"
        )
    return loaded, "pickle"
