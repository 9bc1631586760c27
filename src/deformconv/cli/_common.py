"""What the commands share: one-line messages on stderr, ``--json`` documents on stdout, the
``N`` / ``HxW`` option text and the check for optional dependencies."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "first_line",
    "missing_packages",
    "parse_pair",
    "print_error",
    "print_json",
    "print_warning",
]

_PAIR = re.compile(r"^(\d+)(?:x(\d+))?$")


def _print(command: str, label: str, colour: str, message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # soft_wrap: one line whatever the terminal's width; escape: the message is shown as it is
    # (a kernel typed as "[[1, 0], [0, 1]]" is not markup).
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[{colour}]deformconv {command}: {label}:[/{colour}] {escape(message)}")


def print_error(command: str, message: str) -> None:
    """``deformconv COMMAND: error: MESSAGE`` on one line of stderr."""
    _print(command, "error", "red", message)


def print_warning(command: str, message: str) -> None:
    """``deformconv COMMAND: warning: MESSAGE`` on one line of stderr."""
    _print(command, "warning", "yellow", message)


def print_json(document: Any) -> None:
    """``document`` as indented JSON on stdout (what ``--json`` prints).

    Example:
        >>> print_json({"kernel": [3, 3]})
        {
          "kernel": [
            3,
            3
          ]
        }
    """
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def missing_packages(modules: Mapping[str, str]) -> list[str]:
    """The packages to install for the ``modules`` that cannot be imported, from a mapping of
    module name to package name (``{"PIL": "pillow"}``).

    Example:
        >>> missing_packages({"json": "json", "no_such_module_x": "no-such-package"})
        ['no-such-package']
    """
    return [
        package for module, package in modules.items() if importlib.util.find_spec(module) is None
    ]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a
    one-line answer: torch's messages run over many lines.

    Example:
        >>> first_line(RuntimeError("shape mismatch\\nmore details")), first_line(KeyError())
        ('shape mismatch', 'KeyError')
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_pair(text: str) -> tuple[int, int] | None:
    """``"3"`` as ``(3, 3)`` and ``"3x5"`` as ``(3, 5)`` (non-negative ints); ``None`` for
    anything else.

    Example:
        >>> parse_pair("3"), parse_pair(" 3x5 "), parse_pair("-1"), parse_pair("3by5")
        ((3, 3), (3, 5), None, None)
    """
    match = _PAIR.match(text.strip())
    if not match:
        return None
    first = int(match.group(1))
    return first, int(match.group(2)) if match.group(2) else first
