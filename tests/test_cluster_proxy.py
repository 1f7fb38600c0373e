"""``livecc serve --cluster``: a stream's sink pages pass through the head (``cluster.service.proxy``).

Without Ray: an overlay sink on a loopback server with a token (as a stream actor serves it), a head server whose
``/overlay/{id}...`` routes pass requests there; real HTTP requests to the head for the page, its script, the
recent captions, the event stream and the WebSocket. (tests/test_cluster.py does the same through a real
cluster.)"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from pipeline.cluster.service import proxy
from pipeline.plugins import make_sink
from pipeline.server import HttpServer, Route


@pytest.fixture
def head():
    sink = make_sink({"kind": "overlay", "name": "s1"})
    inner = HttpServer("127.0.0.1", 0, token="secret", name="sinks-s1")
    sink.mount(inner)
    inner.start()
    sink.start()

    async def through(request):
        return await proxy(request, f"http://127.0.0.1:{inner.port}", "secret")

    outer = HttpServer("127.0.0.1", 0)
    outer.mount([Route("GET", "/overlay/{id}", through, public=True),
                 Route("GET", "/overlay/{id}/{tail:.+}", through)])
    outer.start()
    try:
        yield sink, inner, outer
    finally:
        sink.stop()
        outer.stop()
        inner.stop()


def get(url: str) -> tuple[int, str, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_overlay_page_events_and_websocket_pass_through_the_head(head):
    import aiohttp

    sink, inner, outer = head
    sink.publish({"type": "caption", "caption": {"text": "first words"}})
    base = outer.url
    assert get(f"{inner.url}/overlay/s1/captions.json")[0] == 401  # the actor's server wants its token

    status, page, headers = get(f"{base}/overlay/s1")
    assert status == 200 and "/overlay/s1" in page and headers["Content-Type"].startswith("text/html")
    assert "Content-Security-Policy" in headers
    status, js, _ = get(f"{base}/overlay/s1/overlay.js?token=x")  # the head's token is not passed on
    assert status == 200 and "WebSocket" in js
    status, body, _ = get(f"{base}/overlay/s1/captions.json")
    assert status == 200 and json.loads(body)["captions"] == [{"text": "first words"}]
    assert get(f"{base}/overlay/s1/nothing")[0] == 404

    with urllib.request.urlopen(f"{base}/overlay/s1/events", timeout=10) as r:  # Server-Sent Events, as they come
        assert r.headers["Content-Type"].startswith("text/event-stream")
        got = b""
        while b"first words" not in got:
            got += r.read1(4096)
        sink.publish({"type": "caption", "caption": {"text": "second words"}})
        while b"second words" not in got:
            got += r.read1(4096)
    assert got.startswith(b"retry: 1000") and b"id: 2\n" in got

    async def websocket() -> list[dict]:
        url = base.replace("http://", "ws://") + "/overlay/s1/ws"
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            first = json.loads((await ws.receive(timeout=10)).data)
            sink.publish({"type": "caption", "caption": {"text": "third words"}})
            return [first, json.loads((await ws.receive(timeout=10)).data)]

    hello, caption = asyncio.run(websocket())
    assert hello["type"] == "hello" and [c["text"] for c in hello["recent"]] == ["first words", "second words"]
    assert caption == {"type": "caption", "caption": {"text": "third words"}}

    inner.stop()  # the actor gone (restarting): 502, not a hang
    status, body, _ = get(f"{base}/overlay/s1/captions.json")
    assert status == 502 and "does not answer" in body


def test_no_ray_cluster_is_one_line_naming_our_flag(monkeypatch):
    """`livecc serve --cluster auto` with no Ray cluster running: Ray's own advice ("setting `--address` flag
    or `RAY_ADDRESS`") names a flag livecc does not have; the error says how to start one or what to pass."""
    ray = pytest.importorskip("ray")
    from pipeline.cluster.service import ClusterService
    from pipeline.errors import PipelineError

    def init(**kw):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray, "init", init)
    svc = ClusterService({}, [{"id": "a", "source": "lavfi:testsrc2"}], address="auto")
    with pytest.raises(PipelineError) as e:
        svc.start()
    assert "--address" not in str(e.value) and "ray start --head" in str(e.value)
    assert "--cluster HOST:6379" in str(e.value)
