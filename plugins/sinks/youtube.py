"""YouTube live caption ingestion: captions POSTed to the stream's caption-ingestion URL.

Protocol (YouTube Help, "Add closed captions to your live stream" -> "HTTP POST" captions, the
documented caption-ingestion format): ``POST {url}?cid={KEY}&seq={N}`` with a ``text/plain`` body of
one or more captions, each a line ``YYYY-MM-DDTHH:MM:SS.mmm`` (UTC, milliseconds) followed by
a line of text (line breaks inside a caption as ``<br>``), and a final newline. ``seq`` grows by
one with every accepted request. The answer's body is the server's clock, a timestamp in the same
format: the sink keeps ``server - local`` (minus half the round trip) and stamps later captions
with the server's time, so a local clock that is off does not move captions against the video.

A caption's time is the wall-clock time of its ``start`` in the stream (its production time minus
its latency and its clip length) + ``offset_s`` (the delay of your encoder to YouTube, if any).

Delivery: a sender thread posts whatever is pending in order. A request that fails (connection
error, timeout, 5xx, 429) is repeated unchanged (same ``seq`` and body, so a server that did get
it can tell) with ``pipeline.backoff.Backoff`` until it is accepted; captions that arrive meanwhile
go into the next request, at most ``max_pending`` held (an outage of hours: the oldest not yet in a
request is let go and counted ``lost``). Other 4xx (a wrong key) are not retried: that request's captions are
counted ``lost`` and the next caption raises ``DeliveryError``. On stop the sender gets up to
``stop_timeout_s`` to send what is pending; anything left is counted lost and reported.

``seq`` survives a restart: the next one of each ingestion URL and key is kept in a small file (``seq_dir``,
default ``$XDG_STATE_HOME/livecc/youtube``, i.e. ``~/.local/state/livecc/youtube``; named by a hash of the URL
and key, never the key), so a pipeline restarted mid-broadcast goes on from where it stopped instead of sending
``seq=1`` again (which the ingestion server may take for a repeat of the first request). ``seq_dir: off`` starts
at 1 every time. A state file that cannot be written is logged once and the captions go on.

The key (``cid``) is read from the environment (``key_env``, default ``YOUTUBE_CAPTION_KEY``),
never from the config, and never appears in logs, errors or the status (``redact`` hides ``cid``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from pathlib import Path
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from pydantic import Field, field_validator, model_validator

from pipeline.backoff import Backoff
from pipeline.fanout.sink import DeliveryError, Sink, SinkSettings
from pipeline.redact import redact

log = logging.getLogger(__name__)

STAMP = "%Y-%m-%dT%H:%M:%S"


def stamp(unix: float) -> str:
    """Unix seconds -> 'YYYY-MM-DDTHH:MM:SS.mmm' (UTC)."""
    t = dt.datetime.fromtimestamp(unix, dt.timezone.utc)
    return t.strftime(STAMP) + f".{t.microsecond // 1000:03d}"


def parse_stamp(text: str) -> float | None:
    """The first 'YYYY-MM-DDTHH:MM:SS(.mmm)' in ``text`` as unix seconds (UTC); None if none."""
    for line in text.splitlines():
        line = line.strip()
        try:
            t = dt.datetime.strptime(line[:23] if "." in line else line[:19], STAMP + (".%f" if "." in line else ""))
        except ValueError:
            continue
        return t.replace(tzinfo=dt.timezone.utc).timestamp()
    return None


class YoutubeSink(Sink):
    name = "youtube"
    target_field = "url"

    class Settings(SinkSettings):
        url: str = "http://upload.youtube.com/closedcaption"
        key_env: str = "YOUTUBE_CAPTION_KEY"  # the ingestion URL's cid= value
        offset_s: float = 0.0  # added to every caption time (your encoder's delay)
        timeout_s: float = 5.0
        backoff_initial_s: float = 0.5
        backoff_max_s: float = 10.0
        max_batch: int = Field(50, ge=1)  # captions in one request at most
        # captions held while YouTube does not take them (an outage): past this the oldest not yet in a request
        # goes (counted lost); at one caption a second, 10 minutes
        max_pending: int = 600
        answer_prefix: str = "A: "
        stop_timeout_s: float = 10.0
        seq_dir: str = ""  # where the next seq of each URL and key is kept ("" = the user's state dir; off = none)

        @field_validator("url")
        @classmethod
        def _url(cls, v: str) -> str:
            if not v.lower().startswith(("http://", "https://")):
                raise ValueError("the caption ingestion URL must start with http:// or https://")
            if "cid=" in v:
                raise ValueError("put the ingestion key (cid=...) in the environment (key_env), not in the URL")
            return v

        @model_validator(mode="after")
        def _pending_holds_a_batch(self):
            if self.max_pending < self.max_batch:
                raise ValueError(f"max_pending ({self.max_pending}) must be at least max_batch ({self.max_batch})")
            return self

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.counters = {"sent": 0, "requests": 0, "retries": 0, "lost": 0}
        self.seq = 1
        self.clock_offset = 0.0  # server clock - local clock, seconds
        self._pending: list[tuple[float, str]] = []  # (unix time, text) not yet accepted, the request's first
        self._sending = 0  # the first this many of ``_pending`` are the request being sent (kept as they are)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._key = ""
        self.error: str | None = None  # a refusal that retrying cannot fix
        self.connected = False
        self._seq_file: Path | None = None  # the seq state (``seq_dir``), set at start
        self._seq_warned = False

    # --- sink API --------------------------------------------------------------------
    def start(self) -> None:
        key = os.environ.get(self.settings.key_env, "")
        if not key:
            raise DeliveryError(f"youtube: set {self.settings.key_env} to the caption ingestion key (cid)")
        self._key = key
        self._seq_file = self._state_file()
        self.seq = self._load_seq()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="youtube-captions", daemon=True)
        self._thread.start()

    def on_caption(self, caption) -> None:
        if caption.is_silence:
            return
        text = "\n".join(" ".join(line.split()) for line in caption.text.splitlines() if line.strip())
        if caption.kind == "answer":
            text = self.settings.answer_prefix + text
        when = caption.created_at - caption.latency_s - max(0.0, caption.stop - caption.start) + self.settings.offset_s
        with self._cond:
            self._pending.append((when, text))
            if len(self._pending) > self.settings.max_pending:  # a long outage: the oldest not in the request goes
                del self._pending[self._sending]
                self.counters["lost"] += 1
            self._cond.notify()
        if self.error:
            raise DeliveryError(self.error)

    def stop(self) -> None:
        with self._cond:
            self._stop.set()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(self.settings.stop_timeout_s + self.settings.timeout_s)
        with self._cond:
            left = len(self._pending)
            self._pending.clear()
        self.counters["lost"] += left
        if self.counters["lost"]:
            raise DeliveryError(f"youtube: {self.counters['lost']} caption(s) not delivered"
                                + (f" ({self.error})" if self.error else ""))

    def describe(self) -> str:
        return f"youtube:{self.settings.url}"

    def stats(self) -> dict:
        return {**self.counters, "seq": self.seq, "connected": self.connected,
                "clock_offset_s": round(self.clock_offset, 3), "pending": len(self._pending)}

    # --- sender thread ---------------------------------------------------------------
    def body(self, batch: list[tuple[float, str]]) -> bytes:
        """The request body: for each caption its server-clock stamp line and its text line."""
        lines = []
        for when, text in batch:
            lines.append(stamp(when + self.clock_offset))
            lines.append(text.replace("\r", "").replace("\n", "<br>"))
        return ("\n".join(lines) + "\n").encode()

    def _post(self, body: bytes) -> tuple[int, str]:
        """POST one body with the current seq; (HTTP status, answer text). Raises OSError."""
        query = urllib.parse.urlencode({"cid": self._key, "seq": self.seq})
        sep = "&" if "?" in self.settings.url else "?"
        req = urllib.request.Request(f"{self.settings.url}{sep}{query}", data=body, method="POST",
                                     headers={"Content-Type": "text/plain; charset=utf-8"})
        sent = time.time()
        try:
            with urllib.request.urlopen(req, timeout=self.settings.timeout_s) as r:
                status, answer = r.status, r.read(4096).decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, ""
        server = parse_stamp(answer)
        if server is not None:  # the server's clock at about the middle of the round trip
            self.clock_offset = server - (sent + time.time()) / 2
        return status, answer

    def _state_file(self) -> Path | None:
        where = self.settings.seq_dir
        if where == "off":
            return None
        if not where:
            where = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "livecc" / "youtube"
        name = hashlib.sha256(f"{self.settings.url}\0{self._key}".encode()).hexdigest()[:24]
        return Path(where).expanduser() / f"{name}.seq"

    def _load_seq(self) -> int:
        """The next seq this URL and key take: from the state file, else 1."""
        try:
            text = self._seq_file.read_text().strip() if self._seq_file else ""
            return max(1, int(text)) if text else 1
        except FileNotFoundError:
            return 1
        except (OSError, ValueError) as e:
            log.warning("youtube captions: cannot read the seq state %s (%s): seq starts at 1", self._seq_file,
                        type(e).__name__)
            return 1

    def _save_seq(self) -> None:
        """Keep the next seq (after each accepted request; written whole, through a rename)."""
        if self._seq_file is None:
            return
        try:
            self._seq_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._seq_file.with_suffix(".tmp")
            tmp.write_text(f"{self.seq}\n")
            os.replace(tmp, self._seq_file)
        except OSError as e:
            if not self._seq_warned:
                log.warning("youtube captions: cannot keep the seq in %s (%s); a restart would start at 1",
                            self._seq_file, e.strerror or type(e).__name__)
            self._seq_warned = True

    def _safe(self, e: BaseException) -> str:
        text = f"{type(e).__name__}: {e}"
        if self._key:
            text = text.replace(self._key, "***")
        return redact(text)

    def _run(self) -> None:
        s = self.settings
        backoff = Backoff(initial=s.backoff_initial_s, max_delay=s.backoff_max_s)
        deadline: float | None = None
        while True:
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._pending[: s.max_batch]
                self._sending = len(batch)
            if self._stop.is_set() and deadline is None:
                deadline = time.monotonic() + s.stop_timeout_s
            if deadline is not None and time.monotonic() >= deadline:
                return
            body = self.body(batch)  # fixed for every retry of this seq
            attempt = 1
            while True:
                self.counters["requests"] += 1
                try:
                    status, _ = self._post(body)
                    err = None if status < 300 else f"HTTP {status}"
                except OSError as e:
                    status, err = 0, self._safe(e)
                if err is None:
                    self.connected = True
                    self.counters["sent"] += len(batch)
                    self.seq += 1
                    self._save_seq()
                    break
                self.connected = False
                if 400 <= status < 500 and status not in (408, 429):
                    self.error = f"youtube: caption ingestion refused ({err}); check {s.key_env}"
                    log.error("%s; %d caption(s) lost", self.error, len(batch))
                    self.counters["lost"] += len(batch)
                    break
                attempt += 1
                self.counters["retries"] += 1
                if attempt == 2 or attempt % 10 == 0:
                    log.warning("youtube captions: %s; retrying (seq %d)", err, self.seq)
                delay = backoff.delay(attempt)
                if deadline is None:
                    self._stop.wait(delay)  # a stop request ends the wait and starts the deadline
                    if self._stop.is_set():
                        deadline = time.monotonic() + s.stop_timeout_s
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return  # stop() counts what is left
                    time.sleep(min(delay, left))
            with self._cond:
                del self._pending[: len(batch)]
                self._sending = 0
