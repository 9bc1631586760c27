"""Griffe extension for the API reference: read docstrings as Sphinx's Napoleon does.

deformconv's docstrings follow the Google style as Napoleon reads it. Two of its forms mean
nothing to griffe, and this extension rewrites them before griffe parses a docstring:

- ``Example:`` opens the examples section, as ``Examples:`` does. Griffe knows only the plural
  and turns ``Example:`` into an admonition whose doctest lines are rendered as Markdown prose
  (where ``groups[1]["lr"]`` reads as a reference link); renamed, they render as Python code.
- Sphinx roles (``:func:`dcnv3```, ``:class:`~deformconv.nn.DCNv3```) would show as literal
  text; they become inline code with the name as Sphinx shows it (the last component after
  ``~``). They are not turned into links: many roles name an object relative to the module,
  which Markdown cross-references cannot resolve.

It also leaves out the attributes a class sets on ``self`` without documenting them
(``self.group_channels = channels // group``): the site lists every public name, documented or
not, and these would bury a layer's arguments under a dozen bare names.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# A section heading alone on its line, at any indentation.
_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):`(~?)([^`]+)`")


def _role_as_code(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class Napoleon(griffe.Extension):
    """Rename ``Example:`` headings to ``Examples:``, show Sphinx roles as inline code, and drop
    undocumented instance attributes."""

    # on_instance, not on_object: griffe fires on_object for members only, not the package.
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_role_as_code, text)

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        # Attributes assigned inside a method (``self.x = ...``), not the class body: a
        # dataclass field is an instance attribute too, and is an argument of the class.
        methods = [
            (m.lineno, m.endlineno)
            for m in cls.members.values()
            if m.is_function and m.lineno is not None and m.endlineno is not None
        ]
        for name, member in list(cls.members.items()):
            if not member.is_attribute or member.docstring is not None or member.lineno is None:
                continue
            if any(start <= member.lineno <= end for start, end in methods):
                cls.del_member(name)
