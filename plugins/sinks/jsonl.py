"""JSONL sink: one JSON object per caption or stream event, each line written whole in one call.

Caption lines are ``{"type": "caption", "start", "stop", "text", ..., "silence": bool}``
(``Caption.to_json()`` plus ``type`` and ``silence``: the model's own text, so ``answer_prefix``
does not apply; ``include_silence`` / ``include_answers`` choose the lines); event lines are
``{"type": "event", "kind", "stream_time", "detail", "created_at"}``. A line that does not fit
on the disk is not written at all (``pipeline/fanout/outputs.py``) and its call raises, so the
dispatcher's retry writes it once when space returns. An existing file is continued by default
(``existing: append``): a ``{"type": "run_start", "created_at"}`` line separates the new run's
lines from the earlier ones (stream times and turns start again after it).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from pathlib import Path

from pipeline.fanout.outputs import Existing, append_record, deleted, open_output
from pipeline.fanout.sink import CaptionText, Sink

log = logging.getLogger(__name__)


class JsonlSink(Sink):
    name = "jsonl"
    target_field = "path"

    class Settings(CaptionText):
        path: str = "events.jsonl"
        existing: Existing = "append"  # an earlier run's file: append (after a run_start line), new, overwrite
        include_silence: bool = True  # a log of every turn, marked "silence": true
        include_events: bool = True
        fsync: bool = False  # also fsync each line (slower; survives power loss)

    _path: Path | None = None  # the file claimed by start
    _fd: int | None = None

    def start(self) -> None:
        path = self.settings.path
        if path in ("-", "stdout"):
            return
        # a retried start keeps the name it claimed (a "new" or "overwrite" file holds nothing of an earlier run)
        self._path, fd = open_output(self._path or path, self.settings.existing)
        try:
            end = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISREG(os.fstat(fd).st_mode) else None  # None: a pipe
            if end:  # an earlier run's records: continue after them, on a line of their own
                with open(self._path, "rb") as f:
                    f.seek(end - 1)
                    sep = b"" if f.read(1) == b"\n" else b"\n"
                marker = json.dumps({"type": "run_start", "created_at": time.time()}) + "\n"
                end = append_record(fd, sep + marker.encode(), end, fsync=self.settings.fsync)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._end = fd, end

    def _write(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        if self.settings.path in ("-", "stdout"):
            sys.stdout.write(line)
            sys.stdout.flush()
            return
        if self._end is not None and deleted(self._fd):  # rm'd under us: a new file, not a lost inode
            self._reopen()
        self._end = append_record(self._fd, line.encode(), self._end, fsync=self.settings.fsync)

    def _reopen(self) -> None:
        if self._fd is not None:
            log.warning("jsonl: %s was deleted while being written: writing a new %s", self._path, self._path)
            os.close(self._fd)
            self._fd = None
        self._path, self._fd = open_output(self._path, "append")  # raises: the dispatcher retries
        self._end = os.lseek(self._fd, 0, os.SEEK_END)

    def on_caption(self, caption) -> None:
        if self.text_of(caption) is None:
            return
        self._write({"type": "caption", **caption.to_json(), "silence": caption.is_silence})

    def on_event(self, event) -> None:
        if self.settings.include_events:
            self._write(
                {
                    "type": "event",
                    "kind": event.kind,
                    "stream_time": round(event.stream_time, 3),
                    "detail": event.detail,
                    "created_at": event.created_at,
                }
            )

    def stop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def stats(self) -> dict:
        return {"path": str(self._path)} if self._path is not None else {}
