"""Subtitle files (SRT and WebVTT) written incrementally: a crash loses nothing already produced.

Each caption becomes a cue shown from its ``start`` until the next caption's start, or until
its ``stop + linger_s`` when nothing follows. A cue is written (flushed and fsync'd) as soon as
its caption arrives, with the ``stop + linger_s`` end; when the next caption starts earlier
than that, the previous cue's end timestamp is overwritten in place (timestamps are fixed
width, so the file is a valid subtitle file at every moment). Silence (empty text or the
model's ' ...') writes no cue.
"""

from __future__ import annotations

import os
import textwrap
from typing import Literal

from pipeline.fanout.sink import CaptionText, Sink


def _stamp(t: float, sep: str) -> str:
    ms = int(round(max(0.0, t) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


class SubtitleSink(Sink):
    name = "subtitles"
    target_field = "path"

    class Settings(CaptionText):
        path: str = "captions.srt"
        format: Literal["auto", "srt", "vtt"] = "auto"  # auto: from the file extension
        linger_s: float = 2.0  # how long the last caption stays after its stop time
        min_duration_s: float = 0.3
        max_line_chars: int = 42  # word-wrap width (0: no wrap)
        fsync: bool = True

    # --- helpers ---------------------------------------------------------------------
    @property
    def fmt(self) -> str:
        f = self.settings.format
        if f == "auto":
            f = "vtt" if self.settings.path.lower().endswith(".vtt") else "srt"
        return f

    def _clean(self, text: str) -> str:
        if self.fmt == "vtt":
            text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        else:
            text = text.replace("-->", "->")
        w = self.settings.max_line_chars
        return "\n".join(textwrap.wrap(text, w)) if w > 0 else text

    def _write(self, data: bytes, offset: int | None = None) -> None:
        if offset is None:
            os.write(self._fd, data)
            self._size += len(data)
        else:
            os.pwrite(self._fd, data, offset)

    def _sync(self) -> None:
        if self.settings.fsync:
            os.fsync(self._fd)

    # --- sink ------------------------------------------------------------------------
    def start(self) -> None:
        path = self.settings.path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._size = 0
        self._sep = "." if self.fmt == "vtt" else ","
        self._count = 0
        self._prev: tuple[float, float, int] | None = None  # (start, end, offset of end stamp)
        if self.fmt == "vtt":
            self._write(b"WEBVTT\n\n")
        self._sync()

    def on_caption(self, caption) -> None:
        text = self.text_of(caption)
        if text is None:
            return
        text = self._clean(text)
        if not text:
            return
        start = caption.start
        if self._prev is not None:
            p_start, p_end, p_off = self._prev
            start = max(start, p_start + self.settings.min_duration_s)
            if start < p_end:  # cut the previous cue where this one begins
                new_end = _stamp(start, self._sep).encode()
                if len(new_end) == len(_stamp(p_end, self._sep)):
                    self._write(new_end, p_off)
        end = max(caption.stop + self.settings.linger_s, start + self.settings.min_duration_s)
        self._count += 1
        head = f"{self._count}\n" if self.fmt == "srt" else ""
        a = _stamp(start, self._sep)
        line = f"{head}{a} --> "
        end_off = self._size + len(line.encode())
        cue = f"{line}{_stamp(end, self._sep)}\n{text}\n\n".encode()
        self._write(cue)
        self._sync()
        self._prev = (start, end, end_off)

    def stop(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                self._sync()
            finally:
                os.close(fd)
                self._fd = None


class SrtSink(SubtitleSink):
    name = "srt"

    class Settings(SubtitleSink.Settings):
        path: str = "captions.srt"
        format: Literal["auto", "srt", "vtt"] = "srt"


class VttSink(SubtitleSink):
    name = "vtt"

    class Settings(SubtitleSink.Settings):
        path: str = "captions.vtt"
        format: Literal["auto", "srt", "vtt"] = "vtt"
