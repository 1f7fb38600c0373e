"""The control API on a running pipeline (tiny model, CPU, a lavfi test source at real time):
a query change takes effect at the next turn, a question gets an answer that also reaches the
sinks, pause / resume, /metrics and /health; the token off loopback, CORS, size caps.

Traffic stays on loopback: the "off loopback" server binds 127.0.0.2 (anything but
127.0.0.1 / ::1 / localhost needs a token).
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from pipeline import config
from pipeline.app import Pipeline
from pipeline.fanout.sink import Sink

pytestmark = pytest.mark.timeout(180)

TOKEN = "test-token-0123456789abcdef"
SOURCE = "lavfi:testsrc2=size=320x240:rate=15"


class Recorder(Sink):
    """Keeps every caption; ``wait(pred)`` blocks (on a condition) until pred(captions) holds."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.captions = []
        self.events = []
        self.cond = threading.Condition()

    def on_caption(self, caption):
        with self.cond:
            self.captions.append(caption)
            self.cond.notify_all()

    def on_event(self, event):
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait(self, pred, timeout=60.0):
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self.captions), timeout), "timed out waiting for captions"
            return list(self.captions)


def call(url, method="GET", body=None, token=None, headers=None, raw=None, timeout=60):
    h = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def tiny_model():
    from pipeline.engine import load_model
    from pipeline.fixtures.tiny import tiny_checkpoint

    return load_model(str(tiny_checkpoint("small")), device="cpu", dtype="float32")


def start_pipeline(tiny_model, tmp_path, host="127.0.0.1", token=None, cors=(), extra=None):
    data = {
        "engine": {"model": "tiny", "device": "cpu", "seed": 0},
        "capture": {"source": SOURCE},
        "server": {"host": host, "port": 0, "token": token, "cors_origins": list(cors)},
        "sinks": [{"kind": "jsonl", "path": str(tmp_path / "events.jsonl")}],
        "shutdown": {"turn_timeout_s": 5, "sinks_timeout_s": 5},
        **(extra or {}),
    }
    cfg = config.validate(data, "test")
    rec = Recorder()
    from pipeline.plugins import make_sink

    sinks = [make_sink(b) for b in cfg.sinks] + [rec]
    p = Pipeline(cfg, model=tiny_model, sinks=sinks)
    prompts: dict[int, str] = {}
    p.start()
    session_finish = p.session.finish

    def finish(req, result):  # record the prompt text of every turn
        cap = session_finish(req, result)
        prompts[cap.turn] = req.text
        return cap

    p.session.finish = finish
    return p, rec, prompts, p.server.url


@pytest.fixture(scope="module")
def guarded(tiny_model, tmp_path_factory):
    """A pipeline whose server binds 127.0.0.2 with a token."""
    tmp = tmp_path_factory.mktemp("control")
    p, rec, prompts, base = start_pipeline(tiny_model, tmp, host="127.0.0.2", token=TOKEN)
    yield p, rec, prompts, base, tmp
    p.stop()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_requests_without_the_token_are_refused(guarded):
    p, rec, _, base, _ = guarded
    for method, path, body in (("GET", "/api/status", None), ("GET", "/metrics", None),
                               ("POST", "/api/query", {"query": "hi"}), ("POST", "/api/ask", {"question": "hi"}),
                               ("POST", "/api/pause", None), ("POST", "/api/resume", None)):
        status, out = call(base + path, method, body)
        assert status == 401, (path, out)
        assert call(base + path, method, body, token="wrong-token-0123456789")[0] == 401
    assert p.session.query == p.engine_cfg.query  # nothing got through
    assert not p.paused
    assert call(base + "/api/status", token=TOKEN)[0] == 200
    # liveness / readiness stay open for probes, and say nothing secret
    rec.wait(lambda c: len(c) >= 1)
    status, out = call(base + "/health")
    assert status == 200 and json.loads(out)["ready"] is True


def test_query_change_takes_effect_at_the_next_turn(guarded):
    p, rec, prompts, base, tmp = guarded
    rec.wait(lambda c: len([x for x in c if x.kind == "caption"]) >= 2)
    before = p.session.turns
    new_query = "Count the coloured bars, please."
    status, out = call(base + "/api/query", "POST", {"query": new_query}, token=TOKEN)
    assert status == 200, out
    res = json.loads(out)
    turn = res["turn"]
    assert res["query"] == new_query and turn >= before + 1
    # the first turn after the change carries the new query; the turns before did not
    assert new_query in prompts[turn]
    assert all(new_query not in prompts[t] for t in prompts if t < turn)
    # as in LiveCC, the query is only restated when it changes
    rec.wait(lambda c: any(x.turn > turn and x.kind == "caption" for x in c))
    assert all(new_query not in prompts[t] for t in prompts if t > turn)
    assert p.session.query == new_query
    status, out = call(base + "/api/status", token=TOKEN)
    assert json.loads(out)["query"] == new_query
    # the JSONL has that turn's caption
    rows = read_jsonl(tmp / "events.jsonl")
    assert any(r["type"] == "caption" and r["turn"] == turn and r["text"] == res["caption"] for r in rows)


def test_a_question_gets_an_answer(guarded):
    p, rec, _, base, tmp = guarded
    question = "What colour is the left-most bar?"
    status, out = call(base + "/api/ask", "POST", {"question": question}, token=TOKEN)
    assert status == 200, out
    res = json.loads(out)
    assert res["question"] == question and isinstance(res["answer"], str) and res["turn"] > 0
    # the answer went to the sinks as well
    caps = rec.wait(lambda c: any(x.kind == "answer" and x.query == question for x in c), timeout=10)
    ans = next(x for x in caps if x.kind == "answer" and x.query == question)
    assert ans.text == res["answer"]
    rec.wait(lambda c: any(x.kind == "caption" and x.turn > ans.turn for x in c))  # commentary goes on
    rows = read_jsonl(tmp / "events.jsonl")
    assert any(r["type"] == "caption" and r["kind"] == "answer" and r["query"] == question for r in rows)


def test_pause_and_resume(guarded):
    p, rec, _, base, _ = guarded
    status, out = call(base + "/api/pause", "POST", token=TOKEN)
    assert status == 200 and json.loads(out) == {"paused": True}
    n = len(rec.captions)
    # while paused, a query change is accepted but no turn carries it yet
    status, out = call(base + "/api/query", "POST", {"query": "Paused query."}, token=TOKEN)
    assert status == 202 and json.loads(out)["pending"] is True
    with rec.cond:
        assert not rec.cond.wait_for(lambda: len(rec.captions) > n + 1, timeout=3)  # at most the turn in flight
    assert json.loads(call(base + "/api/status", token=TOKEN)[1])["paused"] is True
    assert call(base + "/api/resume", "POST", token=TOKEN)[0] == 200
    rec.wait(lambda c: len(c) > n + 2)
    assert any(e.kind == "captioning_paused" for e in rec.events)
    assert any(e.kind == "captioning_resumed" for e in rec.events)


def test_metrics_count_the_turns(guarded):
    p, rec, _, base, _ = guarded
    rec.wait(lambda c: len(c) >= 3)
    status, out = call(base + "/metrics", token=TOKEN)
    assert status == 200
    text = out.decode()
    turns = float(next(line.split()[-1] for line in text.splitlines()
                       if line.startswith('livecc_turns_total{kind="caption"}')))
    assert turns >= 3
    for name in ("livecc_caption_latency_seconds_bucket", "livecc_turn_phase_seconds_count", "livecc_input_fps",
                 "livecc_sampled_fps", "livecc_queue_depth", "livecc_clips_dropped_total", "livecc_reconnects_total",
                 "livecc_gpu_memory_bytes", "livecc_context_tokens", 'livecc_sink_captions_total{sink="jsonl"}'):
        assert name in text, name
    assert TOKEN not in text


def test_browser_origins_sizes_and_bodies(guarded):
    p, _, _, base, _ = guarded
    status, _ = call(base + "/api/query", "POST", {"query": "x"}, token=TOKEN,
                     headers={"Origin": "http://evil.example"})
    assert status == 403
    status, _ = call(base + "/api/pause", "OPTIONS", headers={"Origin": "http://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert status == 403
    assert call(base + "/api/query", "POST", {"query": "x" * 20000}, token=TOKEN)[0] == 413
    assert call(base + "/api/ask", "POST", {"question": "x" * 5000}, token=TOKEN)[0] == 413
    assert call(base + "/api/query", "POST", raw=b"query=x", token=TOKEN,
                headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert call(base + "/api/query", "POST", raw=b"{not json", token=TOKEN,
                headers={"Content-Type": "application/json"})[0] == 400
    assert call(base + "/api/query", "POST", {"query": "   "}, token=TOKEN)[0] == 400


def test_bad_json_and_bad_unicode_are_400_and_the_run_goes_on(guarded, caplog):
    p, rec, _, base, _ = guarded
    caplog.set_level(logging.WARNING, logger="livecc.server")
    json_ct = {"Content-Type": "application/json"}
    bodies = [
        b'{"query": "\\ud800 forged"}',  # a lone surrogate, escaped: valid JSON, invalid text
        b'{"question": "\\udfff"}',
        b'{"query": "\xed\xa0\x80"}',  # the same surrogate as raw (CESU-8) bytes: not UTF-8
        b"[" * 8000 + b"]" * 8000,  # deep nesting
        b'{"query": ' + b"9" * 5000 + b"}",  # a number over Python's digit limit
        b'{"query": NaN}',
    ]
    for body in bodies:
        path = "/api/ask" if b"question" in body else "/api/query"
        status, out = call(base + path, "POST", raw=body, token=TOKEN, headers=json_ct)
        assert status == 400, (body[:40], out)
        assert "error" in json.loads(out)
    assert not any(r.exc_info for r in caplog.records)  # one line each (rate-limited), no traceback
    n = len(rec.captions)
    rec.wait(lambda c: len(c) >= n + 2)  # the run goes on
    status, out = call(base + "/api/ask", "POST", {"question": "Still there?"}, token=TOKEN)
    assert status == 200, out
    assert p.error is None and p.live


def test_health_answers_through_a_flood_of_half_open_connections(guarded):
    """~1,000 connections that send half a request head and stop: /health still answers at once
    (the oldest half-open connection makes room), and the server never holds more than its cap."""
    p, _, _, base, _ = guarded
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    host, port = base.removeprefix("http://").rsplit(":", 1)
    flood = []
    try:
        for _ in range(1000):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Slow: ")
            flood.append(s)
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            status, out = call(base + "/health", timeout=10)
            times.append(time.monotonic() - t0)
            assert status == 200 and json.loads(out)["ready"] is True
        assert p.server.connection_count <= p.cfg.server.max_connections
        print(f"\n/health through 1,000 half-open connections: {max(times) * 1000:.0f} ms at most; "
              f"{p.server.connection_count} connections held")
        assert max(times) < 2.0
        flood[0].settimeout(2)  # the oldest were closed by the server to make room
        assert flood[0].recv(100) == b""
    finally:
        for s in flood:
            s.close()


def test_loopback_needs_no_token_and_allows_listed_origins(tiny_model, tmp_path):
    p, rec, _, base = start_pipeline(tiny_model, tmp_path, cors=["http://studio.example"])
    try:
        status, out = call(base + "/api/status")
        assert status == 200 and json.loads(out)["source"].startswith("lavfi:")
        status, _ = call(base + "/api/status", headers={"Origin": "http://studio.example"})
        assert status == 200
        status, _ = call(base + "/api/pause", "OPTIONS", headers={"Origin": "http://studio.example"})
        assert status == 204
        # DNS rebinding: a loopback server answers only to loopback Host names
        assert call(base + "/api/status", headers={"Host": "attacker.example"})[0] == 403
    finally:
        p.stop()


def test_off_loopback_without_token_refuses_to_start(monkeypatch):
    monkeypatch.delenv(config.TOKEN_ENV, raising=False)
    with pytest.raises(config.ConfigError, match="server.host: 0.0.0.0 is not loopback"):
        config.validate({"server": {"host": "0.0.0.0"}, "capture": {"source": SOURCE}}, "test")
