"""YouTube caption-ingestion sink against a real aiohttp server on loopback that checks the
documented format (cid and seq in the URL; body of UTC 'YYYY-MM-DDTHH:MM:SS.mmm' lines, each
followed by a text line with <br> breaks), answers with its own (skewed) clock, and fails for a
while: nothing lost, nothing accepted twice, seq in order, stamps on the server's clock."""

from __future__ import annotations

import logging
import re
import time

import pytest
from aiohttp import web
from servers import LoopbackApp, wait_until

from pipeline.fanout.sink import DeliveryError
from pipeline.types import Caption
from plugins.sinks.youtube import YoutubeSink, parse_stamp, stamp

KEY = "abcd-efgh-ijkl-mnop"
SKEW = 37.0  # the server's clock is this far ahead of ours
STAMP_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}$")


class IngestionServer:
    """POST /closedcaption?cid=KEY&seq=N; 503 while ``failing``; records accepted captions."""

    def __init__(self) -> None:
        self.accepted: list[tuple[int, float, str]] = []  # (seq, stamp, text)
        self.seqs: list[int] = []  # every request's seq, in arrival order
        self.errors: list[str] = []
        self.fail_until = 0.0

        async def handler(request: web.Request) -> web.Response:
            if request.query.get("cid") != KEY:
                return web.Response(status=403)
            seq = int(request.query["seq"])
            self.seqs.append(seq)
            if time.monotonic() < self.fail_until:
                return web.Response(status=503)
            body = await request.text()
            if request.content_type != "text/plain" or not body.endswith("\n"):
                self.errors.append(f"bad body/type: {request.content_type} {body!r}")
                return web.Response(status=400)
            lines = body[:-1].split("\n")
            if len(lines) % 2 or any(not STAMP_LINE.match(ln) for ln in lines[0::2]):
                self.errors.append(f"bad lines: {lines}")
                return web.Response(status=400)
            last = self.accepted[-1][0] if self.accepted else 0
            if seq <= last:
                self.errors.append(f"seq {seq} after {last}")  # a repeat of an accepted request
                return web.Response(status=400)
            for st, text in zip(lines[0::2], lines[1::2]):
                self.accepted.append((seq, parse_stamp(st), text))
            return web.Response(text=stamp(time.time() + SKEW) + "\n")

        self.app = LoopbackApp([("POST", "/closedcaption", handler)])
        self.port = self.app.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/closedcaption"

    def close(self) -> None:
        self.app.close()


@pytest.fixture
def server():
    srv = IngestionServer()
    yield srv
    srv.close()


def run_captions(server, monkeypatch, caplog, outage_s: float, n: int = 16, every: float = 0.25):
    monkeypatch.setenv("YOUTUBE_CAPTION_KEY", KEY)
    sink = YoutubeSink(url=server.url, backoff_initial_s=0.2, backoff_max_s=1.0, stop_timeout_s=outage_s + 5,
                       seq_dir="off")
    sink.start()
    sent = []
    with caplog.at_level(logging.DEBUG):
        for i in range(n):
            if i == 4:
                server.fail_until = time.monotonic() + outage_s
            text = f"caption {i}: the keeper\ndives left"
            now = time.time()
            sink.on_caption(Caption(i, i + 0.5, text, created_at=now, latency_s=0.2))
            sent.append((now - 0.2 - 0.5, text))
            time.sleep(every if i != n // 2 else max(every, outage_s / 2))
        sink.stop()
    return sink, sent


def check(server, sink, sent, caplog) -> None:
    assert not server.errors, server.errors
    texts = [t for _, _, t in server.accepted]
    assert texts == [t.replace("\n", "<br>") for _, t in sent]  # every caption once, in order
    seqs = [s for s, _, _ in server.accepted]
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1))  # accepted seqs 1, 2, 3, ... no gaps
    assert sink.counters["retries"] >= 1 and sink.counters["lost"] == 0
    # after the first answer the stamps follow the server's clock, not ours
    first_seq = seqs[0]
    for (seq, st, _), (local, _) in zip(server.accepted, sent):
        if seq > first_seq:
            assert abs(st - (local + SKEW)) < 0.5, (seq, st - local)
    assert KEY not in caplog.text and KEY not in str(sink.stats()) and KEY not in sink.describe()


def test_youtube_captions_survive_an_outage_without_loss_or_repeats(server, monkeypatch, caplog):
    sink, sent = run_captions(server, monkeypatch, caplog, outage_s=3.0)
    check(server, sink, sent, caplog)
    assert len(server.seqs) > len(set(server.seqs))  # the failed request was repeated with its seq


@pytest.mark.slow  # the documented 20 s outage
def test_youtube_captions_survive_a_20s_outage(server, monkeypatch, caplog):
    sink, sent = run_captions(server, monkeypatch, caplog, outage_s=20.0)
    check(server, sink, sent, caplog)


def test_youtube_outage_of_hours_holds_a_bounded_backlog(server, monkeypatch):
    """YouTube's ingestion answering 503 for a long time (3,000 captions here; a day at one a second is 86,400):
    the sink holds at most ``max_pending`` captions, letting the oldest not yet in a request go (counted lost, so
    the run reports it); once YouTube is back the newest are delivered in order, the request in flight unchanged."""
    monkeypatch.setenv("YOUTUBE_CAPTION_KEY", KEY)
    server.fail_until = time.monotonic() + 3600
    sink = YoutubeSink(url=server.url, backoff_initial_s=0.05, backoff_max_s=0.1, max_batch=10, max_pending=100,
                       seq_dir="off")
    sink.start()
    try:
        sink.on_caption(Caption(0, 1, "caption 0", created_at=time.time(), latency_s=0.2))
        wait_until(lambda: server.seqs, 20, "the first request tried (and refused)")  # in flight from now on
        for i in range(1, 3000):
            sink.on_caption(Caption(i, i + 1, f"caption {i}", created_at=time.time(), latency_s=0.2))
            assert len(sink._pending) <= 100
        server.fail_until = 0.0
        deadline = time.monotonic() + 20
        while sink.stats()["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        with pytest.raises(DeliveryError, match="not delivered"):
            sink.stop()
    assert not server.errors, server.errors
    texts = [t for _, _, t in server.accepted]
    numbers = [int(t.split()[1]) for t in texts]
    assert numbers == sorted(numbers) and len(texts) == 100
    assert numbers[0] == 0 and numbers[1:] == list(range(2901, 3000))  # the request in flight, then the newest
    assert sink.counters["lost"] == 3000 - 100


def test_youtube_wrong_key_is_reported_not_retried(server, monkeypatch):
    monkeypatch.setenv("YOUTUBE_CAPTION_KEY", "wrong")
    sink = YoutubeSink(url=server.url, backoff_initial_s=0.1, seq_dir="off")
    sink.start()
    sink.on_caption(Caption(0, 1, "first"))
    deadline = time.monotonic() + 5
    while sink.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(DeliveryError, match="refused.*HTTP 403"):
        sink.on_caption(Caption(1, 2, "second"))
    with pytest.raises(DeliveryError):
        sink.stop()
    assert "wrong" not in str(sink.error)


def test_youtube_needs_the_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("YOUTUBE_CAPTION_KEY", raising=False)
    with pytest.raises(DeliveryError, match="YOUTUBE_CAPTION_KEY"):
        YoutubeSink().start()
    with pytest.raises(ValueError, match="environment"):
        YoutubeSink(url="http://upload.youtube.com/closedcaption?cid=SECRET")


def test_youtube_seq_goes_on_after_a_restart(server, monkeypatch, tmp_path, caplog):
    """A pipeline restarted mid-broadcast: the new sink's first request carries the seq after the last accepted one
    (the ingestion server here refuses a seq it has accepted already, as a repeat), not 1; the state file is named
    by a hash, never the key; an unwritable state folder is logged and the captions go on; ``off`` starts at 1."""
    monkeypatch.setenv("YOUTUBE_CAPTION_KEY", KEY)

    def session(texts, **kw):
        sink = YoutubeSink(url=server.url, backoff_initial_s=0.05, **kw)
        sink.start()
        for t in texts:
            sink.on_caption(Caption(0, 1, t, created_at=time.time(), latency_s=0.1))
            wait_until(lambda: any(a[2] == t for a in server.accepted), 10, f"{t!r} accepted")
        sink.stop()
        return sink

    state = tmp_path / "state"
    session(["one", "two", "three"], seq_dir=str(state))
    files = list(state.iterdir())
    assert len(files) == 1 and KEY not in files[0].name and files[0].read_text().strip() == "4"
    second = session(["four", "five"], seq_dir=str(state))
    assert [s for s, _, _ in server.accepted] == [1, 2, 3, 4, 5] and not server.errors, server.errors
    assert second.stats()["seq"] == 6
    files[0].with_suffix(".tmp").mkdir()  # the state can be read but no longer written: logged, delivered all the same
    session(["six"], seq_dir=str(state))
    assert server.accepted[-1][0::2] == (6, "six") and files[0].read_text().strip() == "6"
    assert "cannot keep the seq" in caplog.text and KEY not in caplog.text
    fresh = YoutubeSink(url=server.url, seq_dir="off")
    fresh.start()
    assert fresh.seq == 1
    fresh.stop()
