"""Faults against ``livecc run`` as a real process (tiny checkpoint, CPU, nginx-rtmp on loopback).

(a) the publisher SIGKILLed and restarted RESTARTS times during one run with burn-in to MP4 and SRT
    sinks: captions resume after every restart; the burn-in MP4 never stops (frames repeat during
    the gaps: its duration follows the wall clock, no gap between frames over a second); the
    process's thread and fd counts (read from /proc/PID from the outside) do not grow;
(b) SIGTERM at random moments (seeded), SIGTERMS times: exit 0 (or the default SIGTERM death
    before the handler is installed, with no output written), the MP4 plays in ffprobe, the SRT
    parses with ``srt``, the JSONL has only whole lines;
(c) secrets: stream keys in the source and the burn-in RTMP URL, a password and a token in a URL,
    a control API token: none appears in stdout, stderr (debug logs), JSONL, SRT, /api/status or
    /metrics.

Covered elsewhere, not repeated: 5 restarts through the capture API (test_capture_live.py), a
raising / hung sink (test_dispatch.py), the burn-in RTMP server restarted (test_sink_burnin.py),
one SIGTERM end to end (test_run_e2e.py), a killed subtitle writer (test_sink_files.py), a stuck
turn (test_run_pipeline.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import servers

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
# SIGUSR1 dumps every thread's stack into the log: a run that does not stop says where it is stuck
LIVECC = [sys.executable, "-c", "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1); "
          "from pipeline.cli import main; sys.exit(main())"]
RESTARTS = 20
SIGTERMS = 20
RECOVER_BOUND_S = 20.0  # publisher restarted -> a caption of video from after the restart
LOSS_BOUND_S = 15.0  # publisher killed -> source_lost
# 120 visual tokens per turn instead of 299, one burn-in encode at 10 fps: headroom on 2 shared cores
LIGHT = ["--set", "engine.max_pixels=100352", "--set", "capture.wait_for_source=true"]


def get(url: str, timeout: float = 5, token: str | None = None) -> tuple[int, bytes]:
    return servers.http_get(url, timeout, token)


jsonl = servers.read_jsonl


def counts(pid: int) -> tuple[int, int, int]:
    """(threads, open fds, resident memory in MiB) of another process, from /proc."""
    rss = [int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
           if line.startswith("VmRSS:")][0]
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd")), rss // 1024


@pytest.fixture(scope="module")
def model() -> Path:
    from pipeline.fixtures.tiny import tiny_checkpoint

    return tiny_checkpoint("small")


@pytest.fixture(scope="module")
def source_file():
    from pipeline.fixtures.testvideo import test_video

    return test_video(seconds=20)  # published in a loop with -c copy: near zero CPU for the publisher


class Run:
    """``livecc run`` as a subprocess, its output in a log file."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        self.log_path = cwd / f"livecc-{time.monotonic_ns()}.log"
        self.port = servers.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(LIVECC + args + ["--port", str(self.port)], cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 60, token: str | None = None) -> None:
        servers.wait_until(lambda: get(self.base + "/health", 2, token)[0] == 200 or self.proc.poll() is not None,
                           timeout, "livecc run ready")
        assert self.proc.poll() is None, self.logs()[-3000:]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def term(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            raise AssertionError(f"no exit {timeout} s after SIGTERM:\n{self.logs()[-8000:]}") from None
        finally:
            self.close()

    def close(self) -> None:
        servers.kill(self.proc)
        self._log.close()


def _frame_gaps(path: Path) -> list[float]:
    """The video packets' pts (s) of a file, in order."""
    out = subprocess.run([servers.FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, timeout=60, check=True)
    pts = sorted(float(x) for x in out.stdout.split() if x.strip() and x.strip() != "N/A")
    return [b - a for a, b in zip(pts, pts[1:])]


# -- (a) publisher killed and restarted -----------------------------------------------------------------
@pytest.mark.timeout(420)
def test_publisher_killed_and_restarted_during_livecc_run(nginx_rtmp, publisher, stream_key, tmp_path, model,
                                                          source_file):
    src = nginx_rtmp.url(stream_key)
    pub = publisher(src, input_file=str(source_file))
    mp4, srt_path, events = tmp_path / "out.mp4", tmp_path / "out.srt", tmp_path / "out.jsonl"
    run = Run(["run", src, "--model", str(model), "--device", "cpu", "--seed", "0", "--status", "plain",
               "--sink", f"burnin:{mp4}", "--sink", f"srt:{srt_path}", "--sink", f"jsonl:{events}",
               "--set", "sinks[0].fps=10", "--set", "status.interval_s=10", *LIGHT], tmp_path)
    recover, lost_after, samples = [], [], []
    try:
        run.wait_ready()

        def wait_for(pred, timeout, what):
            return servers.wait_until(lambda: pred(jsonl(events)) or run.proc.poll() is not None, timeout, what,
                                      interval=0.1)

        def caption_after(t_wall: float, stream_t: float):
            return lambda recs: [r for r in recs if r["type"] == "caption" and r["created_at"] > t_wall
                                 and r["start"] >= stream_t]

        wait_for(caption_after(0, 0), 60, "the first caption")
        t_first = time.time()
        for i in range(RESTARTS):
            n_lost = sum(r.get("kind") == "source_lost" for r in jsonl(events))
            t_kill = time.monotonic()
            pub.stop()  # SIGKILL: the encoder vanishes
            wait_for(lambda recs: sum(r.get("kind") == "source_lost" for r in recs) > n_lost, LOSS_BOUND_S,
                     f"source_lost #{i + 1}")
            lost_after.append(time.monotonic() - t_kill)
            pub.start()
            t_restart, t_restart_wall = time.monotonic(), time.time()
            back = wait_for(lambda recs: [r for r in recs if r.get("kind") == "source_back"
                                          and r["created_at"] > t_restart_wall], RECOVER_BOUND_S,
                            f"source_back #{i + 1}")[-1]
            wait_for(caption_after(t_restart_wall, back["stream_time"]), RECOVER_BOUND_S, f"a caption after restart {i + 1}")
            recover.append(time.monotonic() - t_restart)
            assert run.proc.poll() is None, run.logs()[-3000:]
            if i in (0, RESTARTS - 1):
                time.sleep(2)  # the same state both times: source live, captions flowing, nothing reconnecting
                samples.append(counts(run.proc.pid))
        status = json.loads(get(run.base + "/api/status")[1])
        rc = run.term()
        t_term_wall = time.time()
    finally:
        run.close()
    logs = run.logs()
    assert rc == 0, logs[-3000:]
    assert "Traceback" not in logs
    recs = jsonl(events)
    kinds = [r.get("kind") for r in recs if r["type"] == "event"]
    assert kinds.count("source_lost") == RESTARTS and kinds.count("source_back") == RESTARTS, kinds
    assert "source_error" not in kinds
    assert status["capture"]["reconnects"] == RESTARTS
    (threads0, fds0, rss0), (threads1, fds1, rss1) = samples
    print(f"\n{RESTARTS} restarts: loss seen after {min(lost_after):.1f}-{max(lost_after):.1f} s, captions back "
          f"{min(recover):.1f}-{max(recover):.1f} s (median {sorted(recover)[len(recover) // 2]:.1f} s) after each restart; "
          f"threads {threads0} -> {threads1}, fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} MiB (not asserted); burn-in {status['sinks'].get('burnin', {}).get('detail')}")
    assert threads1 <= threads0 + 2 and fds1 <= fds0 + 2, samples  # a leak per restart would be +19 or more

    # the burn-in never stopped: the MP4 covers the wall clock from the first frame to SIGTERM
    info = servers.ffprobe(str(mp4))
    duration = float(info["format"]["duration"])
    wall = t_term_wall - t_first
    gaps = _frame_gaps(mp4)
    print(f"burn-in MP4: {duration:.1f} s for {wall:.1f}+ s of wall clock, largest frame gap {max(gaps):.2f} s")
    assert duration >= wall - 2, (duration, wall)
    assert max(gaps) < 1.0  # frames repeated through every outage

    # the SRT is whole and holds the captions from after the last restart
    import srt

    subs = list(srt.parse(srt_path.read_text()))
    spoken = [r for r in recs if r["type"] == "caption" and not r["silence"]]
    assert len(subs) == len(spoken) > RESTARTS


# -- (b) SIGTERM at random moments ----------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_sigterm_at_random_moments_leaves_finalised_outputs(nginx_rtmp, publisher, stream_key, tmp_path, model,
                                                           source_file):
    """SIGTERM at a seeded random moment 0-12 s after spawn (import, model load, waiting for frames, the
    opener, steady captioning), SIGTERMS times: every output that exists is whole."""
    import srt

    src = nginx_rtmp.url(stream_key)
    publisher(src, input_file=str(source_file))
    rng = random.Random(6)
    outcomes = []
    for i in range(SIGTERMS):
        d = tmp_path / f"run{i}"
        d.mkdir()
        mp4, srt_path, events = d / "out.mp4", d / "out.srt", d / "out.jsonl"
        at = rng.uniform(0, 12)
        run = Run(["run", src, "--model", str(model), "--device", "cpu", "--seed", "0", "--status", "plain",
                   "--sink", f"burnin:{mp4}", "--sink", f"srt:{srt_path}", "--sink", f"jsonl:{events}",
                   "--set", "sinks[0].fps=10", *LIGHT], d)
        try:
            time.sleep(max(0.0, run.t0 + at - time.monotonic()))
            t_term = time.monotonic()
            rc = run.term(timeout=30)  # shutdown.turn_timeout_s + sinks_timeout_s are well under this
            took = time.monotonic() - t_term
        finally:
            run.close()
        logs = run.logs()
        assert "Traceback" not in logs, logs[-3000:]
        # -15: the signal came before the handler was installed (Python still importing): nothing written yet
        assert rc == 0 or (rc == -signal.SIGTERM and not mp4.exists() and not events.exists()), (i, at, rc, logs[-2000:])
        assert took < 20, (i, at, took)
        what = {"at": round(at, 1), "rc": rc, "exit_s": round(took, 1)}
        if mp4.exists():
            info = servers.ffprobe(str(mp4))  # the moov was written: it plays
            v = [s for s in info["streams"] if s["codec_type"] == "video"]
            assert v and v[0]["codec_name"] == "h264", info
            what["mp4_s"] = round(float(info["format"].get("duration", 0)), 1)
        if srt_path.exists():
            what["srt"] = len(list(srt.parse(srt_path.read_text())))  # raises on a malformed file
        if events.exists():
            lines = events.read_text().splitlines()
            assert all(json.loads(line) for line in lines)  # whole lines only
            what["captions"] = sum(json.loads(line)["type"] == "caption" for line in lines)
        outcomes.append(what)
    print("\n" + "\n".join(str(o) for o in outcomes))
    assert sum("mp4_s" in o for o in outcomes) >= SIGTERMS // 3  # the draw reached the captioning phase often


# -- (c) secrets never reach any output ------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_secrets_appear_in_no_output(nginx_rtmp, publisher, stream_key, tmp_path, model, source_file):
    """Every kind of secret a run can be given, and every place a run writes to or serves, with debug logs."""
    secrets = {
        "source stream key": "SRCKEYsecret1x",
        "source password": "SRCPASSsecret2x",
        "burn-in stream key": "OUTKEYsecret3x",
        "dead burn-in stream key": "DEADKEYsecret4x",
        "webhook password": "HOOKPASSsecret5x",
        "webhook token": "HOOKTOKENsecret6x",
        "dead webhook token": "DEADHOOKsecret8x",
        "control API token": "APITOKENsecret7x-0123456789",
    }
    s = secrets
    published = nginx_rtmp.url(f"{stream_key}-{s['source stream key']}")
    pub = publisher(published, input_file=str(source_file))
    src = published.replace("rtmp://", f"rtmp://viewer:{s['source password']}@")
    out = nginx_rtmp.url(f"{stream_key}-{s['burn-in stream key']}")
    dead_rtmp = f"rtmp://127.0.0.1:{servers.free_port()}/live/{s['dead burn-in stream key']}"
    received: list[dict] = []
    receiver = _Receiver(received).__enter__()
    hook = f"http://hook:{s['webhook password']}@127.0.0.1:{receiver.port}/hook?token={s['webhook token']}"
    dead_hook = f"http://127.0.0.1:{servers.free_port()}/hook?token={s['dead webhook token']}"
    events, srt_path = tmp_path / "out.jsonl", tmp_path / "out.srt"
    token = s["control API token"]
    run = Run(["run", src, "--model", str(model), "--device", "cpu", "--seed", "0", "--status", "plain",
               "--log-level", "debug", "--sink", f"burnin:{out}", "--sink", f"burnin:{dead_rtmp}",
               "--sink", f"webhook:{hook}", "--sink", f"webhook:{dead_hook}", "--sink", f"jsonl:{events}",
               "--sink", f"srt:{srt_path}", "--sink", "overlay", "--set", "sinks[0].fps=10", "--set", "sinks[1].fps=10",
               "--set", "sinks[3].retries=1", "--set", "sinks[3].backoff_initial_s=0.1",
               "--set", f"server.token={token}", "--set", "status.interval_s=2", *LIGHT], tmp_path)
    served: dict[str, bytes] = {}
    try:
        run.wait_ready(token=token)
        # the HTTP server (control API, metrics, overlay) listens on 127.0.0.1 only (the default host)
        addrs = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:] + Path(
            "/proc/net/tcp6").read_text().splitlines()[1:] if line.split()[3] == "0A" and
            line.split()[1].endswith(f":{run.port:04X}")]
        assert addrs == [f"0100007F:{run.port:04X}"], addrs
        servers.wait_until(lambda: len([r for r in jsonl(events) if r["type"] == "caption"]) >= 3
                           or run.proc.poll() is not None, 60, "captions")
        pub.stop()  # a loss and a reconnect: the source URL goes through the reconnect log lines too
        servers.wait_until(lambda: any(r.get("kind") == "source_lost" for r in jsonl(events)), 15, "source_lost")
        pub.start()
        servers.wait_until(lambda: any(r.get("kind") == "source_back" for r in jsonl(events)), 20, "source_back")
        servers.wait_until(lambda: "retry in" in run.logs() and re.search(r"after \d+ attempt", run.logs()), 20,
                           "the dead sinks' errors")
        for path in ("/api/status", "/metrics", "/captions.json", "/health", "/overlay"):
            code, body = get(run.base + path, token=token)
            assert code == 200, (path, code, body[:300])
            served[path] = body
        code, body = get(run.base + "/api/status")  # no token: refused, and the refusal says nothing secret
        assert code == 401
        served["/api/status without a token"] = body
        status = json.loads(served["/api/status"])
        assert status["turns"] >= 3 and status["capture"]["reconnects"] >= 1
        rc = run.term()
    finally:
        run.close()
        receiver.__exit__()
    # exit 1: the dead webhook lost its captions, and one line says so (with its error, redacted)
    assert rc == 1, run.logs()[-3000:]
    lost = [line for line in run.logs().splitlines() if line.startswith("livecc: error:")]
    assert len(lost) == 1 and "sink lost data: " in lost[0] and "webhook#2 (" in lost[0], run.logs()[-3000:]
    # the live webhook got the captions, its password as HTTP basic auth and its token in the query
    import base64

    assert received and all(r["path"] == f"/hook?token={s['webhook token']}" for r in received)
    assert received[0]["auth"] == "Basic " + base64.b64encode(f"hook:{s['webhook password']}".encode()).decode()
    outputs = {"stdout+stderr": run.logs(), "jsonl": events.read_text(), "srt": srt_path.read_text(),
               **{k: v.decode(errors="replace") for k, v in served.items()}}
    logs = outputs["stdout+stderr"]
    # the places that would carry them if redaction failed: the source, the sinks, their errors, debug lines
    assert "/live/***" in logs and "viewer:***@" in logs and "webhook http://127.0.0.1:" in logs, logs[-3000:]
    assert "DEBUG" in logs and "webhook" in logs and status["source"].endswith("/live/***")
    leaks = [(what, where) for what, secret in secrets.items() for where, text in outputs.items() if secret in text]
    assert not leaks, leaks
    print(f"\n{len(secrets)} secrets, {len(outputs)} outputs ({sum(map(len, outputs.values()))} characters, "
          f"{len(logs.splitlines())} log lines): no secret in any")


class _Receiver:
    """A loopback HTTP server that records each POST's path and Authorization header."""

    def __init__(self, into: list):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                into.append({"path": self.path, "auth": self.headers.get("Authorization")})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)

    def __enter__(self) -> "_Receiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- (d) the burn-in's RTMP server down for 30 s --------------------------------------------------------
OUTAGE_S = 30.0


def _restart_nginx(ngx: servers.NginxRtmp) -> None:
    """Start ``ngx`` again on the same port with the same config (NginxRtmp.start would pick a new port)."""
    ngx.proc = subprocess.Popen([servers.NGINX, "-p", str(ngx.dir), "-c", str(ngx.dir / "nginx.conf"), "-e",
                                 str(ngx.dir / "error.log")], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    servers.wait_until(lambda: servers.is_listening(ngx.port), 10, "nginx-rtmp back")


def _plays(url: str, timeout: float = 8) -> bool:
    r = subprocess.run([servers.FFPROBE, "-v", "error", "-rw_timeout", str(int(timeout * 1e6)), "-select_streams", "v:0",
                        "-read_intervals", "%+1", "-count_frames", "-show_entries", "stream=nb_read_frames", "-of",
                        "csv=p=0", url], capture_output=True, text=True, timeout=timeout + 10)
    return r.returncode == 0 and r.stdout.strip().split(",")[0].isdigit() and int(r.stdout.strip().split(",")[0]) > 0


@pytest.mark.timeout(240)
def test_burnin_rtmp_server_down_30s_during_livecc_run(nginx_rtmp, publisher, stream_key, tmp_path, model,
                                                      source_file):
    src = nginx_rtmp.url(stream_key)
    publisher(src, input_file=str(source_file))
    out_server = servers.NginxRtmp().start()
    out = out_server.url("restream")
    srt_path, events = tmp_path / "out.srt", tmp_path / "out.jsonl"
    run = Run(["run", src, "--model", str(model), "--device", "cpu", "--seed", "0", "--status", "plain",
               "--sink", f"burnin:{out}", "--sink", f"srt:{srt_path}", "--sink", f"jsonl:{events}", "--sink", "overlay",
               "--set", "sinks[0].fps=10", *LIGHT], tmp_path)

    def caps() -> list[dict]:
        return [r for r in jsonl(events) if r["type"] == "caption"]

    try:
        run.wait_ready()
        servers.wait_until(lambda: len(caps()) >= 2 or run.proc.poll() is not None, 60, "captions")
        assert servers.wait_until(lambda: _plays(out), 30, "the restream before the outage")
        servers.kill(out_server.proc, signal.SIGKILL)  # the server vanishes
        t_down = time.monotonic()
        n0 = len(caps())
        time.sleep(OUTAGE_S / 2)
        status_mid = json.loads(get(run.base + "/api/status")[1])
        overlay_mid = json.loads(get(run.base + "/captions.json")[1])
        time.sleep(max(0.0, t_down + OUTAGE_S - time.monotonic()))
        during = len(caps()) - n0
        srt_during = len(list(__import__("srt").parse(srt_path.read_text())))
        _restart_nginx(out_server)
        t_up = time.monotonic()
        servers.wait_until(lambda: _plays(out), 45, "the restream after the outage")
        back_after = time.monotonic() - t_up
        status_end = json.loads(get(run.base + "/api/status")[1])
        rc = run.term()
    finally:
        run.close()
        servers.kill(out_server.proc, signal.SIGKILL)
        out_server.stop()
    logs = run.logs()
    assert rc == 0 and "Traceback" not in logs, logs[-3000:]
    burnin_mid, burnin_end = status_mid["sinks"]["burnin"], status_end["sinks"]["burnin"]
    print(f"\n{OUTAGE_S:.0f} s outage of the burn-in's server: {during} captions meanwhile, {srt_during} SRT entries, "
          f"overlay {len(overlay_mid['captions'])} recent; burn-in mid-outage {burnin_mid['state']} "
          f"{burnin_mid['detail']}; restream playing again {back_after:.1f} s after the server came back; "
          f"end {burnin_end['state']} {burnin_end['detail']}")
    assert during >= OUTAGE_S * 0.6  # about one turn per second went on
    assert status_mid["sinks"]["srt"]["state"] == "ok" and status_mid["sinks"]["overlay"]["state"] == "ok"
    assert status_mid["sinks"]["jsonl"]["state"] == "ok"
    assert overlay_mid["captions"] and overlay_mid["captions"][-1]["stop"] > caps()[n0 - 1]["stop"]
    assert back_after < 30  # reconnect_max_s is 10 s
    assert burnin_end["state"] == "ok" and burnin_end["detail"]["encoder_alive"]
    assert srt_during >= n0  # the subtitles kept being written
