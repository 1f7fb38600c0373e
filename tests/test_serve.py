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
import threading
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


# -- hostile or careless use of the streams API and the streams file (in process: tiny model, a long file) -----

@pytest.fixture
def service(tmp_path, monkeypatch):
    """Factory: ``service(streams, **engine)`` -> a started in-process ``Service`` with its HTTP server (base URL
    in ``.base``); files written under ``tmp_path`` (the working directory); stopped at teardown."""
    from pipeline.fixtures.tiny import tiny_checkpoint
    from pipeline.serve import Service

    monkeypatch.chdir(tmp_path)
    started = []

    def start(streams: list, max_streams: int = 4, sinks: list | None = None) -> Service:
        shared = {"engine": {"model": str(tiny_checkpoint("small")), "device": "cpu", "greedy": True,
                             "max_streams": max_streams, "max_new_tokens": 4},
                  "server": {"port": servers.free_port()}}
        if sinks is not None:
            shared["sinks"] = sinks
        s = Service(shared, streams)
        started.append(s)
        s.start()
        s.base = s.server.url
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def long_video() -> str:
    from pipeline.fixtures.testvideo import test_video

    return str(test_video(seconds=360, width=640, height=360, fps=10))  # outlives every test: never ends by itself


def valid_jsonl(path: Path) -> list[dict]:
    """Every line of ``path`` parsed (a line that is not JSON fails the test)."""
    lines = path.read_text().splitlines()
    bad = [ln for ln in lines if not _is_json(ln)]
    assert not bad, f"{path.name}: {len(bad)} broken lines, e.g. {bad[0][:120]!r}"
    return [json.loads(ln) for ln in lines]


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def test_two_streams_never_share_an_output_file(service, long_video, tmp_path):
    """A stream whose sink would write a file another running stream writes (the same path, spelt another way
    too) is refused with 409 naming the file and the stream; the first stream's file stays whole."""
    svc = service([{"id": "a", "source": long_video, "sinks": ["jsonl:a.jsonl"]}])
    for path in ("a.jsonl", str(tmp_path / "a.jsonl"), "./sub/../a.jsonl"):
        status, body = request("POST", f"{svc.base}/api/streams", {"id": "b", "source": long_video,
                                                                   "sinks": [f"jsonl:{path}"]})
        assert status == 409, (path, status, body)
        assert "a.jsonl" in body["error"] and "'a'" in body["error"], body
    # the default path of a sink counts too: two streams with a bare ``jsonl`` both write events.jsonl
    assert request("POST", f"{svc.base}/api/streams", {"id": "c", "source": long_video, "sinks": ["jsonl"]})[0] == 201
    status, body = request("POST", f"{svc.base}/api/streams", {"id": "d", "source": long_video, "sinks": ["jsonl"]})
    assert status == 409 and "events.jsonl" in body["error"], body
    # two sinks of one stream on one file
    status, body = request("POST", f"{svc.base}/api/streams", {"id": "e", "source": long_video,
                                                               "sinks": ["jsonl:e.jsonl", {"jsonl": {"path": "e.jsonl"}}]})
    assert status == 400 and "e.jsonl" in body["error"], body
    assert not (tmp_path / "e.jsonl").exists()
    wait_until(lambda: len(captions(tmp_path / "a.jsonl")) >= 4, 120, "captions from stream a")
    assert set(svc.streams) == {"a", "c"}
    # removed, its file is free again: a new stream continues it (after a run_start line), nothing overwritten
    n = len(captions(tmp_path / "a.jsonl"))
    assert request("DELETE", f"{svc.base}/api/streams/a")[0] == 200
    assert request("POST", f"{svc.base}/api/streams", {"id": "b", "source": long_video,
                                                       "sinks": ["jsonl:a.jsonl"]})[0] == 201
    wait_until(lambda: len(captions(tmp_path / "a.jsonl")) >= n + 2, 120, "captions from stream b")
    svc.stop()
    records = valid_jsonl(tmp_path / "a.jsonl")
    assert [r["type"] for r in records].count("run_start") == 1
    cut = [r["type"] for r in records].index("run_start")
    first = [r["turn"] for r in records[:cut] if r["type"] == "caption"]
    assert first[:n] == list(range(1, n + 1))  # stream a's own turns, none overwritten


def test_streams_file_refuses_shared_output_files_and_duplicate_ids(tmp_path, monkeypatch):
    """Checked before the model loads: two entries with one id, two streams writing one file (the shared
    ``sinks:`` of a file with no per-stream sinks)."""
    from pipeline.config import ConfigError
    from pipeline.serve import Service

    monkeypatch.chdir(tmp_path)
    shared = {"engine": {"model": "/nonexistent-model"}, "server": {"enabled": False}}
    with pytest.raises(ConfigError, match=r"streams\[1\].*id.*'a'.*streams\[0\]"):
        Service(shared, [{"id": "a", "source": "rtmp://127.0.0.1/live/a"},
                         {"id": "a", "source": "rtmp://127.0.0.1/live/b", "sinks": ["jsonl:b.jsonl"]}])
    with pytest.raises(ConfigError, match=r"streams\[1\].*captions\.jsonl.*'a'"):
        Service({**shared, "sinks": ["jsonl:captions.jsonl"]},
                [{"id": "a", "source": "rtmp://127.0.0.1/live/a"}, {"id": "b", "source": "rtmp://127.0.0.1/live/b"}])
    with pytest.raises(ConfigError, match=r"streams\[1\].*rtmp://127\.0\.0\.1/live/\*\*\*.*'a'") as e:
        # two streams publishing to one RTMP stream key (the second would be refused by the server, or fight)
        Service(shared, [{"id": "a", "source": "rtmp://127.0.0.1/live/a", "sinks": ["burnin:rtmp://127.0.0.1/live/s3cretkey"]},
                         {"id": "b", "source": "rtmp://127.0.0.1/live/b", "sinks": ["restream:rtmp://127.0.0.1/live/s3cretkey/"]}])
    assert "s3cretkey" not in str(e.value)
    Service({**shared, "sinks": ["jsonl:captions.jsonl"]},  # each stream its own file: fine
            [{"id": "a", "source": "rtmp://127.0.0.1/live/a"},
             {"id": "b", "source": "rtmp://127.0.0.1/live/b", "sinks": ["jsonl:b.jsonl"]}])
    # the same checks for --cluster (every stream's sinks run on the head node), before Ray is reached
    from pipeline.cluster.service import ClusterService

    with pytest.raises(ConfigError, match=r"streams\[1\].*captions\.jsonl.*'a'"):
        ClusterService({**shared, "sinks": ["jsonl:captions.jsonl"]},
                       [{"id": "a", "source": "rtmp://127.0.0.1/live/a"},
                        {"id": "b", "source": "rtmp://127.0.0.1/live/b"}], address="127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"streams\[1\].*id.*'a'"):
        ClusterService(shared, [{"id": "a", "source": "rtmp://127.0.0.1/live/a"},
                                {"id": "a", "source": "/no/such/file.mp4", "sinks": ["jsonl:b.jsonl"]}],
                       address="127.0.0.1:1")


def test_a_starting_stream_holds_its_row_and_cannot_be_deleted_half_started(service, long_video, tmp_path,
                                                                             monkeypatch):
    """While a stream starts (its ``Pipeline.start`` held at its beginning here, as a slow source open would):
    its KV-cache row is taken (another stream gets 503 "no room", /health's ``free`` counts it), and a DELETE
    is 409 rather than stopping a stream whose start then goes on unseen, holding a row and writing its file."""
    from pipeline.app import Pipeline

    svc = service([{"id": "a", "source": long_video, "sinks": ["jsonl:a.jsonl"]}], max_streams=2)
    gate, entered = threading.Event(), threading.Event()
    real_start = Pipeline.start

    def held_start(self):
        if self.stream_id == "slow":
            entered.set()
            gate.wait(60)
        return real_start(self)

    monkeypatch.setattr(Pipeline, "start", held_start)
    added: list = []
    t = threading.Thread(target=lambda: added.append(request(
        "POST", f"{svc.base}/api/streams", {"id": "slow", "source": long_video, "sinks": ["jsonl:slow.jsonl"]})))
    t.start()
    try:
        assert entered.wait(30)
        status, body = request("POST", f"{svc.base}/api/streams", {"id": "c", "source": long_video,
                                                                   "sinks": ["jsonl:c.jsonl"]})
        assert status == 503 and "no room" in body["error"], body
        assert request("GET", f"{svc.base}/health")[1]["free"] == 0
        status, body = request("DELETE", f"{svc.base}/api/streams/slow")
        assert status == 409 and "starting" in body["error"], body
    finally:
        gate.set()
        t.join(60)
    assert added and added[0][0] == 201, added
    assert set(svc.streams) == {"a", "slow"}
    assert request("DELETE", f"{svc.base}/api/streams/slow")[0] == 200
    health = request("GET", f"{svc.base}/health")[1]
    assert health["streams"] == 1 and health["free"] == 1, health  # its row is free again
    n = len(captions(tmp_path / "slow.jsonl"))
    wait_until(lambda: len(captions(tmp_path / "a.jsonl")) >= 3, 120, "captions from stream a")
    assert len(captions(tmp_path / "slow.jsonl")) == n  # stopped: nothing more written


@pytest.mark.parametrize("sid", ["a\n", "", "../x", "a/b", "a b", "é", "x" * 65, 7, None])
def test_stream_ids_are_checked_whole(sid):
    """An id is 1-64 letters, digits, '-', '_' and nothing else: a trailing newline (which ``$`` lets through)
    would put a line break into logs, metrics labels and routes."""
    from pipeline.config import ConfigError
    from pipeline.serve import stream_config

    with pytest.raises(ConfigError, match="is not a stream id"):
        stream_config({}, {"id": sid, "source": "rtmp://127.0.0.1/live/x"}, "POST /api/streams")


def test_a_source_that_cannot_be_resolved_is_a_client_error(service, long_video, tmp_path, monkeypatch):
    """A missing file or an unknown source kind is the caller's mistake: 400 naming it (not 503, which says
    "retry later"), the running stream goes on; in the streams file it is refused before the model loads."""
    from pipeline.config import ConfigError
    from pipeline.serve import Service

    with pytest.raises(ConfigError, match=r"streams\[0\].*nonexistent\.mp4: no such file"):
        Service({"engine": {"model": "/nonexistent-model"}, "server": {"enabled": False}},
                [{"id": "a", "source": str(tmp_path / "nonexistent.mp4")}])
    svc = service([{"id": "a", "source": long_video, "sinks": ["jsonl:a.jsonl"]}])
    for source, why in ((str(tmp_path / "nonexistent.mp4"), "no such file"), ("foo://bar", "unknown source kind")):
        status, body = request("POST", f"{svc.base}/api/streams", {"id": "b", "source": source,
                                                                   "sinks": ["jsonl:b.jsonl"]})
        assert status == 400 and why in body["error"], (source, status, body)
    assert set(svc.streams) == {"a"} and request("GET", f"{svc.base}/health")[1]["free"] == 3
    assert not (tmp_path / "b.jsonl").exists()


def test_an_unknown_key_of_a_stream_entry_suggests_the_key_meant():
    """As for the config's own keys (``did you mean ...``): a misspelt key of a ``streams:`` entry names the
    close one, and every key a stream takes."""
    from pipeline.config import ConfigError
    from pipeline.serve import stream_config

    with pytest.raises(ConfigError, match=r"streams\[0\]: unknown key 'sink' \(did you mean 'sinks'\?.*capture, id"):
        stream_config({}, {"id": "a", "source": "rtmp://127.0.0.1/live/a", "sink": ["console"]}, "f.yaml: streams[0]")
    with pytest.raises(ConfigError, match=r"unknown key 'colour' \(a stream takes capture, id"):
        stream_config({}, {"id": "a", "source": "rtmp://127.0.0.1/live/a", "colour": 1}, "f.yaml: streams[0]")


def test_ended_streams_stay_bounded_and_keep_the_ones_that_lost_data():
    """A service runs for months with streams coming and going: the ended streams' final statuses are bounded (the
    newest ``keep`` of each kind), a stream that lost data is not pushed out by clean ones, and what was let go is
    counted (``livecc serve`` still exits 1 for an earlier loss)."""
    from pipeline.serve import EndedStreams

    ended = EndedStreams(keep=3)
    ended.add("lost-1", {"jsonl": {"state": "failed", "last_error": "disk full"}})
    for i in range(10):
        ended.add(f"ok-{i}", {"jsonl": {"state": "ok"}})
    assert list(ended) == ["lost-1", "ok-7", "ok-8", "ok-9"] and ended.dropped_clean == 7
    for i in range(4):
        ended.add(f"hung-{i}", {"webhook": {"state": "hung"}, "jsonl": {"state": "ok"}})
    assert [k for k in ended if k.startswith(("lost", "hung"))] == ["hung-1", "hung-2", "hung-3"]
    assert ended.dropped_lost == 2 and ended.dropped_clean == 7 and len(ended) == 6
    ended.add("ok-8", {"jsonl": {"state": "ok"}})  # the same id again: one entry, the newest
    assert list(ended)[-1] == "ok-8" and len(ended) == 6
