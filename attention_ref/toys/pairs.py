"""Data for the long-range toy: maps holding pairs of identical patterns far apart.

A map is ``size × size`` pixels. It holds ``pairs`` pairs of ``patch × patch``
patterns; the two copies of a pair carry the same random code (``code_channels``
Gaussian numbers per pixel) and sit at least ``size/2`` apart (Euclidean
distance between their top-left corners), so a 3×3 neighbourhood never sees
both. No two patterns touch. Every copy also carries a *message*, ±1 in one
extra channel, drawn independently for the two copies.

The task: at every pixel of a pattern, output the message of its partner
copy. The pixel's own neighbourhood says nothing about it; the only way to
solve the task is to find the one far-away place with the same code and read
the message there.

Channels of a map: ``code_channels`` code values, then the message; background
pixels are 0 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PairMaps", "make_pair_maps", "positional_channels"]


@dataclass(frozen=True)
class PairMaps:
    """A batch of maps with pattern pairs.

    x: ``(B, size, size, code_channels + 1)``; codes, then the message channel.
    target: ``(B, size, size)``; at pattern pixels the partner copy's message, 0 elsewhere.
    copy_id: ``(B, size, size)`` int; ``-1`` on background, else the copy index:
        copies ``2p`` and ``2p + 1`` are the two halves of pair ``p``.
    """

    x: np.ndarray
    target: np.ndarray
    copy_id: np.ndarray

    @property
    def in_pattern(self) -> np.ndarray:
        """``(B, size, size)`` bool: pixels that belong to a pattern."""
        return self.copy_id >= 0


def _place_pair(rng: np.random.Generator, free: np.ndarray, size: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of two copies: ≥ size/2 apart, on free pixels with a 1-pixel margin."""
    for _ in range(1000):
        a, b = rng.integers(0, size - patch + 1, size=(2, 2))
        if np.hypot(*(a - b)) < size / 2:
            continue
        if all(free[max(r - 1, 0) : r + patch + 1, max(c - 1, 0) : c + patch + 1].all() for r, c in (a, b)):
            return a, b
    raise RuntimeError(f"could not place a pair of {patch}×{patch} patterns on a {size}×{size} map")


def make_pair_maps(
    rng: np.random.Generator,
    batch: int,
    *,
    size: int = 10,
    pairs: int = 2,
    patch: int = 2,
    code_channels: int = 8,
) -> PairMaps:
    """``batch`` random maps (see the module docstring), drawn from ``rng``."""
    x = np.zeros((batch, size, size, code_channels + 1))
    target = np.zeros((batch, size, size))
    copy_id = np.full((batch, size, size), -1)
    for b in range(batch):
        free = np.ones((size, size), dtype=bool)
        for p in range(pairs):
            corners = _place_pair(rng, free, size, patch)
            code = rng.standard_normal((patch, patch, code_channels))
            messages = rng.choice([-1.0, 1.0], size=2)
            for copy, (r, c) in enumerate(corners):
                rows, cols = slice(r, r + patch), slice(c, c + patch)
                free[rows, cols] = False
                x[b, rows, cols, :code_channels] = code
                x[b, rows, cols, code_channels] = messages[copy]
                target[b, rows, cols] = messages[1 - copy]
                copy_id[b, rows, cols] = 2 * p + copy
    return PairMaps(x=x, target=target, copy_id=copy_id)


def positional_channels(size: int) -> np.ndarray:
    """``(size, size, 4)``: sin and cos of ``2π·row/size``, then of ``2π·col/size``.

    One period across the map, so two pixels half a map apart in a direction have
    opposite (sin, cos) pairs there: a dot product of these channels is largest for
    a pixel with itself and most negative for the pixels half a map away.
    """
    angle = 2.0 * np.pi * np.arange(size) / size
    wave = np.stack([np.sin(angle), np.cos(angle)], axis=-1)  # (size, 2)
    pe = np.zeros((size, size, 4))
    pe[:, :, 0:2] = wave[:, None, :]
    pe[:, :, 2:4] = wave[None, :, :]
    return pe
