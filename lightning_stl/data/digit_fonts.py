"""The fonts the source digits are drawn in: matplotlib's TrueType text fonts with ten digits.

The rendered digits (:mod:`lightning_stl.data.rendered_digits`) come from the TrueType fonts that
ship with matplotlib (DejaVu, STIXGeneral, Computer Modern); :func:`digit_font_paths` says which
fonts qualify. :func:`load_font` opens one at :data:`FONT_SIZE` pixels for the glyph rendering of
:mod:`lightning_stl.data.glyph_rendering`, and :func:`ink_box` is where a text puts ink.
"""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import ImageFont

__all__ = ["FONT_SIZE", "NUM_CLASSES", "digit_font_paths", "ink_box", "load_font"]

#: The ten digits 0..9, one class each.
NUM_CLASSES = 10
#: Font size in pixels for the first drawing (before any scaling down to 32x32).
FONT_SIZE = 64

_DIGIT_GLYPH_NAMES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)


def _is_digit_glyph_name(name: str, digit: int) -> bool:
    """Whether a glyph name is a standard name of the lining digit ``digit``.

    Accepts the Adobe glyph list name (``"seven"``), possibly with a suffix (``"seven.alt"``), and
    the ``uniXXXX`` form. Old-style figures (``"sevenoldstyle"`` in cmmi10) are rejected: their
    x-height shapes with descenders do not look like handwritten digits. Symbol and fallback fonts
    that map the digit code points to other glyphs (cmsy10 maps '0' to ``"prime"``, cmex10 to
    parenthesis pieces, LastResort to one placeholder box) fail this test.
    """
    standard = _DIGIT_GLYPH_NAMES[digit]
    return name == standard or name.startswith(standard + ".") or name == f"uni{0x30 + digit:04X}"


def _has_digit_glyphs(path: Path) -> bool:
    """Whether the font maps all of '0'..'9' to ten distinct, real digit glyphs with ink."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, lazy=True) as font:
            cmap = font.getBestCmap() or {}
    except Exception:  # an unreadable font is simply not used
        return False
    names = [cmap.get(0x30 + digit) for digit in range(NUM_CLASSES)]
    if any(name is None for name in names) or len(set(names)) != NUM_CLASSES:
        return False
    if not all(_is_digit_glyph_name(name, digit) for digit, name in enumerate(names)):
        return False
    pil_font = load_font(str(path))
    return all(ink_box(pil_font, str(digit), 0) is not None for digit in range(NUM_CLASSES))


@functools.cache
def digit_font_paths(font_dir: str | None = None) -> tuple[Path, ...]:
    """The font files, sorted by name, used to render digits.

    ``font_dir`` defaults to matplotlib's ``<mpl-data>/fonts/ttf``. A font qualifies if its
    character map sends each of '0'..'9' to a distinct glyph with the standard name of that digit
    (checked with fontTools) and Pillow draws ink for it; this keeps the DejaVu, STIXGeneral and
    Computer Modern text fonts and drops the fallback and symbol fonts (LastResort, STIXSiz*,
    STIXNonUni*, cmex10, cmsy10), the old-style figures of cmmi10 and the digit-less display fonts.
    """
    if font_dir is None:
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    else:
        folder = Path(font_dir)
    candidates = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in {".ttf", ".otf"} and p.is_file()
    )
    fonts = tuple(p for p in candidates if _has_digit_glyphs(p))
    if not fonts:
        raise RuntimeError(f"no font with glyphs for all ten digits was found in {folder}")
    return fonts


@functools.cache
def load_font(path: str) -> ImageFont.FreeTypeFont:
    """The font at ``path`` at :data:`FONT_SIZE` pixels (opened once per process)."""
    return ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)


def ink_box(
    font: ImageFont.FreeTypeFont, text: str, stroke_width: int
) -> tuple[int, int, int, int] | None:
    """Bounding box ``(left, top, right, bottom)`` of the drawn text, or ``None`` if blank."""
    box = font.getbbox(text, stroke_width=stroke_width)
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box
