"""Pytest configuration shared by the test suite and the doctests in src/."""

import os

import torch

collect_ignore = ["src/deformconv/__main__.py"]

# Without a GPU the Triton kernels are tested in Triton's interpreter, which must be chosen before
# any Triton function is defined: here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
