"""Console sink: captions (and stream events) printed as they come."""

from __future__ import annotations

import sys
from typing import Literal

from pipeline.fanout.sink import CaptionText, Sink


def _ts(t: float) -> str:
    m, s = divmod(max(0.0, t), 60)
    return f"{int(m):02d}:{s:05.2f}"


class ConsoleSink(Sink):
    name = "console"
    target_field = "stream"

    class Settings(CaptionText):
        stream: Literal["stdout", "stderr"] = "stdout"
        timestamps: bool = True
        show_events: bool = True

    def _out(self):
        return sys.stdout if self.settings.stream == "stdout" else sys.stderr

    def on_caption(self, caption) -> None:
        text = self.text_of(caption)
        if text is None:
            return
        text = " ".join(text.split())  # one caption, one line (the model may emit newlines)
        if caption.kind == "answer":
            text = f"Q: {' '.join((caption.query or '').split())}\n{text}"
        prefix = f"[{_ts(caption.start)}-{_ts(caption.stop)}] " if self.settings.timestamps else ""
        print(prefix + text, file=self._out(), flush=True)

    def on_event(self, event) -> None:
        if self.settings.show_events:
            detail = f" ({event.detail})" if event.detail else ""
            print(f"-- {event.kind} at {_ts(event.stream_time)}{detail}", file=self._out(), flush=True)
