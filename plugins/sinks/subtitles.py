"""Subtitle files (SRT and WebVTT) written incrementally: a crash loses nothing already produced.

Each caption becomes a cue shown from its ``start`` until the next caption's start, or until
its ``stop + linger_s`` when nothing follows. A cue is written (in one piece, fsync'd) as soon as
its caption arrives, with the ``stop + linger_s`` end; when the next caption starts earlier
than that, the previous cue's end timestamp is overwritten in place (timestamps are fixed
width, so the file is a valid subtitle file at every moment). Silence (empty text or the
model's ' ...') writes no cue. A cue that does not fit on the disk is not written at all
(``pipeline/fanout/outputs.py``), the previous cue keeps its end, and the call raises so that the
dispatcher's retry writes it once when space returns. An existing file is left as it is: the run
writes ``name.1.srt`` (``existing: new``; ``overwrite`` replaces it).
"""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Literal

from pipeline.fanout.outputs import append_record, deleted, open_output
from pipeline.fanout.sink import CaptionText, Sink

log = logging.getLogger(__name__)


def _stamp(t: float, sep: str, width: int = 0) -> str:
    """``hh:mm:ss,mmm`` (``sep`` before the milliseconds); the hours zero-padded so the stamp is at least
    ``width`` characters (two digits at least; past 100 hours they grow, as SRT and WebVTT parsers accept)."""
    ms = int(round(max(0.0, t) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:0{max(2, width - 10)}d}:{m:02d}:{s:02d}{sep}{ms:03d}"


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
        # an earlier run's file: "new" leaves it and writes name.1.srt (its cue times are from another
        # run's clock, so appending would interleave two timelines), "overwrite" replaces it
        existing: Literal["new", "overwrite"] = "new"

    _path: Path | None = None  # the file claimed by start
    _fd: int | None = None

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

    def _append(self, data: bytes) -> None:
        self._size = append_record(self._fd, data, self._size, fsync=self.settings.fsync)

    def _set_end(self, stamp: float, offset: int, width: int = 0) -> None:
        """Rewrite a cue's end timestamp in place, ``width`` characters wide (that of the stamp it replaces, so
        the file's size does not change: an earlier time that has fewer hour digits is zero-padded)."""
        os.pwrite(self._fd, _stamp(stamp, self._sep, width).encode(), offset)

    # --- sink ------------------------------------------------------------------------
    def start(self) -> None:
        # a retried start keeps the name it claimed (still empty: a failed header was cut back)
        self._path, self._fd = open_output(self._path or self.settings.path, self.settings.existing)
        self._size = 0
        self._sep = "." if self.fmt == "vtt" else ","
        self._count = 0
        self._prev: tuple[float, float, int] | None = None  # (start, end, offset of end stamp)
        try:
            if self.fmt == "vtt":
                self._append(b"WEBVTT\n\n")
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def on_caption(self, caption) -> None:
        text = self.text_of(caption)
        if text is None:
            return
        text = self._clean(text)
        if not text:
            return
        if deleted(self._fd):  # rm'd under us: a new file (a valid one of its own), not a lost inode
            self._reopen()
        start = caption.start
        cut = None  # the previous cue ends where this one begins
        if self._prev is not None:
            p_start, p_end, p_off = self._prev
            start = max(start, p_start + self.settings.min_duration_s)
            if start < p_end:
                cut = (p_end, p_off)
        end = max(caption.stop + self.settings.linger_s, start + self.settings.min_duration_s)
        head = f"{self._count + 1}\n" if self.fmt == "srt" else ""
        line = f"{head}{_stamp(start, self._sep)} --> "
        end_off = self._size + len(line.encode())
        cue = f"{line}{_stamp(end, self._sep)}\n{text}\n\n".encode()
        # cut first, then add the cue: a crash in between leaves a shorter cue, never an overlap
        if cut is not None:
            self._set_end(start, cut[1], len(_stamp(cut[0], self._sep)))
        try:
            self._append(cue)  # whole or nothing (a full disk): the file ends where it did
        except OSError:
            if cut is not None:  # the cue is not there: the previous one keeps its end
                self._set_end(*cut)
            raise
        self._count += 1
        self._prev = (start, end, end_off)

    def _reopen(self) -> None:
        if self._fd is not None:
            log.warning("%s: %s was deleted while being written: writing a new %s", self.name, self._path, self._path)
            os.close(self._fd)
            self._fd = None
        self._path, self._fd = open_output(self._path, "new")  # raises: the dispatcher retries
        self._size, self._count, self._prev = 0, 0, None
        if self.fmt == "vtt":
            try:
                self._append(b"WEBVTT\n\n")
            except OSError:  # no cue without its header: the next call opens it again
                os.close(self._fd)
                self._fd = None
                raise

    def stop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if self.settings.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def stats(self) -> dict:
        return {"path": str(self._path)} if self._path is not None else {}


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
