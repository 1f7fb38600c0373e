"""``livecc serve``: many streams in one process on one engine core (tiny model, CPU).

- In process, two files of different sizes paced in real time: each stream's captions equal (token ids) those
  of a session of its own fed the same clips, though their turns were batched together.
- ``livecc serve`` as a subprocess with three live RTMP streams from nginx-rtmp: a fourth added through
  the API mid-run and one removed; each stream's JSONL holds its own turns (numbered 1, 2, ... without
  gaps or repeats), /metrics labels every family by stream, a stream beyond the capacity is refused,
  the per-stream routes answer, and SIGTERM ends it with exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parent.parent
LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def captions(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in servers.read_jsonl(path) if r.get("type") == "caption" and r.get("kind") == "caption"]


def request(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict | str]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def wait_until(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_each_stream_served_together_equals_the_stream_alone(tmp_path, monkeypatch):
    """Two files of different sizes paced in real time through one engine core: each stream's token ids equal
    those of a session of its own (a batch of one) fed the same clips."""
    from pipeline.engine import EngineConfig, StreamingSession, load_model
    from pipeline.fixtures.testvideo import test_video
    from pipeline.fixtures.tiny import tiny_checkpoint
    from pipeline.serve import Service

    seen: dict[int, list] = {}
    build = StreamingSession.video_request

    def record(self, clip):  # the clips each stream's session was given, in order
        seen.setdefault(id(self), []).append(clip)
        return build(self, clip)

    monkeypatch.setattr(StreamingSession, "video_request", record)
    ckpt = str(tiny_checkpoint("small"))
    videos = {"wide": test_video(seconds=8, width=320, height=180), "tall": test_video(seconds=8, width=180, height=320)}
    shared = {"engine": {"model": ckpt, "device": "cpu", "greedy": True, "max_streams": 2},
              "sampler": {"queue_size": 64}, "server": {"enabled": False}}
    streams = [{"id": k, "source": str(v), "sinks": [f"jsonl:{tmp_path / k}.jsonl"]} for k, v in videos.items()]
    service = Service(shared, streams).start()
    sessions = {sid: p.session for sid, p in service.streams.items()}
    try:
        wait_until(lambda: set(service.ended) == set(videos), 240, "both files to be captioned")
    finally:
        service.stop()
    monkeypatch.undo()
    model = load_model(ckpt, device="cpu")
    for sid in videos:
        got = [c["token_ids"] for c in captions(tmp_path / f"{sid}.jsonl")]
        alone = StreamingSession(model, EngineConfig(greedy=True))
        want = [list(alone.step(clip).token_ids) for clip in seen[id(sessions[sid])]]
        assert got == want, f"stream {sid}: served together != alone"
        assert len(got) >= 5


@pytest.fixture
def serve_cli(tmp_path):
    procs = []

    def start(streams_file: Path, *extra: str) -> subprocess.Popen:
        log = open(tmp_path / "serve.log", "w")
        p = subprocess.Popen(LIVECC + ["serve", str(streams_file), "--status", "plain", *extra], cwd=tmp_path,
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_livecc_serve_three_rtmp_streams_add_and_remove(nginx_rtmp, publisher, serve_cli, tmp_path):
    from pipeline.fixtures.tiny import tiny_checkpoint

    keys = ["s1", "s2", "s3", "s4"]
    for k in keys:
        publisher(nginx_rtmp.url(f"serve-{k}"), size="320x180", fps=10)
    port = servers.free_port()
    spec = {
        "engine": {"model": str(tiny_checkpoint("small")), "device": "cpu", "greedy": True, "max_streams": 4,
                   "max_new_tokens": 4},
        "server": {"port": port},
        "streams": [{"id": k, "source": nginx_rtmp.url(f"serve-{k}"),
                     "sinks": [f"jsonl:{k}.jsonl"] + (["overlay"] if k == "s1" else [])} for k in keys[:3]],
    }
    streams_file = tmp_path / "streams.yaml"
    streams_file.write_text(yaml.safe_dump(spec))
    proc = serve_cli(streams_file)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: all(len(captions(tmp_path / f"{k}.jsonl")) >= 3 for k in keys[:3]), 180,
               "captions from the three streams")

    # a fourth stream through the API; a fifth does not fit (4 KV-cache rows)
    status, body = request("POST", f"{base}/api/streams", {"id": "s4", "source": nginx_rtmp.url("serve-s4"),
                                                           "sinks": ["jsonl:s4.jsonl"]})
    assert status == 201, body
    status, body = request("POST", f"{base}/api/streams", {"id": "s5", "source": nginx_rtmp.url("serve-s1")})
    assert status == 503 and "no room" in body["error"], body
    status, body = request("POST", f"{base}/api/streams", {"id": "s4", "source": nginx_rtmp.url("serve-s1")})
    assert status == 409
    status, body = request("POST", f"{base}/api/streams", {"id": "bad id!", "source": "x"})
    assert status == 400
    wait_until(lambda: len(captions(tmp_path / "s4.jsonl")) >= 3, 120, "captions from the added stream")

    # per-stream routes, metrics labelled by stream, health with the capacity
    status, snap = request("GET", f"{base}/api/streams/s2/status")
    assert status == 200 and snap["stream"] == "s2" and snap["turns"] >= 3
    status, page = request("GET", f"{base}/overlay/s1")
    assert status == 200 and "<html" in page.lower()
    status, recent = request("GET", f"{base}/overlay/s1/captions.json")
    assert status == 200
    status, metrics = request("GET", f"{base}/metrics")
    for k in keys:
        assert f'livecc_turns_total{{kind="caption",stream="{k}"}}' in metrics
    status, health = request("GET", f"{base}/health")
    assert health["streams"] == 4 and health["capacity"] == 4 and health["free"] == 0

    # remove one: its file is final, the others go on
    status, body = request("DELETE", f"{base}/api/streams/s2")
    assert status == 200 and body["sinks"]["jsonl"]["state"] == "stopped"
    n2 = len(captions(tmp_path / "s2.jsonl"))
    others = {k: len(captions(tmp_path / f"{k}.jsonl")) for k in ("s1", "s3", "s4")}
    wait_until(lambda: all(len(captions(tmp_path / f"{k}.jsonl")) > n + 1 for k, n in others.items()), 120,
               "the other streams to go on")
    assert len(captions(tmp_path / "s2.jsonl")) == n2
    assert request("GET", f"{base}/health")[1]["free"] == 1
    assert request("DELETE", f"{base}/api/streams/s2")[0] == 404

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    for k in keys:  # each file: its own stream's turns, numbered without gaps or repeats
        turns = [c["turn"] for c in captions(tmp_path / f"{k}.jsonl")]
        assert turns == list(range(1, len(turns) + 1)), (k, turns)
