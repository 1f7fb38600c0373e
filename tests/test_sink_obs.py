"""OBS sink: obs-websocket v5 (Hello, Identify with the salted SHA-256 auth, SendStreamCaption).

Against a protocol-level peer written here from the documented handshake (fast), and against real
OBS Studio 29 headless under Xvfb, streaming to nginx-rtmp, killed and started again mid-run (~4 s); the
captions are then found as CEA-608 in the H.264 SEI of what OBS streamed (nginx's recording)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import threading
import time

import av
import pytest
from aiohttp import WSCloseCode, web

import obs_studio
from pipeline.fanout.sink import DeliveryError
from pipeline.types import Caption
from plugins.sinks.obs import ObsSink
from servers import free_port, wait_until
from test_sink_burnin import NginxRtmp, needs_nginx

PASSWORD = "correct horse battery staple"


def expected_auth(password: str, salt: str, challenge: str) -> str:
    """The documented formula, written out here independently of the sink."""
    secret = base64.b64encode(hashlib.sha256(password.encode() + salt.encode()).digest())
    return base64.b64encode(hashlib.sha256(secret + challenge.encode()).digest()).decode()


class FakeObs:
    """obs-websocket v5 server side: Hello with a fresh challenge/salt, checks Identify (closes with
    4009 on a wrong password), answers SendStreamCaption with result true; restartable on its port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.captions: list[str] = []
        self.identified = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = None
        self.sockets: set = set()

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("obswebsocket.json",))
        await ws.prepare(request)
        self.sockets.add(ws)
        salt, challenge = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        await ws.send_json({"op": 0, "d": {"obsWebSocketVersion": "5.1.0", "rpcVersion": 1,
                                           "authentication": {"challenge": challenge, "salt": salt}}})
        ident = await ws.receive_json()
        if ident["op"] != 1 or ident["d"].get("authentication") != expected_auth(PASSWORD, salt, challenge):
            await ws.close(code=4009, message=b"Authentication failed.")
            return ws
        self.identified += 1
        await ws.send_json({"op": 2, "d": {"negotiatedRpcVersion": 1}})
        async for msg in ws:
            req = msg.json()
            if req["op"] == 6:
                d = req["d"]
                ok = d["requestType"] == "SendStreamCaption" and isinstance(d["requestData"].get("captionText"), str)
                if ok:
                    self.captions.append(d["requestData"]["captionText"])
                await ws.send_json({"op": 7, "d": {"requestType": d["requestType"], "requestId": d["requestId"],
                                                   "requestStatus": {"result": ok, "code": 100 if ok else 204}}})
        return ws

    def start(self) -> None:
        async def boot():
            app = web.Application()
            app.router.add_get("/", self.handler)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(boot(), self.loop).result(10)

    def stop(self) -> None:
        async def down():
            for ws in list(self.sockets):  # OBS quitting closes its clients' connections
                await ws.close(code=WSCloseCode.GOING_AWAY)
            self.sockets.clear()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)


@pytest.fixture
def fake_obs():
    srv = FakeObs(free_port())
    srv.start()
    yield srv
    try:
        srv.stop()
    except Exception:
        pass
    srv.loop.call_soon_threadsafe(srv.loop.stop)


def sei_608_text(path) -> str:
    """The printable CEA-608 characters carried in the A/53 "GA94" SEI of an H.264 recording
    (field 1; control codes skipped, parity stripped)."""
    out = []
    with av.open(str(path)) as c:
        for packet in c.demux(video=0):
            data = bytes(packet)
            i = data.find(b"GA94")
            if i < 0 or data[i + 4] != 3:
                continue
            count = data[i + 5] & 0x1F
            cc = data[i + 7 : i + 7 + 3 * count]
            for k in range(0, len(cc) - 2, 3):
                if cc[k] & 0x07 != 0x04:  # cc_valid and field 1 (cc_type 0)
                    continue
                b1, b2 = cc[k + 1] & 0x7F, cc[k + 2] & 0x7F
                if b1 >= 0x20:
                    out += [chr(b) for b in (b1, b2) if b >= 0x20]
    return "".join(out)


def send(sink, texts, every: float = 0.05) -> None:
    for t in texts:
        sink.on_caption(Caption(0, 1, t))
        time.sleep(every)


def test_obs_protocol_auth_captions_and_reconnect(fake_obs, monkeypatch):
    monkeypatch.setenv("OBS_WEBSOCKET_PASSWORD", PASSWORD)
    sink = ObsSink(url=f"ws://127.0.0.1:{fake_obs.port}", backoff_initial_s=0.1, backoff_max_s=0.5)
    sink.start()
    wait_until(lambda: sink.connected, 10, "identified")
    send(sink, ["one", "two  words", " ...", "three"])  # silence is not sent
    wait_until(lambda: sink.counters["acked"] == 3, 10, "acks")
    fake_obs.stop()  # OBS quits ...
    wait_until(lambda: not sink.connected, 10, "disconnect seen")
    fake_obs.start()  # ... and comes back
    wait_until(lambda: sink.connected, 10, "reconnected")
    send(sink, ["four", "five"])
    wait_until(lambda: sink.counters["acked"] == 5, 10, "acks after restart")
    sink.stop()
    assert fake_obs.captions == ["one", "two words", "three", "four", "five"]
    assert fake_obs.identified == 2 and sink.counters["connects"] == 2


def test_obs_wrong_password_is_reported(fake_obs, monkeypatch):
    monkeypatch.setenv("OBS_WEBSOCKET_PASSWORD", "wrong")
    sink = ObsSink(url=f"ws://127.0.0.1:{fake_obs.port}", backoff_initial_s=0.1)
    sink.start()
    wait_until(lambda: sink.error is not None, 10, "auth failure")
    with pytest.raises(DeliveryError, match="authentication failed.*OBS_WEBSOCKET_PASSWORD"):
        sink.on_caption(Caption(0, 1, "x"))
    with pytest.raises(DeliveryError):
        sink.stop()
    assert fake_obs.identified == 0 and "wrong" not in sink.error


def test_obs_never_reached_is_lost_data():
    """OBS not running for the whole run (nothing listens on its port: a real refused connection): the captions
    were never sent, so the run must not end as a quiet "stopped" - the dispatcher reports the sink failed
    (``livecc run`` exits 1, 'sink lost data'). A run with nothing to send is fine."""
    from pipeline.fanout.dispatch import Dispatcher

    url = f"ws://127.0.0.1:{free_port()}"
    idle = ObsSink(url=url, backoff_initial_s=0.1, backoff_max_s=0.2)
    idle.start()
    idle.stop()  # nothing given: nothing lost
    sink = ObsSink(url=url, backoff_initial_s=0.1, backoff_max_s=0.2)
    d = Dispatcher([sink])
    d.start()
    for t in ("one", "two"):
        d.caption(Caption(0, 1, t))
    time.sleep(0.5)
    final = d.stop(10)["obs"]
    assert final["state"] == "failed", final
    assert "never reached" in final["last_error"] and "none of 2 captions" in final["last_error"], final


def test_obs_down_for_hours_keeps_only_captions_young_enough_to_send():
    """OBS unreachable for a long run (a real refused port): the captions that pile up meanwhile are dropped once
    older than ``max_age_s`` (they would be dropped as stale on reconnect anyway), so what the sink holds stays
    bounded by age, not by how long OBS has been away (3,000 captions here; a day at one a second is 86,400)."""
    sink = ObsSink(url=f"ws://127.0.0.1:{free_port()}", backoff_initial_s=0.1, backoff_max_s=0.2, max_age_s=0.2)
    sink.start()
    try:
        for i in range(3000):
            sink.on_caption(Caption(i, i + 1, f"caption {i}"))
        time.sleep(0.3)  # every caption above is now older than max_age_s
        sink.on_caption(Caption(3000, 3001, "the latest"))
        assert sink.stats()["pending"] == 1, sink.stats()["pending"]
        assert sink.counters["stale"] == 3000
    finally:
        with pytest.raises(DeliveryError, match="never reached"):
            sink.stop()


@needs_nginx
@pytest.mark.skipif(not obs_studio.available(), reason="needs obs-studio and Xvfb")
def test_real_obs_acknowledges_captions_and_survives_a_restart(tmp_path, monkeypatch):
    ngx = NginxRtmp(tmp_path / "nginx", free_port())
    ngx.start()
    obs = obs_studio.ObsStudio(tmp_path / "home", PASSWORD, f"rtmp://127.0.0.1:{ngx.port}/live", "obs")
    monkeypatch.setenv("OBS_WEBSOCKET_PASSWORD", PASSWORD)
    sink = ObsSink(url=obs.url, backoff_initial_s=0.2, backoff_max_s=1.0)
    try:
        obs.start()
        obs.start_stream()
        sink.start()
        wait_until(lambda: sink.connected, 20, "identified by OBS")
        # OBS replaces a caption still waiting to go out with a newer one: one a second, like a live run
        send(sink, ["Hello from livecc", "The keeper dives left"], every=1.5)
        wait_until(lambda: sink.counters["acked"] == 2, 20, "OBS acks")
        obs.stop()  # OBS crashes
        wait_until(lambda: not sink.connected, 20, "disconnect seen")
        obs.start()
        obs.start_stream()
        wait_until(lambda: sink.connected, 30, "reconnected to the new OBS")
        send(sink, ["Back after the restart"])
        wait_until(lambda: sink.counters["acked"] == 3, 20, "OBS acks after restart")
        assert sink.counters["refused"] == 0 and sink.obs_version.startswith("5.")
        time.sleep(1.0)  # OBS's stream carries the last caption
    finally:
        sink.stop()
        obs.stop()
        ngx.stop()
    carried = "".join(sei_608_text(rec) for rec in ngx.recordings())
    for text in ("Hello from livecc", "The keeper dives left", "Back after the restart"):
        assert text in carried, carried  # OBS put each caption into its stream as CEA-608
