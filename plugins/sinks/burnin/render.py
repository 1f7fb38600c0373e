"""Caption drawing for the burn-in sink: a font fallback chain over the installed fonts, and a
renderer that lays text out in a translucent box and blends it onto RGB frames.

Fonts: the configured font (or DejaVu Sans) first; a character it lacks is drawn with the font
fontconfig picks for it (``fc-match 'sans-serif:charset=HEX'``, then ``'emoji:charset=HEX'``),
so CJK text uses Noto Sans CJK and emoji Noto Color Emoji when those are installed
(``scripts/install.sh``). A font's coverage is its fontconfig charset (``fc-query``/``fc-match``
``%{charset}``: hex code point ranges). Characters no installed font has are drawn with the
first font (a box) and named in one warning per new character.
Colour bitmap fonts (Noto Color Emoji has a single 109 px strike) are drawn at their strike
size and scaled to the line.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import shutil
import subprocess
import time
import unicodedata

import av
import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

log = logging.getLogger(__name__)

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/local/share/fonts")
DEFAULT_FONT = "DejaVuSans.ttf"
BITMAP_STRIKE = 109  # px: the one size of Noto Color Emoji's CBDT strike


def find_font(path: str | None) -> str | None:
    """The configured font file, or DejaVu Sans from fonts-dejavu-core; None: Pillow's default.

    Raises FileNotFoundError for a configured font that does not exist."""
    if path:
        if os.path.isfile(path):
            return path
        for d in FONT_DIRS:
            p = os.path.join(d, path)
            if os.path.isfile(p):
                return p
        raise FileNotFoundError(f"font not found: {path}")
    for d in FONT_DIRS:
        p = os.path.join(d, DEFAULT_FONT)
        if os.path.isfile(p):
            return p
    return None


def _fc(*args: str) -> str:
    """stdout of a fontconfig tool, '' when fontconfig is missing or fails."""
    if shutil.which(args[0]) is None:
        return ""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


class Charset:
    """A font's code points as sorted ranges, from fontconfig's ``%{charset}`` ("20-7e a0 ...")."""

    def __init__(self, spec: str) -> None:
        self.lo: list[int] = []
        self.hi: list[int] = []
        for part in spec.split():
            a, _, b = part.partition("-")
            try:
                self.lo.append(int(a, 16))
                self.hi.append(int(b or a, 16))
            except ValueError:
                continue

    def __contains__(self, ch: str) -> bool:
        cp = ord(ch)
        i = bisect.bisect_right(self.lo, cp) - 1
        return i >= 0 and cp <= self.hi[i]


@functools.lru_cache(maxsize=None)
def _charset_of(path: str, index: int) -> Charset:
    return Charset(_fc("fc-query", "-i", str(index), "--format", "%{charset}", path))


@functools.lru_cache(maxsize=4096)
def _fallback_for(ch: str) -> tuple[str, int] | None:
    """(file, face index) of an installed font that has ``ch``, per fontconfig; None: no font."""
    for family in ("sans-serif", "emoji"):
        out = _fc("fc-match", "--format", "%{file}\t%{index}", f"{family}:charset={ord(ch):x}")
        path, _, index = out.partition("\t")
        if path and index.isdigit() and ch in _charset_of(path, int(index)):
            return path, int(index)
    return None


class _Face:
    """One font of the chain at one pixel size; a bitmap-only face is drawn at its strike, scaled."""

    def __init__(self, path: str | None, index: int, size: int) -> None:
        self.path, self.size = path, size
        self.scale = 1.0
        if path is None:
            self.font = ImageFont.load_default(size)
            return
        try:
            self.font = ImageFont.truetype(path, size, index=index)
        except OSError:  # "invalid pixel size": a colour bitmap font
            self.font = ImageFont.truetype(path, BITMAP_STRIKE, index=index)
            self.scale = size / BITMAP_STRIKE

    def length(self, text: str) -> float:
        return self.font.getlength(text) * self.scale

    def draw(self, img: Image.Image, x: float, y: float, text: str, fill, stroke: int, stroke_fill) -> None:
        """Draw ``text`` with its top-left at (x, y) onto ``img`` (RGBA), composited."""
        if self.scale == 1.0:
            layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
            ImageDraw.Draw(layer).text((x, y), text, font=self.font, fill=fill,
                                       stroke_width=stroke, stroke_fill=stroke_fill, embedded_color=True)
            img.alpha_composite(layer)
            return
        ascent, descent = self.font.getmetrics()
        big = Image.new("RGBA", (max(1, int(self.font.getlength(text)) + 1), ascent + descent), (0, 0, 0, 0))
        ImageDraw.Draw(big).text((0, 0), text, font=self.font, fill=fill, embedded_color=True)
        small = big.resize((max(1, round(big.width * self.scale)), max(1, round(big.height * self.scale))),
                           Image.LANCZOS)
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        layer.paste(small, (round(x), round(y)))
        img.alpha_composite(layer)


class FontChain:
    """The configured font plus fontconfig fallbacks, at one pixel size.

    ``runs(text)`` splits text into (face, substring) runs; ``missing`` collects the characters
    no installed font has (drawn with the first font)."""

    def __init__(self, path: str | None, size: int) -> None:
        self.size = size
        self.first = _Face(path, 0, size)
        self.first_charset = _charset_of(path, 0) if path else None
        self._faces: dict[tuple[str, int], _Face] = {}
        self.missing: set[str] = set()

    def face_for(self, ch: str) -> _Face:
        if self.first_charset is None or ch in self.first_charset or ch.isspace() \
                or unicodedata.category(ch) in ("Cc", "Cf"):  # controls and format marks draw nothing
            return self.first
        for key, face in self._faces.items():
            if ch in _charset_of(*key):
                return face
        found = _fallback_for(ch)
        if found is None:
            self.missing.add(ch)
            return self.first
        if found not in self._faces:
            self._faces[found] = _Face(found[0], found[1], self.size)
        return self._faces[found]

    def runs(self, text: str) -> list[tuple[_Face, str]]:
        out: list[tuple[_Face, str]] = []
        for ch in text:
            face = self.face_for(ch)
            if out and out[-1][0] is face:
                out[-1] = (face, out[-1][1] + ch)
            else:
                out.append((face, ch))
        return out

    def length(self, text: str) -> float:
        return sum(face.length(run) for face, run in self.runs(text))

    def metrics(self) -> tuple[int, int]:
        return self.first.font.getmetrics()

    def draw(self, img: Image.Image, x: float, y: float, text: str, fill, stroke: int, stroke_fill) -> None:
        for face, run in self.runs(text):
            face.draw(img, x, y, run, fill, stroke, stroke_fill)
            x += face.length(run)


MISSING_WARN_EVERY_S = 60.0  # at most one warning a minute about characters no font has (``_warn_missing``)


class CaptionRenderer:
    """Draws caption text into a semi-transparent box; returns what to blend onto a frame.

    ``settings`` is a BurninSettings (font, colours, box, position, wrap limits)."""

    def __init__(self, settings) -> None:
        self.s = settings
        self.font_path = find_font(settings.font)
        self._cache: dict = {}
        self._chains: dict[int, FontChain] = {}
        self._warned: set[str] = set()  # characters reported (or waiting to be: ``_unreported``)
        self._unreported: set[str] = set()
        self._warned_at = -MISSING_WARN_EVERY_S

    def chain(self, size: int) -> FontChain:
        if size not in self._chains:
            self._chains[size] = FontChain(self.font_path, size)
        return self._chains[size]

    @staticmethod
    def wrap(text: str, font, max_w: float) -> list[str]:
        """Greedy word wrap to ``max_w`` px; ``font`` has ``length(str) -> px`` (or Pillow's
        ``getlength``). Words without spaces (CJK) longer than a line are broken anywhere."""
        length = getattr(font, "length", None) or font.getlength
        lines: list[str] = []
        cur = ""
        for word in text.split():
            while length(word) > max_w and len(word) > 1:  # break very long words
                cut = len(word)
                while cut > 1 and length(word[:cut]) > max_w:
                    cut -= 1
                if cur:
                    lines.append(cur)
                    cur = ""
                lines.append(word[:cut])
                word = word[cut:]
            trial = f"{cur} {word}" if cur else word
            if length(trial) <= max_w:
                cur = trial
            else:
                lines.append(cur)
                cur = word
        if cur:
            lines.append(cur)
        return lines

    def _warn_missing(self, chain: FontChain) -> None:
        """One warning for characters no installed font has, then at most one every ``MISSING_WARN_EVERY_S`` for
        those seen since (a model that writes many scripts, e.g. the demo's random words, named a new one in
        almost every caption), each naming up to 8 and counting the rest."""
        new = chain.missing - self._warned
        if not new:
            return
        self._warned |= new
        self._unreported |= new
        now = time.monotonic()
        if now - self._warned_at < MISSING_WARN_EVERY_S:
            return
        self._warned_at = now
        shown = sorted(self._unreported)[:8]
        more = len(self._unreported) - len(shown)
        self._unreported = set()
        log.warning("burn-in: no installed font has %s%s; drawn as boxes (install fonts-noto-cjk and "
                    "fonts-noto-color-emoji, or set font:)",
                    ", ".join(f"{c!r} (U+{ord(c):04X})" for c in shown), f" and {more} more" if more else "")

    def render(self, text: str, width: int, height: int):
        """(y0, x0, premultiplied rgb float32 HxWx3, 1 - alpha float32 HxWx1) or None for no caption."""
        key = (text, width, height)
        if key in self._cache:
            return self._cache[key]
        s = self.s
        size = s.font_size or max(12, round(height / 18))
        font = self.chain(size)
        pad = s.box_padding if s.box_padding is not None else max(2, size // 2)
        max_w = max(size, width * s.max_width - 2 * pad)
        lines = self.wrap(" ".join(text.split()), font, max_w)[-s.max_lines :]
        if not lines:
            return None
        ascent, descent = font.metrics()
        line_h = ascent + descent + max(1, size // 6)
        text_w = int(max(font.length(line) for line in lines)) + 2 * s.outline
        text_h = line_h * len(lines) - max(1, size // 6) + 2 * s.outline
        box_w = min(width, text_w + 2 * pad)
        box_h = min(height, text_h + 2 * pad)
        img = Image.new("RGBA", (box_w, box_h), (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        draw.rounded_rectangle((0, 0, box_w - 1, box_h - 1), radius=max(2, pad // 2),
                               fill=ImageColor.getcolor(s.box_color, "RGBA"))
        colour = ImageColor.getcolor(s.text_color, "RGBA")
        stroke = ImageColor.getcolor(s.outline_color, "RGBA")
        for i, line in enumerate(lines):
            lw = font.length(line)
            x = {"center": (box_w - lw) / 2, "left": pad, "right": box_w - pad - lw}[s.align]
            # text drawn on its own layer and composited, so a translucent box stays translucent
            font.draw(img, x, pad + s.outline + i * line_h, line, colour, s.outline, stroke)
        self._warn_missing(font)
        rgba = np.asarray(img, dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        premul = rgba[..., :3] * alpha * 255.0
        margin = round(s.margin * height)
        y0 = {"bottom": height - margin - box_h, "top": margin, "middle": (height - box_h) // 2}[s.position]
        side = round((1 - s.max_width) / 2 * width)
        x0 = {"center": (width - box_w) // 2, "left": side, "right": width - box_w - side}[s.align]
        out = (max(0, y0), max(0, x0), premul, 1.0 - alpha)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = out
        return out

    @staticmethod
    def blend(image: np.ndarray, overlay) -> np.ndarray:
        """``image`` (HxWx3 uint8) with ``overlay`` (from ``render``) blended on; a new array."""
        y0, x0, premul, inv = overlay
        h = min(premul.shape[0], image.shape[0] - y0)
        w = min(premul.shape[1], image.shape[1] - x0)
        out = image.copy()
        region = out[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        out[y0 : y0 + h, x0 : x0 + w] = (region * inv[:h, :w] + premul[:h, :w] + 0.5).astype(np.uint8)
        return out


def fit_into(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` (HxWx3 uint8 RGB) scaled to fit ``width`` x ``height`` with its aspect ratio kept,
    centred on black (letterbox or pillarbox); the image itself when it already has that size."""
    ih, iw = image.shape[:2]
    if (ih, iw) == (height, width):
        return image
    scale = min(width / iw, height / ih)
    w = max(2, min(width, round(iw * scale / 2) * 2))
    h = max(2, min(height, round(ih * scale / 2) * 2))
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    scaled = vf.reformat(width=w, height=h, format="rgb24").to_ndarray()
    out = np.zeros((height, width, 3), np.uint8)
    y0, x0 = (height - h) // 2, (width - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = scaled
    return out
