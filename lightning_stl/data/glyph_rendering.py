"""One digit drawn in a font and preprocessed like the UCI optdigits images.

The source digits of :mod:`lightning_stl.data.rendered_digits` are made here, one 32x32 bitmap
at a time, by :func:`render_digit_bitmap`:

1. draw the digit with Pillow at :data:`~lightning_stl.data.digit_fonts.FONT_SIZE` pixels on a
   :data:`CANVAS_SIDE` square canvas, with a stroke adjustment from :data:`STROKES` (a thicker
   pen or an erosion) chosen so that the finished bitmap gets a random target amount of ink (see
   :data:`INK_MEAN`);
2. apply a random affine map about the canvas centre: rotation (:data:`MAX_ROTATION_DEG`),
   horizontal shear (:data:`MAX_SHEAR`, after removing the font's own slant) and a change of
   aspect ratio (:data:`LOG_ASPECT_RANGE`);
3. threshold to binary and crop to the bounding box of the on-pixels;
4. scale the crop, aspect ratio kept, so that its longer side spans :data:`BOX_SIDES` pixels (the
   height fills the box: in ``load_digits()`` every digit spans all eight rows), and place it in
   the centre of the 32x32 frame, shifted by up to :data:`MAX_JITTER` pixels per axis but never
   beyond the frame;
5. binarise again.

:func:`block_counts` then sums the on-pixels of each 4x4 block, exactly as for optdigits, giving
8x8 ``uint8`` images with values 0..16.

The distortion ranges were tuned against ``load_digits()``: its digits are nearly upright (slant
correction is part of the NIST normalisation), narrower than printed digits, and all carry about
the same ink. With these settings a logistic regression trained on 2,000 rendered digits
classifies the real UCI digits with 63-65% accuracy (chance: 10%). A change of what is drawn here
changes the rendered set: bump :data:`lightning_stl.data.rendered_digits.GENERATOR_VERSION`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lightning_stl.data.digit_fonts import NUM_CLASSES, ink_box, load_font

__all__ = [
    "BITMAP_SIDE",
    "IMAGE_SIDE",
    "MAX_VALUE",
    "MIN_ON_PIXELS",
    "block_counts",
    "render_digit_bitmap",
]

#: Pixel value that means "all 16 pixels of the 4x4 block are on".
MAX_VALUE = 16
#: Side of the binary bitmap (as NIST's normalised digits), of its blocks, and of the image.
BITMAP_SIDE = 32
BLOCK = 4
IMAGE_SIDE = BITMAP_SIDE // BLOCK

#: Side of the square canvas on which the digit is drawn and transformed.
CANVAS_SIDE = 128
#: Stroke adjustments in pixels at the font size (``digit_fonts.FONT_SIZE``): a positive ``s``
#: draws with Pillow's ``stroke_width=s`` (the pen grows by ``s`` pixels on each side), a negative
#: ``s`` erodes the glyph by ``-s`` pixels (``-s`` passes of a 3x3 minimum filter).
STROKES = tuple(range(-3, 7))
#: Erosion is only allowed while the font's mean stroke thickness (pixels at the font size) stays
#: at least this; eroding further breaks glyphs into fragments.
MIN_ERODED_THICKNESS = 5.0
#: Mean, standard deviation and clipping range of the target fraction of on-pixels in the 32x32
#: bitmap (a normal distribution, clipped). The optdigits images carry almost the same amount of
#: ink whatever the class (the on-pixel fraction of ``load_digits()`` is 0.305 +- 0.034 and its
#: class means lie in 0.30..0.32), so the stroke is chosen per image to hit a target drawn from
#: this range rather than drawn blindly: thin fonts get a thicker pen, bold fonts are thinned. The
#: mean sits a little below optdigits' 0.305 because slightly thinner strokes transfer better
#: (logistic regression rendered -> UCI: about 0.63 at 0.28 against 0.61 at 0.305).
INK_MEAN = 0.28
INK_STD = 0.035
INK_RANGE = (0.20, 0.38)
#: Rotation drawn uniformly from +-this many degrees. Rotation and shear are milder than for
#: generic augmentation because the optdigits digits are slant-normalised: their slant
#: ``cov(x, y) / var(y)`` has a spread of only about 0.1 within a class.
MAX_ROTATION_DEG = 10.0
#: Horizontal shear (``x += shear * y``, ``y`` pointing down) drawn uniformly from +-this, added
#: after the font's own mean slant has been removed (so italic fonts are not slanted twice).
MAX_SHEAR = 0.15
#: Range of the natural log of the width/height scale ratio, drawn uniformly. Biased to narrower
#: digits: handwritten optdigits are narrower than printed ones (horizontal spread 1.25 blocks
#: against about 1.43 for the undistorted fonts).
LOG_ASPECT_RANGE = (-0.3, 0.0)
#: Grey level (0..255) at and above which a pixel counts as on.
THRESHOLD = 128
#: Longer side of the digit inside the 32x32 frame, drawn uniformly from these.
BOX_SIDES = (30, 31, 32)
#: Largest shift of the digit from the centre of the frame, per axis, in pixels.
MAX_JITTER = 1
#: Renders with fewer on-pixels in the 32x32 bitmap are rejected and drawn again.
MIN_ON_PIXELS = 24


def _affine_coefficients(
    rotation_deg: float, shear: float, log_aspect: float, center: float
) -> tuple[float, ...]:
    """Pillow ``AFFINE`` coefficients (output -> input map) of a transform about ``center``.

    The forward map is ``R(rotation) @ Shear(shear) @ diag(exp(+a/2), exp(-a/2))`` with
    ``a = log_aspect``; it keeps the area and so the stroke width on average.
    """
    angle = math.radians(rotation_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = np.array([[cos, -sin], [sin, cos]])
    shear_matrix = np.array([[1.0, shear], [0.0, 1.0]])
    scale = np.diag([math.exp(log_aspect / 2), math.exp(-log_aspect / 2)])
    inverse = np.linalg.inv(rotate @ shear_matrix @ scale)
    offset = np.array([center, center]) - inverse @ np.array([center, center])
    return (
        float(inverse[0, 0]),
        float(inverse[0, 1]),
        float(offset[0]),
        float(inverse[1, 0]),
        float(inverse[1, 1]),
        float(offset[1]),
    )


def _draw_glyph(font: ImageFont.FreeTypeFont, digit: int, stroke: int) -> Image.Image | None:
    """Step 1: the digit drawn in white on a black canvas, its ink centred; ``None`` if blank.

    ``stroke`` is one of :data:`STROKES`: positive thickens the pen, negative erodes the glyph.
    """
    text = str(digit)
    stroke_width = max(stroke, 0)
    box = ink_box(font, text, stroke_width)
    if box is None:
        return None
    half = CANVAS_SIDE / 2
    origin = (half - (box[0] + box[2]) / 2, half - (box[1] + box[3]) / 2)
    canvas = Image.new("L", (CANVAS_SIDE, CANVAS_SIDE), 0)
    ImageDraw.Draw(canvas).text(
        origin, text, fill=255, font=font, stroke_width=stroke_width, stroke_fill=255
    )
    for _ in range(-stroke):
        canvas = canvas.filter(ImageFilter.MinFilter(3))
    return canvas


def _normalise(
    canvas: Image.Image, box_side: int, jitter_x: int, jitter_y: int
) -> np.ndarray | None:
    """Steps 3-5: threshold, crop, scale into the 32x32 frame and binarise; ``None`` if unusable.

    The grey (anti-aliased) crop is scaled and then thresholded, which binarises with less
    aliasing than scaling the binary crop but gives the same shape.
    """
    on = np.asarray(canvas) >= THRESHOLD
    rows = np.flatnonzero(on.any(axis=1))
    cols = np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if top == 0 or left == 0 or bottom == CANVAS_SIDE or right == CANVAS_SIDE:
        return None  # clipped by the canvas: the shape is incomplete
    height, width = bottom - top, right - left
    factor = box_side / max(height, width)
    new_w = min(BITMAP_SIDE, max(1, round(width * factor)))
    new_h = min(BITMAP_SIDE, max(1, round(height * factor)))
    crop = canvas.crop((left, top, right, bottom)).resize((new_w, new_h), Image.Resampling.BOX)
    # centre in the frame, shifted by the jitter but never beyond the frame.
    x0 = int(np.clip((BITMAP_SIDE - new_w) // 2 + jitter_x, 0, BITMAP_SIDE - new_w))
    y0 = int(np.clip((BITMAP_SIDE - new_h) // 2 + jitter_y, 0, BITMAP_SIDE - new_h))
    bitmap = np.zeros((BITMAP_SIDE, BITMAP_SIDE), dtype=bool)
    bitmap[y0 : y0 + new_h, x0 : x0 + new_w] = np.asarray(crop) >= THRESHOLD
    if int(bitmap.sum()) < MIN_ON_PIXELS:
        return None
    return bitmap


def _slant(on: np.ndarray) -> float:
    """Slant ``cov(x, y) / var(y)`` of the on-pixels (``y`` down; > 0 means the top leans left)."""
    ys, xs = np.nonzero(on)
    if ys.size < 2:
        return 0.0
    dy = ys - ys.mean()
    return float(np.mean((xs - xs.mean()) * dy) / max(np.mean(dy * dy), 1e-9))


def _stroke_thickness(on: np.ndarray) -> float:
    """Mean stroke thickness in pixels, ``2 * area / perimeter`` of the on-pixels.

    The perimeter counts on/off edges between 4-neighbours, times pi/4 to undo the overcount of
    slanted and curved edges on a pixel grid.
    """
    padded = np.pad(on, 1)
    edges = np.count_nonzero(padded[1:] != padded[:-1]) + np.count_nonzero(
        padded[:, 1:] != padded[:, :-1]
    )
    return 2.0 * float(on.sum()) / max(edges * math.pi / 4, 1.0)


@dataclass(frozen=True)
class _FontModel:
    """A font with what the renderer needs to know about it, measured once per process."""

    font: ImageFont.FreeTypeFont
    #: Mean slant of the ten undistorted digits; removed before the random shear.
    slant: float
    #: ``ink[d, k]``: on-pixel fraction of digit ``d`` drawn with ``STROKES[k]`` into a full
    #: 32x32 box, no other distortion; NaN where that stroke is not allowed (an erosion that
    #: would leave strokes thinner than :data:`MIN_ERODED_THICKNESS`) or leaves no usable glyph.
    ink: np.ndarray


@functools.cache
def _font_model(path: str) -> _FontModel:
    font = load_font(path)
    slants = []
    ink = np.full((NUM_CLASSES, len(STROKES)), np.nan)
    for digit in range(NUM_CLASSES):
        canvas = _draw_glyph(font, digit, 0)
        if canvas is None:
            continue
        on = np.asarray(canvas) >= THRESHOLD
        slants.append(_slant(on))
        thickness = _stroke_thickness(on)
        for k, stroke in enumerate(STROKES):
            if stroke < 0 and thickness + 2 * stroke < MIN_ERODED_THICKNESS:
                continue
            canvas = _draw_glyph(font, digit, stroke)
            bitmap = None if canvas is None else _normalise(canvas, BITMAP_SIDE, 0, 0)
            if bitmap is not None:
                ink[digit, k] = bitmap.mean()
    slant = float(np.mean(slants)) if slants else 0.0
    return _FontModel(font=font, slant=slant, ink=ink)


def render_digit_bitmap(
    digit: int, font_path: str | Path, rng: np.random.Generator
) -> np.ndarray | None:
    """One randomly distorted ``digit`` in the font at ``font_path`` as a 32x32 binary bitmap.

    Follows steps 1-5 of the module docstring, drawing all random parameters from ``rng``: a
    target ink fraction (see :data:`INK_MEAN`) that picks the stroke adjustment, a rotation, a
    shear (after removing the font's own slant), an aspect change, the size of the digit's longer
    side in the frame and its placement jitter. Returns a ``bool`` array of shape ``[32, 32]``, or
    ``None`` when the render is unusable (blank, fewer than :data:`MIN_ON_PIXELS` on-pixels, or
    clipped by the canvas edge); the caller then tries again with the same ``rng``, which has
    moved on.

    Raises:
        ValueError: ``digit`` is not one of 0..9.
    """
    if (
        isinstance(digit, bool)
        or not isinstance(digit, (int, np.integer))
        or not 0 <= digit < NUM_CLASSES
    ):
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}")
    digit = int(digit)
    model = _font_model(str(font_path))
    target_ink = float(np.clip(rng.normal(INK_MEAN, INK_STD), *INK_RANGE))
    rotation = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR) - model.slant
    log_aspect = rng.uniform(*LOG_ASPECT_RANGE)
    box_side = int(rng.choice(BOX_SIDES))
    jitter_x, jitter_y = (int(j) for j in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2))

    # the ink shrinks with the area of a smaller box, and with a narrower aspect (the height,
    # normally the longer side, is what gets normalised).
    expected_ink = model.ink[digit] * (box_side / BITMAP_SIDE) ** 2 * math.exp(min(log_aspect, 0))
    if np.all(np.isnan(expected_ink)):
        return None
    stroke = STROKES[int(np.nanargmin(np.abs(expected_ink - target_ink)))]
    canvas = _draw_glyph(model.font, digit, stroke)  # 1. draw
    if canvas is None:
        return None
    canvas = canvas.transform(  # 2. random affine map about the centre
        canvas.size,
        Image.Transform.AFFINE,
        _affine_coefficients(rotation, shear, log_aspect, CANVAS_SIDE / 2),
        resample=Image.Resampling.BILINEAR,
    )
    return _normalise(canvas, box_side, jitter_x, jitter_y)  # 3.-5. normalise into 32x32


def block_counts(bitmaps: np.ndarray) -> np.ndarray:
    """Count the on-pixels of each 4x4 block: ``[n, 32, 32]`` binary -> ``[n, 8, 8]`` uint8.

    This is the optdigits reduction: values lie in 0..16 (16 = the whole block is on).
    """
    bitmaps = np.asarray(bitmaps)
    if bitmaps.ndim != 3 or bitmaps.shape[1:] != (BITMAP_SIDE, BITMAP_SIDE):
        raise ValueError(f"bitmaps must have shape [n, 32, 32], got {bitmaps.shape}")
    blocks = (bitmaps != 0).reshape(-1, IMAGE_SIDE, BLOCK, IMAGE_SIDE, BLOCK)
    return blocks.sum(axis=(2, 4), dtype=np.uint8)
