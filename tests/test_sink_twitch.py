"""Twitch sink against a real IRC server (Debian ngircd) on loopback, read by a second client."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline.plugins import make_sink
from pipeline.types import Caption
from plugins.sinks.twitch import SlidingWindowLimiter, clean_text, split_message

TOKEN = "oauth:s3cr3ttoken"
pytestmark = pytest.mark.skipif(not shutil.which("ngircd"), reason="ngircd not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ngircd:
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "ngircd.conf"
        self.conf.write_text(
            f"""[Global]
Name = irc.test.local
Info = livecc test
Listen = 127.0.0.1
Ports = {port}
Password = {TOKEN}
MotdPhrase = test
PidFile = {root}/ngircd.pid
[Limits]
MaxNickLength = 25
MaxPenaltyTime = 0
PingTimeout = 120
PongTimeout = 20
[Options]
PAM = no
DNS = no
Ident = no
"""
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["ngircd", "-n", "-f", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError("ngircd did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class Reader(threading.Thread):
    """A second IRC client in the channel, recording (arrival time, text) of every PRIVMSG."""

    def __init__(self, port: int, channel: str = "#livecc") -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.channel = channel
        self.messages: list[tuple[float, str, str]] = []  # (time, sender, text)
        self.joined = threading.Event()
        self.closed = threading.Event()
        self.sock.sendall(f"PASS {TOKEN}\r\nNICK viewer\r\nUSER viewer 0 * :v\r\nJOIN {channel}\r\n".encode())
        self.start()
        assert self.joined.wait(10)

    def run(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                now = time.monotonic()
                buf += data
                *lines, buf = buf.split(b"\r\n")
                for raw in lines:
                    line = raw.decode()
                    if line.startswith("PING"):
                        self.sock.sendall(b"PONG" + raw[4:] + b"\r\n")
                    parts = line.split(" ", 3)
                    if len(parts) >= 2 and parts[1] == "366":
                        self.joined.set()
                    if len(parts) == 4 and parts[1] == "PRIVMSG":
                        self.messages.append((now, parts[0][1:].split("!")[0], parts[3][1:]))
        except OSError:
            pass
        self.closed.set()

    def texts(self) -> list[str]:
        return [m[2] for m in self.messages]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def ircd(tmp_path):
    srv = Ngircd(tmp_path / "irc", free_port())
    srv.start()
    yield srv
    srv.stop()


_started: list = []


@pytest.fixture(autouse=True)
def _stop_sinks():
    yield
    while _started:
        s = _started.pop()
        if s._thread is not None and s._thread.is_alive():
            s.stop()


def twitch(port: int, **kw):
    settings = dict(host="127.0.0.1", port=port, tls=False, nick="livecc_bot", token=TOKEN,
                    reconnect_initial_s=0.2, reconnect_max_s=1.0, connect_timeout_s=5)
    settings.update(kw)
    sink = make_sink("twitch:#LiveCC", **settings)
    _started.append(sink)
    return sink


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not pred():
        time.sleep(0.02)
    return pred()


def test_helpers():
    assert clean_text("line one\r\nPRIVMSG #x :injected") == "line one PRIVMSG #x :injected"
    assert clean_text("/ban someone") == "ban someone"
    assert clean_text("...and he scores") == "and he scores"
    first, rest = split_message("word " * 30, 50)
    assert len(first) <= 50 and first.endswith("word") and rest.startswith("word")
    first, rest = split_message("é" * 300, 500, 100)
    assert len(first.encode()) <= 100 and first + rest == "é" * 300
    lim = SlidingWindowLimiter(2, 1.0)
    lim.record(0.0), lim.record(0.1)
    assert lim.wait_time(0.5) == pytest.approx(0.5) and lim.wait_time(1.0) == 0


def test_joins_posts_and_filters(ircd):
    reader = Reader(ircd.port)
    sink = twitch(ircd.port)
    sink.start()
    assert sink.connected.wait(10)
    for c in [
        Caption(0, 1, "Kickoff!"),
        Caption(1, 2, " ..."),  # silence: never posted
        Caption(2, 3, ""),
        Caption(3, 4, "Kickoff!"),  # repeat: skipped
        Caption(4, 5, "evil\r\nQUIT :bye"),  # stays one message, no injected command
        Caption(5, 6, "Two goals so far", kind="answer", query="score?"),
        Caption(6, 7, "x" * 700),  # over the limit: split into two messages
    ]:
        sink.on_caption(c)
        time.sleep(0.05)  # let each go alone (no merging) for exact assertions
    assert wait_for(lambda: len(reader.messages) >= 5), (reader.messages, sink.stats)
    sink.stop()
    texts = reader.texts()
    assert texts[:3] == ["Kickoff!", "evil QUIT :bye", "A: Two goals so far"]
    # split to fit one 512-byte IRC line ("PRIVMSG #livecc :" + text + CRLF), nothing lost
    assert "".join(texts[3:]) == "x" * 700 and "[CUT]" not in texts[3]
    assert len(texts[3]) == 512 - len(":livecc_bot!~livecc_bot@ ") - 63 - len("PRIVMSG #livecc :\r\n")
    assert all(sender == "livecc_bot" for _, sender, _ in reader.messages)
    assert sink.counters["skipped_repeats"] == 1
    reader.close()


def test_burst_respects_rate_limit_and_merging_keeps_up(ircd):
    reader = Reader(ircd.port)
    n, window = 8, 1.2  # Twitch's 20 per 30 s, scaled down to keep the test short
    sink = twitch(ircd.port, rate_messages=n, rate_window_s=window, merge=False)
    sink.start()
    assert sink.connected.wait(10)
    t0 = time.monotonic()
    for i in range(40):
        sink.on_caption(Caption(i, i + 1, f"burst {i}"))
    assert wait_for(lambda: len(reader.messages) == 40, 15)
    times = [t for t, _, _ in reader.messages]
    assert reader.texts() == [f"burst {i}" for i in range(40)]  # nothing lost, in order
    # server side: no window of `window` seconds holds more than n messages
    for i in range(len(times) - n):
        assert times[i + n] - times[i] >= window - 0.05, (i, times[i + n] - times[i])
    assert times[-1] - t0 >= 4 * window - 0.1  # 40 messages need at least 4 full windows
    assert times[n - 1] - t0 < 0.5  # the first n go out at once
    sink.stop()
    # with merging (the default), held-back captions travel together within the same limit
    reader.messages.clear()
    sink = twitch(ircd.port, rate_messages=n, rate_window_s=window)
    sink.start()
    assert sink.connected.wait(10)
    for i in range(40):
        sink.on_caption(Caption(i, i + 1, f"m{i}"))
    assert wait_for(lambda: " ".join(reader.texts()).split() == [f"m{i}" for i in range(40)], 10)
    # n go out while the burst is still arriving; everything after waits for the window, together
    assert len(reader.messages) <= n + 1
    sink.stop()
    reader.close()


def test_reconnects_after_server_restart(ircd):
    sink = twitch(ircd.port)
    sink.start()
    assert sink.connected.wait(10)
    ircd.stop()
    assert wait_for(lambda: not sink.connected.is_set(), 5)
    sink.on_caption(Caption(0, 1, "while the server was down"))
    time.sleep(0.5)
    ircd.start()
    reader = Reader(ircd.port)
    assert sink.connected.wait(10)
    sink.on_caption(Caption(1, 2, "after the restart"))
    assert wait_for(lambda: "after the restart" in reader.texts(), 10)
    # the caption queued while disconnected is delivered after reconnecting (if the reader was
    # already in the channel); at least it must not block what follows
    assert sink.counters["reconnects"] >= 1
    sink.stop()
    reader.close()


def test_wrong_token_is_reported_not_raised(ircd):
    sink = twitch(ircd.port, token="oauth:wrong")
    sink.start()
    assert wait_for(lambda: sink.counters["errors"] >= 1, 10)
    assert not sink.connected.is_set()
    assert "wrong" not in sink.last_error and "wrong" not in repr(sink.settings)
    sink.stop()
