"""The ``deformconv demo`` experiment: a regular CNN against its deformable twin on real
handwritten digits, in the spirit of the scaled-MNIST experiment that accompanied Dai et al. 2017.

- :mod:`~deformconv.demo.data`: scikit-learn's digits or a local MNIST copy, and deformations.
- :mod:`~deformconv.demo.models`: the CNN, its deformable twin, checkpoints.
- :mod:`~deformconv.demo.train`: the training loop (one process, or many under ``torchrun``).
- :mod:`~deformconv.demo.protocols`: the two protocols and their results.
- :mod:`~deformconv.demo.figures`: the figures of a finished run.

scikit-learn and matplotlib (the ``demo`` extra) are imported only when needed.
"""

from deformconv.demo.protocols import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
