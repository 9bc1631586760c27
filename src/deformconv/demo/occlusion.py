"""Occluded digits: a random rectangle or blob painted over each digit, covering a stated fraction
of its pixels.

An image's *digit pixels* are those brighter than ``threshold`` times the image's maximum. Each
occluder is centred on a random digit pixel (plus a sub-pixel jitter), has a random aspect ratio
and, for blobs, a random wavy outline; it then grows until it covers ``ceil(fraction * n)`` of the
image's ``n`` digit pixels. Growing is exact rather than searched: every pixel gets a normalised
distance from the centre (the L-infinity distance for rectangles, the distance over the outline's
radius in that direction for blobs), and the occluder is every pixel no farther than the
``k``-th nearest digit pixel. Pixels at the same distance join together (a rectangle grows by
whole rows and columns), so of the two sizes around ``k`` pixels the one nearer ``k`` is kept: the
covered fraction is within one row or column of the digit of ``fraction``.

The occluder is painted with ``fill``: a flat grey by default, an object in front of the digit;
``fill=0`` erases the covered strokes instead (as cutout or random erasing do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deformconv.demo.data import Split

__all__ = ["OCCLUDERS", "Occlusion", "coverage", "digit_pixels", "occlude", "occluded_split"]

OCCLUDERS: tuple[str, ...] = ("rectangle", "blob")

# Largest aspect ratio (long side / short side) of an occluder, and the outline harmonics of a
# blob: radius 1 + sum of a_k cos(k theta + phi_k) for k = 2..4, each a_k below _WAVE, so the
# radius stays within [1 - 3 * _WAVE, 1 + 3 * _WAVE].
_ASPECT = 2.0
_HARMONICS = (2, 3, 4)
_WAVE = 0.15


@dataclass(frozen=True)
class Occlusion:
    """The random occlusion of :func:`occlude`.

    Args:
        fraction: fraction of each digit's pixels the occluder covers, in ``[0, 1)``.
        shape: ``"rectangle"`` or ``"blob"``.
        fill: grey value painted over the occluder, in ``[0, 1]`` (0 erases).
        threshold: a pixel belongs to the digit when brighter than ``threshold`` times the
            image's maximum, in ``(0, 1)``.
    """

    fraction: float = 0.3
    shape: str = "rectangle"
    fill: float = 0.5
    threshold: float = 0.25

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, int | float) and 0 <= self.fraction < 1):
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction!r}")
        if self.shape not in OCCLUDERS:
            raise ValueError(f"shape must be one of {OCCLUDERS}, got {self.shape!r}")
        if not (isinstance(self.fill, int | float) and 0 <= self.fill <= 1):
            raise ValueError(f"fill must be in [0, 1], got {self.fill!r}")
        if not (isinstance(self.threshold, int | float) and 0 < self.threshold < 1):
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")

    def apply(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The occluded images alone (the augmentation interface of the training loop)."""
        return occlude(images, self, generator)[0]


def digit_pixels(images: Tensor, threshold: float = 0.25) -> Tensor:
    """Which pixels belong to the digit: brighter than ``threshold`` times the image maximum.

    Args:
        images: ``(N, 1, H, W)``.

    Returns:
        ``(N, 1, H, W)`` bool; all false for a blank image.

    Example:
        >>> digit_pixels(torch.tensor([[[[0.0, 0.2, 1.0]]]])).tolist()
        [[[[False, False, True]]]]
    """
    peak = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images > threshold * peak) & (peak > 0)


def coverage(images: Tensor, masks: Tensor, threshold: float = 0.25) -> Tensor:
    """Fraction of each image's digit pixels (see :func:`digit_pixels`) that ``masks`` covers.

    Args:
        images: ``(N, 1, H, W)`` unoccluded images.
        masks: ``(N, 1, H, W)`` bool occluders.

    Returns:
        ``(N,)`` float; 0 for a blank image.

    Example:
        >>> image = torch.tensor([[[[1.0, 1.0, 0.0, 1.0]]]])
        >>> coverage(image, torch.tensor([[[[True, False, True, False]]]])).tolist()
        [0.3333333432674408]
    """
    digit = digit_pixels(images, threshold)
    covered = (digit & masks).flatten(1).sum(1).float()
    return covered / digit.flatten(1).sum(1).clamp_min(1).float()


def occlude(
    images: Tensor, occlusion: Occlusion, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Paint a random occluder over each image, covering ``occlusion.fraction`` of its digit.

    Args:
        images: ``(N, 1, H, W)`` float images in [0, 1], a bright digit on a dark background.
        occlusion: the occluder's shape, size and fill.
        generator: source of randomness (the same generator state gives the same output).

    Returns:
        The occluded images ``(N, 1, H, W)`` and the occluders ``(N, 1, H, W)`` (bool).

    Example:
        >>> image = torch.zeros(1, 1, 12, 12); image[0, 0, 2:10, 5:7] = 1  # a bar of 16 pixels
        >>> g = torch.Generator().manual_seed(0)
        >>> out, mask = occlude(image, Occlusion(fraction=0.5), g)
        >>> coverage(image, mask).item(), bool((out[mask] == 0.5).all())
        (0.5, True)
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (N, 1, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    digit = digit_pixels(images, occlusion.threshold).view(n, h * w)
    counts = digit.sum(1)
    # Blank images get a uniform draw so every row has weight; their occluder stays empty.
    weights = torch.where(counts[:, None] > 0, digit.float(), torch.ones_like(digit.float()))
    centre = torch.multinomial(weights, 1, generator=generator)[:, 0]
    jitter = torch.rand(n, 2, generator=generator) - 0.5
    cy = (centre // w).float() + jitter[:, 0]
    cx = (centre % w).float() + jitter[:, 1]
    aspect = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(_ASPECT))
    amplitude = torch.rand(n, len(_HARMONICS), generator=generator) * _WAVE
    phase = torch.rand(n, len(_HARMONICS), generator=generator) * (2 * math.pi)

    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    dy = (rows - cy.view(n, 1, 1)) / aspect.sqrt().view(n, 1, 1)
    dx = (cols - cx.view(n, 1, 1)) * aspect.sqrt().view(n, 1, 1)
    if occlusion.shape == "rectangle":
        distance = torch.maximum(dy.abs(), dx.abs())
    else:
        theta = torch.atan2(dy, dx)
        radius = torch.ones_like(theta)
        for k, harmonic in enumerate(_HARMONICS):
            radius = radius + amplitude[:, k, None, None] * torch.cos(
                harmonic * theta + phase[:, k, None, None]
            )
        distance = torch.sqrt(dy**2 + dx**2) / radius
    distance = distance.reshape(n, h * w)

    wanted = torch.ceil(occlusion.fraction * counts.double()).long()
    ranked = torch.where(digit, distance, torch.full_like(distance, math.inf)).sort(1).values
    reach = ranked.gather(1, (wanted - 1).clamp_min(0)[:, None])[:, 0, None]
    # Pixels at the same distance join together (a rectangle grows by whole rows and columns):
    # keep the reach just below when it comes nearer the wanted count.
    above = (ranked <= reach).sum(1, keepdim=True)
    below = (ranked < reach).sum(1, keepdim=True)
    smaller = ranked.gather(1, (below - 1).clamp_min(0))
    nearer = (below > 0) & (wanted[:, None] - below < above - wanted[:, None])
    reach = torch.where(nearer, smaller, reach)
    masks = (distance <= reach) & (wanted[:, None] > 0)
    masks = masks.view(n, 1, h, w)
    out = torch.where(masks, torch.full_like(images, occlusion.fill), images)
    return out, masks


def occluded_split(split: Split, occlusion: Occlusion, seed: int) -> Split:
    """A fixed occluded copy of ``split``, drawn from a generator seeded with ``seed``, with its
    ``occluders`` (the labels are ``split``'s).

    Example:
        >>> split = Split(torch.rand(2, 1, 8, 8), torch.tensor([3, 7]))
        >>> copy = occluded_split(split, Occlusion(fraction=0.5), seed=0)
        >>> tuple(copy.occluders.shape), copy.labels.tolist()
        ((2, 1, 8, 8), [3, 7])
    """
    images, occluders = occlude(split.images, occlusion, torch.Generator().manual_seed(seed))
    return Split(images, split.labels, occluders=occluders)
