"""A deterministic synthetic H.264 test video (colour bars, moving shapes, frame counter).

Frames are drawn with numpy only and converted to yuv420p (BT.601, limited range, the default a
decoder assumes for an untagged stream) with integer arithmetic here, so nothing but x264 and the
mp4 muxer touch the pixels; x264 runs single-threaded (its output depends on the thread count
otherwise) with fixed 1-second GOPs, and the muxer in bit-exact mode. The same PyAV/FFmpeg/x264
build gives byte-identical files.

Frame ``i`` shows ``F 000123`` (the frame index) and ``T 0004.100`` (its timestamp ``i / fps`` in
seconds) in the top-left corner, white on black, so a decoded frame can be identified by eye.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = ["make_test_video", "test_video", "render_frame", "frame_count", "VIDEO_FORMAT_VERSION"]

VIDEO_FORMAT_VERSION = 1
AUDIO_RATE = 48000
AUDIO_FREQ = 440.0

# 75% colour bars: white, yellow, cyan, green, magenta, red, blue.
_BARS = np.array([[191, 191, 191], [191, 191, 0], [0, 191, 191], [0, 191, 0],
                  [191, 0, 191], [191, 0, 0], [0, 0, 191]], np.uint8)

# 5x7 bitmap font for the overlay.
_FONT = {
    "0": ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    "1": ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    "2": ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    "3": ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    "4": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    "5": ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    "6": ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    "7": ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    "8": ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    "9": ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
    ".": ["00000", "00000", "00000", "00000", "00000", "01100", "01100"],
    ":": ["00000", "01100", "01100", "00000", "01100", "01100", "00000"],
    "F": ["11111", "10000", "10000", "11110", "10000", "10000", "10000"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    " ": ["00000"] * 7,
}
_GLYPHS = {c: np.array([[ch == "1" for ch in row] for row in rows], bool) for c, rows in _FONT.items()}


def _fps(fps) -> Fraction:
    return Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps


def frame_count(seconds: float, fps) -> int:
    """How many frames ``make_test_video(seconds=..., fps=...)`` writes."""
    return int(round(seconds * _fps(fps)))


def _draw_text(img: np.ndarray, text: str, x: int, y: int, scale: int) -> None:
    for k, ch in enumerate(text):
        g = _GLYPHS[ch]
        big = np.repeat(np.repeat(g, scale, axis=0), scale, axis=1)
        x0 = x + k * 6 * scale
        h, w = big.shape
        region = img[y:y + h, x0:x0 + w]
        region[big[:region.shape[0], :region.shape[1]]] = 255


def render_frame(i: int, width: int = 640, height: int = 360, fps=30) -> np.ndarray:
    """Frame ``i`` as H x W x 3 uint8 RGB (the source pixels, before H.264)."""
    fps = _fps(fps)
    img = np.empty((height, width, 3), np.uint8)
    top = height * 3 // 5
    cols = (np.arange(width) * len(_BARS)) // width
    img[:top] = _BARS[cols][None]
    ramp = ((np.arange(width) * 255) // max(1, width - 1)).astype(np.uint8)
    img[top:] = ramp[None, :, None]

    s = max(1, min(width, height) // 360)  # size unit: 1 at 640x360, 3 at 1920x1080
    yy, xx = np.ogrid[:height, :width]

    # A circle crossing the frame left to right every 4 s, its colour cycling each second.
    period = 4 * fps
    r = 30 * s
    cx = int(-r + (width + 2 * r) * Fraction(i % period) / period)
    cy = top // 2 + int(round(top / 4 * math.sin(2 * math.pi * float(Fraction(i) / period))))
    sec = int(Fraction(i) / fps)
    colour = np.array([(sec * 97) % 256, (sec * 53 + 80) % 256, (sec * 29 + 160) % 256], np.uint8)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour

    # A square bouncing up and down on the ramp's right half, period 2 s.
    side = 40 * s
    span = max(1, height - top - side)
    bounce = 2 * fps
    ph = Fraction(i % bounce) / bounce
    sy = top + int(span * (2 * ph if ph < Fraction(1, 2) else 2 - 2 * ph))
    sx = width * 3 // 4 - side // 2
    img[sy:sy + side, sx:sx + side] = (255, 128, 0)

    # Frame counter and timestamp.
    scale = 2 * s
    t = Fraction(i) / fps
    lines = [f"F {i:06d}", f"T {int(t):04d}.{int((t - int(t)) * 1000):03d}"]
    pad = 4 * s
    box_w = 10 * 6 * scale + 2 * pad
    box_h = len(lines) * 9 * scale + 2 * pad
    img[:min(box_h, height), :min(box_w, width)] = 0
    for k, line in enumerate(lines):
        _draw_text(img, line, pad, pad + k * 9 * scale, scale)
    return img


def _rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited range, integer arithmetic; chroma from 2x2 averages. -> (H*3/2) x W uint8."""
    h, w, _ = rgb.shape
    x = rgb.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    avg = (x.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3)) + 2) >> 2
    r2, g2, b2 = avg[..., 0], avg[..., 1], avg[..., 2]
    u = ((-38 * r2 - 74 * g2 + 112 * b2 + 128) >> 8) + 128
    v = ((112 * r2 - 94 * g2 - 18 * b2 + 128) >> 8) + 128
    out = np.empty((h * 3 // 2, w), np.uint8)  # PyAV's layout: Y rows, then U and V planes flat
    flat = out.reshape(-1)
    n = h * w
    flat[:n] = y.reshape(-1)
    flat[n:n + n // 4] = u.reshape(-1)
    flat[n + n // 4:] = v.reshape(-1)
    return out


def make_test_video(path: str | os.PathLike, seconds: float = 30.0, width: int = 640, height: int = 360,
                    fps=30, audio: bool = False) -> Path:
    """Write the synthetic test video to ``path`` (H.264 yuv420p in MP4; with ``audio``, also a
    mono 48 kHz AAC track with a 440 Hz sine at -12 dBFS). Returns ``path``."""
    import av

    if width % 2 or height % 2:
        raise ValueError("width and height must be even for yuv420p")
    fps = _fps(fps)
    n = frame_count(seconds, fps)
    gop = max(1, round(fps))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        vs = out.add_stream("libx264", rate=fps, options={
            "preset": "veryfast", "crf": "23", "threads": "1", "flags": "+bitexact",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:threads=1:lookahead-threads=1",
        })
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.codec_context.time_base = Fraction(1) / fps
        as_ = None
        if audio:
            as_ = out.add_stream("aac", rate=AUDIO_RATE, layout="mono")
            as_.codec_context.time_base = Fraction(1, AUDIO_RATE)
            total = int(round(seconds * AUDIO_RATE))
            done = 0
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(render_frame(i, width, height, fps)), format="yuv420p")
            frame.pts = i
            frame.time_base = Fraction(1) / fps
            out.mux(vs.encode(frame))
            if as_ is not None:
                upto = min(total, int((Fraction(i + 1) / fps) * AUDIO_RATE))
                while done + 1024 <= upto or (i == n - 1 and done < total):
                    k = min(1024, total - done)
                    t = (np.arange(done, done + k, dtype=np.float64)) / AUDIO_RATE
                    samples = (0.25 * np.sin(2 * np.pi * AUDIO_FREQ * t)).astype(np.float32)[None]
                    af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                    af.sample_rate = AUDIO_RATE
                    af.pts = done
                    af.time_base = Fraction(1, AUDIO_RATE)
                    out.mux(as_.encode(af))
                    done += k
        out.mux(vs.encode(None))
        if as_ is not None:
            out.mux(as_.encode(None))
    return path


def test_video(seconds: float = 30.0, width: int = 640, height: int = 360, fps=30, audio: bool = False) -> Path:
    """The test video, made once into the cache (``$LIVECC_CACHE``, default ``~/.cache/livecc``)."""
    from .tiny import cached_build

    f = _fps(fps)
    fps_s = str(f.numerator) if f.denominator == 1 else f"{f.numerator}-{f.denominator}"
    name = (f"testvideo-{width}x{height}-{fps_s}fps-{seconds:g}s{'-audio' if audio else ''}"
            f"-v{VIDEO_FORMAT_VERSION}")
    folder = cached_build(name, lambda d: make_test_video(
        Path(d) / "test.mp4", seconds=seconds, width=width, height=height, fps=f, audio=audio))
    return folder / "test.mp4"


test_video.__test__ = False  # not a pytest test, despite the name
