"""Burn-in picture: scripts without a glyph in the first font (CJK, emoji) through the fontconfig
fallback chain, and an input that changes shape mid-run (the output keeps its size, letterboxed)."""

from __future__ import annotations

import logging
import shutil
import time

import av
import numpy as np
import pytest

from pipeline.types import Caption, Frame
from plugins.sinks.burnin import BurninSettings, BurninSink, CaptionRenderer

MISSING = "\U0010fffd"  # a private-use code point no font has: its drawing is the tofu box
needs_fc = pytest.mark.skipif(not shutil.which("fc-match"), reason="needs fontconfig")


def draw(text: str, size: int = 32) -> np.ndarray:
    """The glyph pixels (alpha) of ``text`` alone, drawn by the renderer's font chain."""
    from PIL import Image

    r = CaptionRenderer(BurninSettings())
    chain = r.chain(size)
    img = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
    chain.draw(img, 0, 0, text, (255, 255, 255, 255), 0, (0, 0, 0, 255))
    return np.asarray(img)[..., 3]


def fc_has(ch: str) -> bool:
    import subprocess

    out = subprocess.run(["fc-list", f":charset={ord(ch):x}", "file"], capture_output=True, text=True).stdout
    return bool(out.strip())


@needs_fc
@pytest.mark.parametrize("ch", ["中", "日", "한", "\U0001f984"])  # Chinese, Japanese, Korean, emoji (unicorn)
def test_cjk_and_emoji_are_drawn_not_boxes(ch):
    if not fc_has(ch):
        pytest.skip(f"no installed font has U+{ord(ch):04X} (scripts/install.sh installs Noto CJK and emoji)")
    tofu, glyph = draw(MISSING), draw(ch)
    assert glyph.any(), "nothing drawn"
    assert np.abs(glyph.astype(int) - tofu.astype(int)).mean() > 5, "drawn as the missing-glyph box"


@needs_fc
def test_one_warning_names_the_characters_no_font_has(caplog):
    r = CaptionRenderer(BurninSettings())
    with caplog.at_level(logging.WARNING, logger="plugins.sinks.burnin.render"):
        r.render(f"score {MISSING} now", 320, 240)
        r.render(f"again {MISSING} and {MISSING}", 320, 240)
    warnings = [rec.getMessage() for rec in caplog.records if "no installed font" in rec.getMessage()]
    assert len(warnings) == 1 and "U+10FFFD" in warnings[0], warnings


@needs_fc
def test_characters_no_font_has_are_warned_about_at_most_once_a_minute(caplog, monkeypatch):
    """A caption stream with a new unsupported character in every caption (the demo's random words span many
    scripts: a warning every few seconds, once): one warning, then the rest named in the next one a minute later,
    up to 8 by name and the others counted."""
    from plugins.sinks.burnin import render

    now = [1000.0]
    monkeypatch.setattr(render.time, "monotonic", lambda: now[0])
    r = CaptionRenderer(BurninSettings())
    private = [chr(0x10FFF0 + i) for i in range(12)]  # private-use characters: no font has them
    with caplog.at_level(logging.WARNING, logger="plugins.sinks.burnin.render"):
        for i, ch in enumerate(private):
            r.render(f"caption {i} {ch}", 320, 240)
            now[0] += 2.0
        now[0] += 60.0
        r.render(f"later {private[0]} {chr(0x10FFFD)}", 320, 240)
    warnings = [rec.getMessage() for rec in caplog.records if "no installed font" in rec.getMessage()]
    assert len(warnings) == 2, warnings
    assert "U+10FFF0" in warnings[0] and "more" not in warnings[0]
    assert "U+10FFF1" in warnings[1] and "and 4 more" in warnings[1], warnings[1]  # 12 new: 8 named, 4 counted


def test_shape_change_keeps_the_output_size_and_letterboxes(tmp_path):
    """640x360 then 360x640 mid-run: the MP4 stays 640x360; the portrait picture is pillarboxed
    (black bars left and right, the picture's own aspect ratio in the middle)."""
    path = tmp_path / "shape.mp4"
    sink = BurninSink(output=str(path), fps=15, codec="libx264", preset="ultrafast", audio=False)
    sink.start()
    land = np.full((360, 640, 3), 200, np.uint8)
    port = np.full((640, 360, 3), 200, np.uint8)
    t0 = time.monotonic()
    for i in range(30):  # 2 s at 15 fps: 1 s landscape, 1 s portrait
        sink.on_frame(Frame(land if i < 15 else port, i / 15, index=i))
        time.sleep(max(0.0, t0 + (i + 1) / 15 - time.monotonic()))
    sink.on_caption(Caption(1.0, 2.0, "portrait"))
    time.sleep(0.3)
    sink.stop()
    assert sink.error is None
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        assert (st.codec_context.width, st.codec_context.height) == (640, 360)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
    first, last = frames[2], frames[-1]
    assert first[:, :20].mean() > 150  # landscape fills the frame
    # portrait 360x640 scaled into 640x360: 202x360 in the middle, bars of 219 px each side
    assert last[:, :200].max() < 40 and last[:, -200:].max() < 40, "no black bars"
    assert last[:180, 240:400].mean() > 150, "picture missing from the middle"
