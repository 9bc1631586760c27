"""The demo's model files: a format tag, the architecture's configuration and the weights.

Everything in them is a plain container, a number, a string or a tensor, so
``torch.load(weights_only=True)`` reads them without running pickled code, and the format tag
tells one kind of model file from another.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_model_file", "save_model_file"]


def save_model_file(
    path: str | Path,
    format: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Save a model's ``config`` (the fields of its configuration dataclass) and weights."""
    payload = {
        "format": format,
        "config": dict(config),
        "state_dict": dict(state_dict),
        "extra": dict(extra or {}),
    }
    torch.save(payload, Path(path))


def load_model_file(path: str | Path, format: str, what: str) -> dict[str, Any]:
    """The contents of a file :func:`save_model_file` wrote with ``format``.

    Args:
        path: the file.
        format: the tag it must carry.
        what: what the file should be, for messages ("a model saved by `deformconv demo`").

    Raises:
        ValueError: the file does not load, or carries another format.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_model_file(f"{tmp}/m.pt", "x/1", {"width": 2}, {"w": torch.ones(1)})
        ...     load_model_file(f"{tmp}/m.pt", "x/1", "an x")["config"]
        {'width': 2}
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path} is not {what} (torch.load failed: {type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != format:
        raise ValueError(f"{path} is not {what} (expected a file with format {format!r})")
    return payload
