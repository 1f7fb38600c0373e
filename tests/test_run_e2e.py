"""End to end on CPU: ffmpeg publishes to nginx-rtmp -> ``livecc run`` (a subprocess, tiny model)
with a burned-in RTMP restream, an MP4, SRT, JSONL and the overlay for ~30 s of video -> SIGTERM.

Checks: captions about once per second of video, the restream plays (ffprobe decodes frames),
``/metrics`` counts the turns, the overlay serves the captions, and after SIGTERM the process
exits 0 with every output finalised (the MP4 probes, the SRT parses and matches the captions).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

VIDEO_SECONDS = 30  # of stream time captioned before SIGTERM
ROOT = Path(__file__).resolve().parent.parent
LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    return servers.http_get(url, timeout)


jsonl = servers.read_jsonl


def captions(path: Path) -> list[dict]:
    return [r for r in jsonl(path) if r.get("type") == "caption" and r.get("kind") == "caption"]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            if line.startswith(name + " ") or line.split(" ")[0] == name:
                return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def source_file():
    from pipeline.fixtures.testvideo import test_video

    return test_video(seconds=20)  # published in a loop with -c copy: near zero CPU for the publisher


def test_livecc_run_rtmp_restream_end_to_end(nginx_rtmp, publisher, stream_key, tmp_path, source_file):
    from pipeline.fixtures.tiny import tiny_checkpoint

    model = tiny_checkpoint("small")
    src, out = nginx_rtmp.url(stream_key + "-in"), nginx_rtmp.url(stream_key + "-out")
    publisher(src, input_file=str(source_file))
    port = servers.free_port()
    srt_path, jsonl_path, mp4_path = tmp_path / "live.srt", tmp_path / "live.jsonl", tmp_path / "live.mp4"
    log_path = tmp_path / "livecc.log"
    cmd = LIVECC + ["run", src, "--model", str(model), "--device", "cpu", "--seed", "0",
                    "--port", str(port), "--status", "plain", "--log-format", "json",
                    "--sink", f"burnin:{out}", "--sink", f"burnin:{mp4_path}", "--sink", f"srt:{srt_path}",
                    "--sink", "overlay", "--sink", f"jsonl:{jsonl_path}",
                    "--set", "sinks[0].fps=15", "--set", "sinks[1].fps=15",  # two x264 encodes on 2 cores
                    "--set", "capture.wait_for_source=true", "--set", "status.interval_s=5",
                    # 120 visual tokens per turn instead of 299: headroom for a busy 2-core CI box
                    "--set", "engine.max_pixels=100352"]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        servers.wait_until(lambda: get(base + "/health", 2)[0] == 200 or proc.poll() is not None, 60,
                           "livecc run ready")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        t_ready = time.monotonic()

        # the restream plays: ffprobe decodes frames of the burned-in output from nginx
        probe = subprocess.run([servers.FFPROBE, "-v", "error", "-rw_timeout", "15000000", "-select_streams", "v:0",
                                "-read_intervals", "%+3", "-count_frames", "-show_entries",
                                "stream=codec_name,width,height,nb_read_frames", "-of", "json", out],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        st = json.loads(probe.stdout)["streams"][0]
        assert st["codec_name"] == "h264" and (st["width"], st["height"]) == (640, 360)
        assert int(st["nb_read_frames"]) >= 15

        # ~30 s of video captioned
        servers.wait_until(lambda: (c := captions(jsonl_path)) and c[-1]["stop"] >= VIDEO_SECONDS
                           or proc.poll() is not None, 90, f"captions up to {VIDEO_SECONDS} s")
        assert proc.poll() is None, log_path.read_text()[-3000:]

        status, body = get(base + "/metrics")
        assert status == 200
        text = body.decode()
        turns_metric = metric(text, 'livecc_turns_total{kind="caption"}')
        caps_now = captions(jsonl_path)
        assert turns_metric >= len(caps_now) >= 1  # the JSONL sink may lag the engine by a line
        assert metric(text, "livecc_input_fps") > 20
        assert metric(text, "livecc_caption_latency_seconds_count") == turns_metric

        status, body = get(base + "/captions.json")  # the overlay got them too
        assert status == 200 and json.loads(body)["captions"]

        os.kill(proc.pid, signal.SIGTERM)
        t_term = time.monotonic()
        rc = proc.wait(timeout=60)
        t_exit = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    logs = log_path.read_text()
    assert rc == 0, logs[-3000:]
    assert "Traceback" not in logs
    records = [json.loads(line) for line in logs.splitlines() if line.strip()]  # --log-format json: every line
    assert any(r["logger"] == "livecc.status" and r["status"]["turns"] > 0 for r in records)
    assert any("SIGTERM" in r["msg"] for r in records)
    assert stream_key not in logs  # the RTMP stream keys are redacted in every log line

    # captions about once per second of video: one turn per second after the 3 s opener
    caps = captions(jsonl_path)
    stops = [c["stop"] for c in caps]
    assert stops == sorted(stops)
    covered = stops[-1] - 3.0
    assert len(caps) - 1 >= 0.8 * covered, f"{len(caps)} turns for {covered:.0f} s of video"
    latencies = [c["latency_s"] for c in caps]
    print(f"\n{len(caps)} turns for {stops[-1]:.1f} s of video; latency median {statistics.median(latencies):.3f} s, "
          f"max {max(latencies):.3f} s; ready after {t_ready - t0:.1f} s; SIGTERM -> exit {t_exit - t_term:.1f} s")

    # the SRT is complete: every non-silent caption, well formed, in order
    import srt

    subs = list(srt.parse(srt_path.read_text()))
    spoken = [c for c in caps if c["text"].strip() not in ("", "...")]
    assert len(subs) == len(spoken) > 0
    assert all(a.start <= b.start for a, b in zip(subs, subs[1:]))
    assert subs[-1].end.total_seconds() >= spoken[-1]["stop"]

    # the MP4 was finalised by the SIGTERM path (moov written): it probes and has the video's length
    info = servers.ffprobe(str(mp4_path))
    v = [s for s in info["streams"] if s["codec_type"] == "video"][0]
    assert v["codec_name"] == "h264"
    assert float(info["format"]["duration"]) >= VIDEO_SECONDS - 5
