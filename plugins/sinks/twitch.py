"""Twitch chat sink: captions posted to a channel over IRC.

PASS oauth:<token> / NICK / USER / JOIN, then PRIVMSG per message; PING answered with PONG;
Twitch's ``RECONNECT`` and any dropped connection lead to a reconnect with backoff.

Rate limit: at most ``rate_messages`` messages in any ``rate_window_s`` seconds (Twitch: 20 per
30 s, 100 for moderators), enforced as a sliding window over the send times, so even a burst
right at a window edge stays inside the limit. While the limit holds messages back, queued
captions are joined into one message (``merge``) up to ``max_chars`` (Twitch's 500), so the chat
keeps up with the commentary. Captions are never posted when they are silence (empty or the
model's ' ...'); repeats of the previous text are skipped (``skip_repeats``); line breaks are
removed (no IRC command injection) and a leading ``/`` or ``.`` is dropped (no chat commands).

All network work happens in the sink's own thread; ``on_caption`` only queues.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import ssl
import threading
import time

from pydantic import SecretStr, field_validator

from pipeline.backoff import Backoff
from pipeline.fanout.sink import CaptionText, Sink
from pipeline.redact import redact

log = logging.getLogger(__name__)


class SlidingWindowLimiter:
    """At most ``n`` events in any ``window`` seconds."""

    def __init__(self, n: int, window: float) -> None:
        self.n, self.window = n, window
        self.sent: collections.deque[float] = collections.deque()

    def wait_time(self, now: float) -> float:
        while self.sent and now - self.sent[0] >= self.window:
            self.sent.popleft()
        if len(self.sent) < self.n:
            return 0.0
        return self.sent[0] + self.window - now

    def record(self, now: float) -> None:
        self.sent.append(now)


def clean_text(text: str) -> str:
    text = " ".join(text.replace("\x00", " ").split())  # no CR/LF: one IRC line, no injection
    while text and text[0] in "/.":
        text = text[1:].lstrip()
    return text


def split_message(text: str, limit: int, limit_bytes: int | None = None) -> tuple[str, str]:
    """(first part of at most ``limit`` chars and ``limit_bytes`` UTF-8 bytes, ending at a word
    boundary when possible, rest)."""
    if limit_bytes is not None:
        while limit > 1 and len(text[:limit].encode()) > limit_bytes:
            limit -= max(1, (len(text[:limit].encode()) - limit_bytes) // 4)
    if len(text) <= limit:
        return text, ""
    cut = text.rfind(" ", 0, limit + 1)
    if cut <= limit // 2:
        cut = limit
    return text[:cut].rstrip(), text[cut:].lstrip()


class TwitchSink(Sink):
    name = "twitch"
    target_field = "channel"

    class Settings(CaptionText):
        channel: str
        host: str = "irc.chat.twitch.tv"
        port: int = 6697
        tls: bool = True
        nick: str = "justinfan12345"
        token: SecretStr | None = None  # OAuth token ("oauth:" optional); else from token_env
        token_env: str = "TWITCH_OAUTH_TOKEN"
        moderator: bool = False  # 100 messages per window instead of 20
        rate_messages: int | None = None  # None: 20, or 100 when moderator
        rate_window_s: float = 30.0
        max_chars: int = 500
        max_line_bytes: int = 512  # IRC line limit (RFC 1459), counting the prefix the server adds
        merge: bool = True  # join captions held back by the rate limit into one message
        skip_repeats: bool = True
        prefix: str = ""
        max_pending: int = 200
        connect_timeout_s: float = 10.0
        reconnect_initial_s: float = 1.0
        reconnect_max_s: float = 30.0
        flush_timeout_s: float = 2.0  # at stop, time allowed to send what is still queued

        @field_validator("channel")
        @classmethod
        def _channel(cls, v: str) -> str:
            v = v.strip().lower()
            v = v if v.startswith("#") else "#" + v
            if len(v) < 2 or any(c in v for c in " ,\r\n\x07\x00"):
                raise ValueError(f"not a channel name: {v!r}")
            return v

        @field_validator("max_chars")
        @classmethod
        def _max_chars(cls, v: int) -> int:
            if not 1 <= v <= 500:
                raise ValueError("max_chars must be between 1 and 500 (Twitch's limit)")
            return v

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        s = self.settings
        n = s.rate_messages if s.rate_messages is not None else (100 if s.moderator else 20)
        self.limiter = SlidingWindowLimiter(n, s.rate_window_s)
        self._pending: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe()  # on_caption wakes the IRC thread at once
        os.set_blocking(self._wake_w, False)
        self._buf = b""
        self._last_text: str | None = None
        self.connected = threading.Event()
        self.counters = collections.Counter()

    # --- sink API ----------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="twitch-irc", daemon=True)
        self._thread.start()

    def on_caption(self, caption) -> None:
        text = clean_text(self.text_of(caption) or "")
        if not text:
            return
        if self.settings.skip_repeats and text == self._last_text:
            self.counters["skipped_repeats"] += 1
            return
        self._last_text = text
        with self._cond:
            if len(self._pending) >= self.settings.max_pending:
                self._pending.popleft()
                self.counters["dropped"] += 1
            self._pending.append(text)
            self._cond.notify()
        self._wake()

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def stop(self) -> None:
        # inside the dispatcher's deadline (0.5 s to spare): flush up to flush_timeout_s, then end the thread
        budget = float("inf") if self.deadline is None else self.deadline - 0.5
        with self._cond:  # woken when a message goes out or the connection drops
            self._cond.wait_for(lambda: not self._pending or not self.connected.is_set(),
                                max(0.0, min(self.settings.flush_timeout_s, (budget - time.monotonic()) / 2)))
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(max(0.0, min(self.settings.connect_timeout_s + 2, budget - time.monotonic())))
        if self._thread is None or not self._thread.is_alive():
            fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
            for fd in fds:  # closed once only: a reused descriptor number is not ours
                if fd >= 0:
                    os.close(fd)

    def describe(self) -> str:
        return f"twitch:{self.settings.channel}"

    def stats(self) -> dict:
        return {**self.counters, "connected": self.connected.is_set(), "pending": len(self._pending)}

    # --- IRC -----------------------------------------------------------------------------
    def _token(self) -> str | None:
        tok = self.settings.token.get_secret_value() if self.settings.token else None
        tok = tok or os.environ.get(self.settings.token_env)
        if not tok:
            return None
        return tok if tok.startswith("oauth:") else "oauth:" + tok

    def _send_line(self, line: str) -> None:
        assert self._sock is not None
        self._sock.sendall(line.encode("utf-8", "replace") + b"\r\n")

    def _read_lines(self, timeout: float) -> list[str]:
        sock = self._sock
        assert sock is not None
        pending_tls = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not pending_tls:
            r, _, _ = select.select([sock, self._wake_r], [], [], max(0.0, timeout))
            if self._wake_r in r:
                os.read(self._wake_r, 4096)
            if sock not in r:
                return []
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self._buf += data
        *lines, self._buf = self._buf.split(b"\r\n") if b"\r\n" in self._buf else self._buf.split(b"\n")
        return [ln.decode("utf-8", "replace").rstrip("\r\n") for ln in lines if ln.strip()]

    def _handle(self, line: str) -> None:
        """Protocol housekeeping common to every phase; raises to force a reconnect."""
        if line.startswith("@"):  # IRCv3 tags (Twitch): not needed here
            line = line.split(" ", 1)[1] if " " in line else ""
        parts = line.split(" ")
        cmd = parts[1] if line.startswith(":") and len(parts) > 1 else parts[0]
        if cmd == "PING":
            arg = line[line.find("PING") + 4 :].strip()
            self._send_line(f"PONG {arg}" if arg else "PONG")
        elif cmd in ("RECONNECT", "ERROR"):
            raise ConnectionError(f"server asked to reconnect: {line[:200]}")
        elif cmd in ("464", "465") or ("NOTICE" in cmd and "authentication failed" in line.lower()):
            raise PermissionError(f"login refused: {line[:200]}")
        elif cmd in ("433", "432"):
            raise PermissionError(f"nick refused: {line[:200]}")

    def _connect(self) -> None:
        s = self.settings
        raw = socket.create_connection((s.host, s.port), timeout=s.connect_timeout_s)
        if s.tls:
            ctx = ssl.create_default_context()
            raw = ctx.wrap_socket(raw, server_hostname=s.host)
        raw.settimeout(s.connect_timeout_s)
        self._sock, self._buf = raw, b""
        token = self._token()
        if token:
            self._send_line(f"PASS {token}")
        self._send_line(f"NICK {s.nick}")
        self._send_line(f"USER {s.nick} 0 * :{s.nick}")  # Twitch ignores it; plain IRC needs it
        self._await(lambda cmd, line: cmd == "001", "welcome")
        self._send_line(f"JOIN {s.channel}")
        chan = s.channel.lower()
        self._await(lambda cmd, line: (cmd == "366" or cmd == "JOIN") and chan in line.lower(), "join")

    def _await(self, pred, what: str) -> None:
        end = time.monotonic() + self.settings.connect_timeout_s
        while time.monotonic() < end:
            for line in self._read_lines(end - time.monotonic()):
                self._handle(line)
                parts = line.split(" ")
                cmd = parts[1] if line.startswith(":") and len(parts) > 1 else parts[0]
                if cmd in ("403", "405", "471", "473", "474", "475"):
                    raise PermissionError(f"cannot join: {line[:200]}")
                if pred(cmd, line):
                    return
        raise TimeoutError(f"no {what} from {self.settings.host} within {self.settings.connect_timeout_s} s")

    def _close(self) -> None:
        self.connected.clear()
        with self._cond:
            self._cond.notify_all()
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _next_message(self) -> str | None:
        s = self.settings
        limit = s.max_chars - len(s.prefix)
        # the server relays the line with ":nick!user@host " in front: leave room for it
        relay_prefix = len(f":{s.nick}!~{s.nick}@ ".encode()) + 63
        limit_bytes = s.max_line_bytes - relay_prefix - len(f"PRIVMSG {s.channel} :{s.prefix}\r\n".encode())
        with self._cond:
            if not self._pending:
                return None
            first, rest = split_message(self._pending.popleft(), limit, limit_bytes)
            if rest:
                self._pending.appendleft(rest)
            msg = first
            while s.merge and self._pending and not rest:
                nxt = self._pending[0]
                if len(msg) + 1 + len(nxt) > limit or len(f"{msg} {nxt}".encode()) > limit_bytes:
                    break
                msg += " " + self._pending.popleft()
                self.counters["merged"] += 1
            self._cond.notify_all()  # stop() waits for the queue to empty
        return s.prefix + msg

    def _run(self) -> None:
        s = self.settings
        backoff = Backoff(initial=s.reconnect_initial_s, max_delay=s.reconnect_max_s)
        attempt = 0  # connection attempts since the last good connection
        while not self._stop.is_set():
            attempt += 1
            try:
                self._connect()
                self.connected.set()
                if self.counters["connects"]:
                    self.counters["reconnects"] += 1
                self.counters["connects"] += 1
                log.info("twitch: joined %s on %s:%d", s.channel, s.host, s.port)
                attempt = 1  # a good connection: if it drops, the next wait is the first again
                self._serve()
            except Exception as e:
                self.counters["errors"] += 1
                self.last_error = redact(f"{type(e).__name__}: {e}")
                if not self._stop.is_set():
                    log.warning("twitch: %s; reconnecting in %.1f s", self.last_error, backoff.delay(attempt + 1))
            finally:
                if self._sock is not None and self._stop.is_set():
                    try:
                        self._send_line("QUIT :bye")
                    except OSError:
                        pass
                self._close()
            if backoff.wait(self._stop, attempt + 1):
                break

    def _serve(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            wait = 0.25
            if self._pending:
                wait = min(wait, self.limiter.wait_time(now))
                if wait <= 0:
                    msg = self._next_message()
                    if msg:
                        self._send_line(f"PRIVMSG {self.settings.channel} :{msg}")
                        self.limiter.record(time.monotonic())
                        self.counters["sent"] += 1
                    continue
            for line in self._read_lines(wait):
                self._handle(line)
