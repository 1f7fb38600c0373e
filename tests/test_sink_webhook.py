"""Webhook sink against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from servers import LoopbackApp

from pipeline.fanout.dispatch import Dispatcher
from pipeline.plugins import make_sink
from pipeline.fanout.sink import DeliveryError
from pipeline.types import Caption, StreamEvent


class Hook:
    """An aiohttp server in a thread; answers with the queued statuses, then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, str, dict, dict]] = []
        self.statuses: list[int] = []
        self.retry_after: str | None = None
        self.delay = 0.0  # seconds before each answer: a slow server

        async def handler(request: web.Request) -> web.Response:
            body = await request.json()
            self.requests.append((time.monotonic(), request.path, dict(request.headers), body))
            status = self.statuses.pop(0) if self.statuses else 200
            await asyncio.sleep(self.delay)
            headers = {"Retry-After": self.retry_after} if status == 429 and self.retry_after else {}
            return web.Response(status=status, text="{}", headers=headers)

        self.app = LoopbackApp([("POST", "/{tail:.*}", handler)])
        self.port = self.app.port

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.app.close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def sink(url, **kw):
    kw.setdefault("backoff_initial_s", 0.05)
    return make_sink(f"webhook:{url}", **kw)


def test_retries_on_500_then_succeeds(hook):
    hook.statuses = [500, 503]
    s = sink(hook.url(), headers={"Authorization": "Bearer t"})
    s.start()
    s.on_caption(Caption(1.0, 2.0, "He shoots!", turn=3))
    assert len(hook.requests) == 3 and s.sent == 1
    t = [r[0] for r in hook.requests]
    assert t[2] - t[1] >= t[1] - t[0] >= 0.04  # backoff grows
    _, path, headers, body = hook.requests[-1]
    assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer t"
    assert body["type"] == "caption" and body["text"] == "He shoots!" and body["start"] == 1.0 and body["turn"] == 3
    s.stop()


def test_discord_and_slack_shapes_and_silence(hook):
    d = sink(hook.url("/discord"), format="discord", username="LiveCC")
    d.on_caption(Caption(0, 1, "@everyone  what a <goal>"))
    d.on_caption(Caption(1, 2, " ..."))  # never posted
    d.on_caption(Caption(1, 2, ""))
    d.on_caption(Caption(2, 3, "2-1", kind="answer", query="score?"))
    sl = sink(hook.url("/slack"), format="slack")
    sl.on_caption(Caption(0, 1, "<!channel> & co"))
    bodies = [(r[1], r[3]) for r in hook.requests]
    assert bodies == [
        ("/discord", {"content": "@everyone what a <goal>", "allowed_mentions": {"parse": []}, "username": "LiveCC"}),
        ("/discord", {"content": "A: 2-1", "allowed_mentions": {"parse": []}, "username": "LiveCC"}),
        ("/slack", {"text": "&lt;!channel&gt; &amp; co"}),
    ]


def test_429_retry_after_and_4xx_not_retried(hook):
    hook.statuses = [429]
    hook.retry_after = "0.2"
    s = sink(hook.url())
    t0 = time.monotonic()
    s.on_caption(Caption(0, 1, "a"))
    assert len(hook.requests) == 2 and hook.requests[1][0] - t0 >= 0.19
    hook.statuses = [400]
    with pytest.raises(DeliveryError, match="HTTP 400"):
        s.on_caption(Caption(0, 1, "b"))
    assert len(hook.requests) == 3


def test_unreadable_retry_after_falls_back_on_backoff(hook):
    hook.statuses, hook.retry_after = [429], "soon"
    s = sink(hook.url())
    s.on_caption(Caption(0, 1, "a"))
    assert len(hook.requests) == 2 and s.sent == 1 and s.attempts == 2


def test_unreachable_gives_up_and_dispatcher_reports(hook):
    url = hook.url("/api/webhooks/123/PATHSECRET?token=SECRET")
    hook.close()  # nothing listens any more
    s = sink(url, retries=2, timeout_s=1)
    d = Dispatcher([s])
    d.start()
    d.caption(Caption(0, 1, "lost"))
    end = time.monotonic() + 10
    while d.status()["webhook"]["failed"] < 1 and time.monotonic() < end:
        time.sleep(0.05)
    st = d.status()["webhook"]
    assert st["failed"] == 1 and st["retries"] == 0 and st["state"] == "failed"
    assert s.attempts == 3 and "SECRET" not in st["last_error"] and "SECRET" not in st["sink"]
    assert st["sink"] == f"webhook:http://127.0.0.1:{hook.port}/…"
    d.stop(2)


def test_generic_events(hook):
    s = sink(hook.url(), include_events=True)
    s.on_event(StreamEvent("source_lost", 12.5, "eof"))
    assert hook.requests[0][3]["type"] == "event" and hook.requests[0][3]["kind"] == "source_lost"


def test_retries_fit_in_the_dispatchers_call_timeout(hook):
    """A slow server answering 503: the sink stops retrying before the call timeout, so it is
    reported failed, never hung (without the deadline: 6 attempts of 0.4 s + 1.55 s of waits)."""
    hook.statuses, hook.delay = [503] * 10, 0.4
    s = sink(hook.url(), retries=5, timeout_s=1.0)
    d = Dispatcher([s], call_timeout=2.0, watch_interval=0.05)
    d.start()
    t0 = time.monotonic()
    d.caption(Caption(0, 1, "slow"))
    end = t0 + 10
    while d.status()["webhook"]["failed"] < 1 and time.monotonic() < end:
        time.sleep(0.02)
    st = d.status()["webhook"]
    assert time.monotonic() - t0 < 2.0 and st["state"] == "failed" and st["hangs"] == 0
    assert len(hook.requests) == 2 and "HTTP 503" in st["last_error"] and "out of time" in st["last_error"]
    d.stop(2)


def test_retries_fit_in_the_shutdown_budget(hook):
    """Stopping while the sink retries: it gives up within the shutdown budget, not hung; it lost the caption, so
    its final state is failed (a sink that lost data is never reported stopped)."""
    hook.statuses, hook.delay = [503] * 30, 0.3
    s = sink(hook.url(), retries=20, timeout_s=1.0)
    d = Dispatcher([s], call_timeout=30)
    d.start()
    d.caption(Caption(0, 1, "bye"))
    time.sleep(0.2)
    t0 = time.monotonic()
    st = d.stop(1.5)["webhook"]
    assert time.monotonic() - t0 < 1.5 and st["state"] == "failed" and st["hangs"] == 0 and st["failed"] == 1
