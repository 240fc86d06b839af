"""Reading a saved matplotlib figure back: where its axes are, and which pixels show a colour.

The figures of the project are PNGs drawn in other processes; what they show is checked on the
pixels: the axes box is found from its black spines, a data point ``(x, y)`` is mapped to a pixel
through the axes limits, and a series is found by its colour (antialiased edges included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
from matplotlib.colors import to_rgb


def read_rgb(path: str | Path) -> np.ndarray:
    """The image as ``[H, W, 3]`` floats in [0, 1] (row 0 at the top)."""
    return np.asarray(mpimg.imread(str(path)), dtype=np.float64)[..., :3]


def colour_mask(rgb: np.ndarray, colour, min_strength: float = 0.5) -> np.ndarray:
    """``[H, W]``: the pixels that are ``colour`` mixed with some grey (white background, black
    spine, grey grid), at least ``min_strength`` of it: the chroma (colour minus its grey level)
    of the pixel is ``a`` times that of ``colour`` with ``a >= min_strength``."""
    target = np.asarray(to_rgb(colour))
    chroma = target - target.mean()
    pixel = rgb - rgb.mean(axis=-1, keepdims=True)
    strength = pixel @ chroma / (chroma @ chroma)
    residual = np.linalg.norm(pixel - strength[..., None] * chroma, axis=-1)
    return (strength >= min_strength) & (residual < 0.25 * np.linalg.norm(chroma))


@dataclass(frozen=True)
class AxesBox:
    """Pixel coordinates of the axes' spines (the edges of the data area)."""

    left: float
    top: float
    right: float
    bottom: float

    @classmethod
    def find(cls, rgb: np.ndarray) -> AxesBox:
        """The box drawn by the four black spines: the longest dark-grey rows and columns."""
        dark = (np.ptp(rgb, axis=-1) < 0.08) & (rgb.max(axis=-1) < 0.35)
        edges = []
        for counts in (dark.sum(axis=0), dark.sum(axis=1)):  # columns, then rows
            lines = np.nonzero(counts >= 0.9 * counts.max())[0]
            middle = (lines.min() + lines.max()) / 2
            low, high = lines[lines < middle], lines[lines > middle]
            assert len(low) and len(high), "no two spines found"
            edges += [low.mean(), high.mean()]
        left, right, top, bottom = edges
        return cls(left, top, right, bottom)

    def column(self, x: float, xlim: tuple[float, float]) -> float:
        return self.left + (x - xlim[0]) / (xlim[1] - xlim[0]) * (self.right - self.left)

    def row(self, y: float, ylim: tuple[float, float]) -> float:
        return self.bottom - (y - ylim[0]) / (ylim[1] - ylim[0]) * (self.bottom - self.top)

    def value(self, row: float, ylim: tuple[float, float]) -> float:
        """The y value of a pixel row."""
        return ylim[0] + (self.bottom - row) / (self.bottom - self.top) * (ylim[1] - ylim[0])

    def inside(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` with everything outside the data area cleared."""
        out = np.zeros_like(mask)
        rows = slice(int(np.ceil(self.top)), int(self.bottom) + 1)
        cols = slice(int(np.ceil(self.left)), int(self.right) + 1)
        out[rows, cols] = mask[rows, cols]
        return out


def assert_curve_through(
    mask: np.ndarray,
    box: AxesBox,
    points: list[tuple[float, float]],
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    tolerance: float = 3.0,
) -> None:
    """Every data point ``(x, y)`` has a pixel of the series within ``tolerance`` pixels."""
    rows, cols = np.nonzero(mask)
    assert len(rows), "no pixel of the series' colour"
    for x, y in points:
        col, row = box.column(x, xlim), box.row(y, ylim)
        distance = np.hypot(cols - col, rows - row).min()
        assert distance <= tolerance, f"no pixel of the curve at ({x}, {y}): {distance:.1f} px off"


def vertical_lines(mask: np.ndarray, box: AxesBox, min_fraction: float = 0.25) -> list[float]:
    """Columns where the series covers at least ``min_fraction`` of the axes' height (a solid or
    dashed vertical line), one centre per group of adjacent columns."""
    counts = box.inside(mask).sum(axis=0)
    columns = np.nonzero(counts >= min_fraction * (box.bottom - box.top))[0]
    groups: list[list[int]] = []
    for c in columns:
        if groups and c - groups[-1][-1] <= 1:
            groups[-1].append(int(c))
        else:
            groups.append([int(c)])
    return [float(np.mean(g)) for g in groups]
