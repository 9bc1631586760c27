"""Pytest configuration shared by the test suite and the doctests in src/."""

collect_ignore = ["src/deformconv/__main__.py"]
