"""JSONL sink: one JSON object per caption or stream event, flushed per line.

Caption lines are ``{"type": "caption", "start", "stop", "text", ..., "silence": bool}``
(``Caption.to_json()`` plus ``type`` and ``silence``: the model's own text, so ``answer_prefix``
does not apply; ``include_silence`` / ``include_answers`` choose the lines); event lines are
``{"type": "event", "kind", "stream_time", "detail", "created_at"}``.
"""

from __future__ import annotations

import json
import os
import sys

from pipeline.fanout.sink import CaptionText, Sink


class JsonlSink(Sink):
    name = "jsonl"
    target_field = "path"

    class Settings(CaptionText):
        path: str = "events.jsonl"
        append: bool = False
        include_silence: bool = True  # a log of every turn, marked "silence": true
        include_events: bool = True
        fsync: bool = False  # also fsync each line (slower; survives power loss)

    def start(self) -> None:
        path = self.settings.path
        if path in ("-", "stdout"):
            self._fh, self._own = sys.stdout, False
            return
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self._fh = open(path, "a" if self.settings.append else "w", encoding="utf-8")
        self._own = True

    def _write(self, obj: dict) -> None:
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._fh.flush()
        if self.settings.fsync and self._own:
            os.fsync(self._fh.fileno())

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
        fh = getattr(self, "_fh", None)
        if fh is not None and self._own:
            fh.close()
        self._fh = None
