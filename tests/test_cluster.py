"""``livecc serve --cluster``: streams spread over the GPU workers of a real Ray cluster (tiny model, CPU).

A head and GPU nodes started with ``ray start`` (separate processes, one ``gpu_slot`` resource each), three
live RTMP streams from nginx-rtmp, ``livecc serve`` as a subprocess. One node's processes are killed mid-run:
its streams go on on the other node within 10 s (an event says where); a stream actor's process killed is
made again by Ray and goes on appending to its files; a node added at run time gets a worker; ``livecc drain`` moves every stream onto it; a stream beyond the capacity is refused; each JSONL
numbers its turns without gaps or repeats across the moves; a stream's overlay page (page, script, captions,
event stream, WebSocket) is served through the head before and after its moves.

Three streams, not the issue's six: this machine has 2 cores shared with other work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import servers
from test_serve import LIVECC, ROOT, captions, request, wait_until

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MOVE_WITHIN_S = 10.0


class RayCluster:
    """``ray start`` nodes on this machine; ``kill(port)`` SIGKILLs a node's raylet and everything under it."""

    def __init__(self, tmp: Path):
        self.port = servers.free_port()
        # RAY_AUTH_MODE: a token file left in ~/.ray by a local ray.init must not turn token checks on here
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.tmp = tmp
        self.nodes = 0

    def start(self, head: bool = False, gpu: int = 1) -> None:
        """Start a node (its node-manager port, in its address in /api/nodes, is how ``kill`` finds it)."""
        nm = servers.free_port()
        cmd = ["ray", "start", "--num-cpus=1", f"--node-manager-port={nm}", "--disable-usage-stats",
               f"--resources={{\"gpu_slot\": {gpu}}}"]
        # each further node on its own loopback address, so that a driver here attaches to the head's raylet
        self.nodes += 1
        cmd += ([f"--port={self.port}", "--head", "--include-dashboard=false"] if head
                else [f"--address=127.0.0.1:{self.port}", f"--node-ip-address=127.0.0.{1 + self.nodes}"])
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    def kill(self, node_manager_port: int) -> int:
        """SIGKILL the raylet of that node and its descendants (workers, agents); how many processes."""
        procs = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                    procs[int(d.name)] = (int(stat.rsplit(")", 1)[1].split()[1]),
                                          (d / "cmdline").read_bytes().replace(b"\0", b" ").decode())
                except (OSError, ValueError, IndexError):
                    pass
        raylet = [pid for pid, (_, cmd) in procs.items() if "raylet" in cmd.split(" ")[0]
                  and f"--node_manager_port={node_manager_port}" in cmd]
        assert len(raylet) == 1, f"raylet of port {node_manager_port}: {raylet}"
        tree, grew = set(raylet), True
        while grew:
            more = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
            tree |= more
            grew = bool(more)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(tree)

    def stop(self) -> None:
        subprocess.run(["ray", "stop", "--force"], env=self.env, capture_output=True, timeout=120)


@pytest.fixture
def ray_cluster(tmp_path):
    if not servers.have("ray"):
        pytest.skip("needs the ray command (pip install 'livecc-pipeline[cluster]')")
    c = RayCluster(tmp_path)
    c.stop()  # none left from an earlier run
    try:
        yield c
    finally:
        c.stop()


def runs(path: Path) -> list[list[dict]]:
    """The turn lines of a JSONL sink's file (captions and answers: an answer takes a turn number too), split at
    its run_start lines (a restarted stream actor)."""
    out: list[list[dict]] = [[]]
    for r in servers.read_jsonl(path) if path.exists() else []:
        if r.get("type") == "run_start":
            out.append([])
        elif r.get("type") == "caption":
            out[-1].append(r)
    return out


def overlay_through_head(base: str, sid: str) -> None:
    """The stream's overlay page, its script, its recent captions, its event stream and its WebSocket, all
    through the head's server (its actor serves them on a loopback port of its own)."""
    import asyncio
    import json
    import urllib.request

    import aiohttp

    status, page = request("GET", f"{base}/overlay/{sid}")
    assert status == 200 and "<html" in page.lower() and f"/overlay/{sid}" in page, page[:300]
    status, js = request("GET", f"{base}/overlay/{sid}/overlay.js")
    assert status == 200 and "WebSocket" in js
    status, recent = request("GET", f"{base}/overlay/{sid}/captions.json")
    assert status == 200 and recent["captions"], recent
    with urllib.request.urlopen(f"{base}/overlay/{sid}/events", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        head = b""
        while b"data:" not in head:
            head += r.read1(4096)
    assert head.startswith(b"retry: 1000"), head[:200]

    async def hello() -> dict:
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{base.replace('http', 'ws')}/overlay/{sid}/ws") as ws:
            return json.loads((await ws.receive(timeout=30)).data)

    msg = asyncio.run(hello())
    assert msg["type"] == "hello" and msg["recent"], msg


def test_streams_move_off_a_killed_node_and_a_drained_one(nginx_rtmp, publisher, ray_cluster, tmp_path):
    from pipeline.fixtures.tiny import tiny_checkpoint

    keys = ["c1", "c2", "c3"]
    for k in keys:
        publisher(nginx_rtmp.url(f"cluster-{k}"), size="320x180", fps=10)
    ray_cluster.start(head=True, gpu=0)
    ray_cluster.start()
    ray_cluster.start()
    port = servers.free_port()
    jsonl = {k: tmp_path / f"{k}.jsonl" for k in keys}
    spec = {
        "engine": {"model": str(tiny_checkpoint("small")), "device": "cpu", "greedy": True, "max_streams": 3,
                   "max_new_tokens": 4},
        "server": {"port": port},
        "streams": [{"id": k, "source": nginx_rtmp.url(f"cluster-{k}"),
                     "sinks": [f"jsonl:{jsonl[k]}"] + (["overlay"] if k == "c1" else [])} for k in keys],
    }
    (tmp_path / "streams.yaml").write_text(yaml.safe_dump(spec))
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(LIVECC + ["serve", str(tmp_path / "streams.yaml"), "--status", "off",
                                      "--cluster", f"127.0.0.1:{ray_cluster.port}", "--worker-resource", "gpu_slot"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=ray_cluster.env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: all(len(captions(jsonl[k])) >= 2 for k in keys), 150, "captions from every stream")
        overlay_through_head(base, "c1")
        assert request("GET", f"{base}/overlay/c2")[0] == 404  # a stream without an overlay sink
        # a stream that would write a file another stream writes (every sink runs on the head): 409, nothing started
        status, body = request("POST", f"{base}/api/streams", {"id": "c4", "source": nginx_rtmp.url("cluster-c1"),
                                                               "sinks": [f"jsonl:{jsonl['c1']}"]})
        assert status == 409 and "c1.jsonl" in body["error"] and "'c1'" in body["error"], body
        assert "c4" not in request("GET", f"{base}/api/streams")[1]
        nodes = request("GET", f"{base}/api/nodes")[1]
        busy = {nid: n for nid, n in nodes.items() if any(w["streams"] for w in n["workers"].values())}
        assert len(busy) == 2, nodes  # spread: the worker with the most free rows takes the next stream

        # kill the node with two streams: they go on on the other within 10 s
        victim_id, victim = max(busy.items(), key=lambda kv: sum(len(w["streams"]) for w in kv[1]["workers"].values()))
        moved = [s for w in victim["workers"].values() for s in w["streams"]]
        before = {k: len(captions(jsonl[k])) for k in keys}
        t0 = time.monotonic()
        assert ray_cluster.kill(int(victim["address"].rsplit(":", 1)[1])) >= 2
        back: dict[str, float] = {}
        while len(back) < len(keys) and time.monotonic() - t0 < 60:
            for k in keys:
                if k not in back and len(captions(jsonl[k])) > before[k] + (1 if k in moved else 0):
                    back[k] = time.monotonic() - t0
            time.sleep(0.2)
        print("captions again after the kill (s):", back)
        assert set(back) == set(keys), back
        assert all(back[k] < MOVE_WITHIN_S for k in moved), back
        events = request("GET", f"{base}/api/events")[1]
        assert {e["stream"] for e in events if e["kind"] == "moved"} == set(moved), events
        survivor = next(nid for nid in busy if nid != victim_id)
        assert all(e["to"].split("/")[1] == survivor[:8] for e in events if e["kind"] == "moved")
        assert any(r.get("kind") == "stream_moved" for r in servers.read_jsonl(jsonl[moved[0]]))

        # a stream actor's process killed: Ray makes it again, the service starts it on its worker, its JSONL
        # goes on after a run_start line
        pid = request("GET", f"{base}/api/streams/c3/status")[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(runs(jsonl["c3"])) == 2 and len(runs(jsonl["c3"])[1]) >= 2, 60,
                   "the restarted stream actor's captions")
        assert any(e["kind"] == "stream_restarted" and e["stream"] == "c3"
                   for e in request("GET", f"{base}/api/events")[1])

        # a node added at run time gets a worker; draining the survivor moves every stream onto it
        ray_cluster.start()
        wait_until(lambda: any(n["alive"] and n["workers"] and all(w["ready"] for w in n["workers"].values())
                               and nid not in busy for nid, n in request("GET", f"{base}/api/nodes")[1].items()),
                   90, "a worker on the added node")
        out = subprocess.run(LIVECC + ["drain", survivor[:12], "--url", base], env=ray_cluster.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        before = {k: len(captions(jsonl[k])) for k in keys}
        wait_until(lambda: all(len(captions(jsonl[k])) >= before[k] + 2 for k in keys), 60,
                   "every stream to go on on the added node")
        nodes = request("GET", f"{base}/api/nodes")[1]
        placed = {s for n in nodes.values() for w in n["workers"].values() for s in w["streams"]}
        assert placed == set(keys) and not any(n["workers"] for nid, n in nodes.items() if nid in busy), nodes

        overlay_through_head(base, "c1")  # moved twice: its actor (and its page) stayed on the head

        # the per-stream control routes reach the stream through its actor
        status, ans = request("POST", f"{base}/api/streams/c2/ask", {"question": "What happens?"}, timeout=60)
        assert status == 200 and isinstance(ans["answer"], str), ans
        assert request("POST", f"{base}/api/streams/c2/pause")[1] == {"paused": True}
        assert request("POST", f"{base}/api/streams/c2/resume")[1] == {"paused": False}
        # the answer took a turn number: the captions after it go on from it (checked with the others below)
        wait_until(lambda: [r.get("kind") for r in runs(jsonl["c2"])[-1]][-1:] == ["caption"]
                   and "answer" in [r.get("kind") for r in runs(jsonl["c2"])[-1]], 60, "a caption after c2's answer")

        # no room: the one live worker holds three rows, all taken
        status, body = request("POST", f"{base}/api/streams", {"id": "c4", "source": nginx_rtmp.url("cluster-c1")})
        assert status == 503 and "no room" in body["error"], body
        health = request("GET", f"{base}/health")[1]
        assert health["workers"] == 1 and health["capacity"] == 3 and health["free"] == 0, health
        status, metrics = request("GET", f"{base}/metrics")
        for k in keys:
            assert f'stream="{k}"' in metrics and "livecc_worker_streams{" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    for k in keys:  # each file: its own turns, numbered without gaps or repeats across the moves
        for run in runs(jsonl[k]):
            turns = [c["turn"] for c in run]
            assert turns == list(range(1, len(turns) + 1)), (k, turns)
    assert len(runs(jsonl["c1"])) == 1 and len(runs(jsonl["c3"])) == 2
