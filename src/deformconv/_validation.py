"""Checks of integer and int-or-pair arguments, one rule for every layer, operator and tool.

This module imports nothing from deformconv (and nothing outside the standard library), so any
package of deformconv can use it without a dependency cycle. Every check names the argument,
the rule and what was received; a wrong type is a ``TypeError``, a value out of range a
``ValueError``. ``bool`` is never taken for an int (``True`` is a likely slip for a flag).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_divisor", "check_int", "padding_pair", "to_pair"]

Pair = tuple[int, int]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` after checking that it is an int in ``[minimum, maximum]``.

    Args:
        value: the argument.
        name: its name, for the message.
        minimum: the smallest allowed value.
        maximum: the largest allowed value, or ``None`` for no bound.

    Returns:
        ``value`` unchanged.

    Example:
        >>> check_int(3, "groups")
        3
        >>> check_int(0, "groups")
        Traceback (most recent call last):
        ...
        ValueError: groups must be a positive int, got 0
        >>> check_int(10, "rank", 1, 9)
        Traceback (most recent call last):
        ...
        ValueError: rank must be an int in [1, 9], got 10
        >>> check_int(True, "groups")
        Traceback (most recent call last):
        ...
        TypeError: groups must be an int, got bool True
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if maximum is not None:
        if not minimum <= value <= maximum:
            raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {value!r}")
    elif value < minimum:
        rule = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def check_divisor(divisor: Any, name: str, value: int, value_name: str) -> int:
    """``divisor`` after checking that it is a positive int dividing ``value``.

    Args:
        divisor: the argument (a group count, typically).
        name: its name, for the message.
        value: what it must divide (a channel count, typically).
        value_name: the name of ``value``, for the message.

    Returns:
        ``divisor`` unchanged.

    Example:
        >>> check_divisor(2, "groups", 8, "in_channels")
        2
        >>> check_divisor(3, "groups", 8, "in_channels")
        Traceback (most recent call last):
        ...
        ValueError: in_channels must be divisible by groups, got in_channels=8, groups=3
    """
    check_int(divisor, name)
    if value % divisor != 0:
        raise ValueError(
            f"{value_name} must be divisible by {name}, got {value_name}={value}, {name}={divisor}"
        )
    return divisor


def to_pair(value: Any, name: str, minimum: int = 0) -> Pair:
    """``value`` as a ``(height, width)`` pair of ints, each at least ``minimum``.

    One int stands for both dimensions; a pair is any sequence of two ints (a tuple, a list,
    ``torch.Size``); strings and ``bool`` are refused.

    Args:
        value: the argument.
        name: its name, for the message.
        minimum: the smallest allowed value of each element.

    Returns:
        ``(height, width)``.

    Example:
        >>> to_pair(3, "kernel_size", 1)
        (3, 3)
        >>> to_pair([2, 1], "stride", 1)
        (2, 1)
        >>> to_pair((3, 0), "kernel_size", 1)
        Traceback (most recent call last):
        ...
        ValueError: kernel_size must be >= 1, got (3, 0)
        >>> to_pair(1.5, "stride", 1)
        Traceback (most recent call last):
        ...
        TypeError: stride must be an int or a pair of ints, got 1.5
    """
    if _is_int(value):
        pair = (value, value)
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(_is_int(v) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def padding_pair(value: Any, name: str = "padding") -> Pair | str:
    """A padding argument as ``(ph, pw)`` zeros on each side, or ``"same"``.

    ``"valid"`` is no padding, ``(0, 0)``; ``"same"`` is returned as is, for the caller's rule.

    Example:
        >>> padding_pair(1), padding_pair("valid"), padding_pair("same")
        ((1, 1), (0, 0), 'same')
        >>> padding_pair("full")
        Traceback (most recent call last):
        ...
        ValueError: padding must be an int, a pair of ints, 'same' or 'valid', got 'full'
    """
    if isinstance(value, str):
        if value not in ("same", "valid"):
            raise ValueError(
                f"{name} must be an int, a pair of ints, 'same' or 'valid', got {value!r}"
            )
        return (0, 0) if value == "valid" else "same"
    return to_pair(value, name, 0)
