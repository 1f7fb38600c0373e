"""``livecc demo``: the whole pipeline offline, in under a minute, producing its files."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import pytest

import servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def test_demo_runs_offline_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    t0 = time.monotonic()
    r = subprocess.run(LIVECC + ["demo", "--out", str(out), "--port", str(servers.free_port()), "--status", "plain"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    print(f"\nlivecc demo took {took:.1f} s")
    assert took < 60 + 15  # the demo's promise is a minute; a shared CI box gets some slack

    # it says plainly that the words are random and how to run the real model
    assert "random" in r.stderr and "chenjoya/LiveCC-7B-Instruct" in r.stderr
    assert "/overlay" in r.stderr and str(out / "burnin.mp4") in r.stderr

    import srt

    subs = list(srt.parse((out / "captions.srt").read_text()))
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    caps = [x for x in rows if x["type"] == "caption"]
    # 20 s of video: the 3 s opener + one turn per second = 18 turns when the CPU keeps up (it does on
    # an idle 2-core machine); a busy CI box drops clips (skip to live), so ask for a fraction
    assert len(caps) >= 8, f"{len(caps)} turns"
    assert len(subs) == len([c for c in caps if c["text"].strip() not in ("", "...")])
    assert r.stdout.count("[00:") >= len(subs)  # the console sink printed them

    # it names the tiny checkpoint for the other commands, with a command that works as printed
    line = next(x.strip() for x in r.stderr.splitlines() if x.strip().startswith("livecc caption "))
    c = subprocess.run(LIVECC + shlex.split(line)[1:], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL)
    assert c.returncode == 0, c.stderr[-3000:]
    assert len(list(srt.parse((tmp_path / "captions.srt").read_text()))) >= 5

    info = servers.ffprobe(str(out / "burnin.mp4"))
    v = [s for s in info["streams"] if s["codec_type"] == "video"][0]
    assert v["codec_name"] == "h264" and (v["width"], v["height"]) == (640, 360)
    assert float(info["format"]["duration"]) >= 18
