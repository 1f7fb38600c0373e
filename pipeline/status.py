"""What a running pipeline tells its operator: a live rich table on a terminal, periodic plain
log lines otherwise, and the logging setup (text or JSON lines, secrets redacted in every record).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Callable

from .redact import redact

log = logging.getLogger("livecc.status")


# -- logging -----------------------------------------------------------------------------------------
class RedactFilter(logging.Filter):
    """Formats each record's message once and redacts URLs' secrets in it (and in tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        record.msg, record.args = redact(msg), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc, + any ``extra={"status": ...}``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_text:
            out["exc"] = record.exc_text
        elif record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        status = getattr(record, "status", None)
        if status is not None:
            out["status"] = status
        return json.dumps(out, ensure_ascii=False)


def setup_logging(fmt: str = "text", level: str = "info", stream=None) -> None:
    """Replace the root logger's handlers with one that redacts and writes text or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for noisy in ("aiohttp.access", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- the figures ---------------------------------------------------------------------------------------
def _fmt_s(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _fmt_bytes(v) -> str:
    if not v:
        return "-"
    return f"{v / 2**30:.2f} GiB"


def summary(s: dict) -> dict:
    """The status figures, in order, as short strings."""
    q, c = s.get("queue", {}), s.get("capture", {})
    sinks = s.get("sinks", {})
    sink_drops = sum(v.get("dropped", 0) for v in sinks.values())
    bad = [n for n, v in sinks.items() if v.get("state") not in ("ok", "starting", "stopped")]
    return {
        "state": s.get("state", "?") + (" (paused)" if s.get("paused") else "")
        + (_source_state(c) if s.get("state") in ("loading", "starting", "running") else ""),
        "source": s.get("source", ""),
        "input fps": f"{s.get('input_fps', 0):.1f}",
        "sampled fps": f"{s.get('sampled_fps', 0):.1f}",
        "turns/s": f"{s.get('turns_per_s', 0):.2f}",
        "latency p50 / p95": f"{_fmt_s(s.get('latency_p50_s'))} / {_fmt_s(s.get('latency_p95_s'))}",
        "queue": f"{q.get('waiting', 0)}/{q.get('maxsize', 0)}",
        "drops": f"{q.get('dropped', 0)} clips, {sink_drops} sink items",
        "reconnects": str(c.get("reconnects", 0)),
        "gpu memory": _fmt_bytes(s.get("gpu", {}).get("allocated")),
        "weights": f"{s.get('quantize') or 'none'}, {_fmt_bytes(s.get('weight_bytes'))}",
        "context": f"{s.get('context_tokens', 0)} tokens, {s.get('turns', 0)} turns",
        "sinks": ", ".join(f"{n}: {v.get('state')}" for n, v in sinks.items()) + (f"  ({', '.join(bad)} unhealthy)" if bad else ""),
        # one line whatever the model wrote (a newline in a caption must not break the table or a log line)
        "last caption": " ".join(((s.get("last_caption") or {}).get("text") or "").split())[:120],
    }


def _source_state(c: dict) -> str:
    """' (waiting_for_source: connection refused)' while the capture is not delivering frames; else ''."""
    state = c.get("state")
    if state in (None, "running", "stopped"):
        return ""
    reason = c.get("state_reason")
    return f" ({state}: {reason})" if reason else f" ({state})"


def one_line(s: dict) -> str:
    f = summary(s)
    return (f"{f['state']}: in {f['input fps']} fps, sampled {f['sampled fps']} fps, {f['turns/s']} turns/s, "
            f"latency p50/p95 {f['latency p50 / p95']}, queue {f['queue']}, drops {f['drops']}, "
            f"reconnects {f['reconnects']}, gpu {f['gpu memory']}, context {f['context']}, "
            f"last: {f['last caption']!r}")


# -- the display ---------------------------------------------------------------------------------------
class StatusDisplay:
    """``mode``: rich (a live table on stderr), plain (a log line every ``interval_s``), off."""

    def __init__(self, snapshot: Callable[[], dict], mode: str = "auto", interval_s: float = 10.0,
                 refresh_hz: float = 4.0, stream=None):
        self.snapshot = snapshot
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "rich" if self.stream.isatty() else "plain"
        self.mode = mode
        self.interval_s = interval_s
        self.refresh_hz = refresh_hz
        self._live = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StatusDisplay":
        if self.mode == "rich":
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream)
            # captions printed to the same terminal go above the table; piped stdout is left alone
            same_tty = sys.stdout.isatty() and self.stream.isatty()
            self._live = Live(get_renderable=self._table, console=console, refresh_per_second=self.refresh_hz,
                              transient=False, redirect_stdout=same_tty, redirect_stderr=self.stream is sys.stderr)
            self._live.start()
            # log records go above the table too: point the stderr handlers at rich's proxy meanwhile
            self._handlers = [h for h in logging.getLogger().handlers
                              if isinstance(h, logging.StreamHandler) and h.stream is self.stream]
            if sys.stderr is self.stream:  # rich did not redirect (not a terminal): nothing to re-point
                self._handlers = []
            for h in self._handlers:
                h.setStream(sys.stderr)
        elif self.mode == "plain":
            log.setLevel(logging.INFO)  # status lines show whatever the log level (status.mode: off hides them)
            self._thread = threading.Thread(target=self._plain, name="livecc-status", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._live is not None:
            for h in getattr(self, "_handlers", []):
                h.setStream(self.stream)
            self._live.stop()
            self._live = None
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None

    def _plain(self) -> None:
        while not self._stop.wait(self.interval_s):  # a timer, not a poll: one line per interval
            try:
                s = self.snapshot()
            except Exception:
                log.exception("status snapshot failed")
                continue
            for one in s["streams"].values() if "streams" in s else [s]:
                prefix = f"[{one['stream']}] " if "streams" in s else ""
                log.info("%s%s", prefix, one_line(one), extra={"status": _status_extra(one)})

    def _table(self):
        from rich.table import Table
        from rich.text import Text

        try:
            snap = self.snapshot()
        except Exception as e:  # the display must never take the pipeline down
            snap = {"status": f"unavailable ({type(e).__name__})"}
        if "streams" in snap:
            return streams_table(snap)
        t = Table(show_header=False, box=None, pad_edge=False, title="livecc run", title_justify="left")
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column(overflow="fold")
        try:
            f = summary(snap) if "status" not in snap else snap
        except Exception as e:
            f = {"status": f"unavailable ({type(e).__name__})"}
        for k, v in f.items():
            t.add_row(k, Text(v))  # captions are model output: never rich markup
        return t


STREAM_COLUMNS = ("stream", "state", "input fps", "turns/s", "latency p50 / p95", "drops", "context", "last caption")


def streams_table(snap: dict):
    """``livecc serve``: one row per stream (``Service.snapshot()``), and the engine's free rows in the title."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"livecc serve: {len(snap['streams'])} streams, {snap.get('free', 0)} more fit",
              title_justify="left", box=None, pad_edge=False)
    for c in STREAM_COLUMNS:
        t.add_column(c, overflow="fold", no_wrap=c != "last caption")
    for sid, s in snap["streams"].items():
        try:
            f = summary(s)
        except Exception as e:  # noqa: BLE001 - one stream's snapshot must not hide the others
            f = {"state": f"unavailable ({type(e).__name__})"}
        t.add_row(Text(sid), *(Text(str(f.get(c, ""))) for c in STREAM_COLUMNS[1:]))
    return t


def _status_extra(s: dict) -> dict:
    keys = ("state", "input_fps", "sampled_fps", "turns_per_s", "latency_p50_s", "latency_p95_s", "turns",
            "context_tokens", "paused")
    out = {k: s.get(k) for k in keys}
    out["queue_depth"] = s.get("queue", {}).get("waiting")
    out["clips_dropped"] = s.get("queue", {}).get("dropped")
    out["reconnects"] = s.get("capture", {}).get("reconnects")
    out["gpu_memory_bytes"] = s.get("gpu", {}).get("allocated")
    return out
