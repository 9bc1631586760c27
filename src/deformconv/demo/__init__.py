"""The ``deformconv demo`` experiment: a regular CNN against its deformable twin on real
handwritten digits, in the spirit of the scaled-MNIST experiment that accompanied Dai et al. 2017.

- :mod:`~deformconv.demo.data`: scikit-learn's digits or a local MNIST copy, and deformations.
- :mod:`~deformconv.demo.occlusion`: occluded copies (a rectangle or blob over part of a digit).
- :mod:`~deformconv.demo.models`: the CNN, its deformable twin, checkpoints
  (:mod:`~deformconv.demo.checkpoint`).
- :mod:`~deformconv.demo.train`: the training loop (one process, or many under ``torchrun``).
- :mod:`~deformconv.demo.protocols`: the three protocols and their results.
- :mod:`~deformconv.demo.figures`, :mod:`~deformconv.demo.occluded_sampling`: the figures of a
  finished run, and where deformable layers sample on occluded digits.
- :mod:`~deformconv.demo.encoder_decoder`, :mod:`~deformconv.demo.restore`: an encoder-decoder
  with transposed convolutions, and the task of restoring occluded digits.

scikit-learn and matplotlib (the ``demo`` extra) are imported only when needed.
"""

from deformconv.demo.protocols import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
