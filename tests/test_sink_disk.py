"""File sinks against a real disk that fills up (a 2 MiB tmpfs) and against an earlier run's files.

A full disk: every record is in the file whole or not at all, none twice after space returns, the
sink is reported ``failed`` with the reason, the other sinks go on, and ``livecc run`` says so
and exits 1. A second run on the same paths: the JSONL is continued, subtitles get a new name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import srt
import webvtt

import servers
from pipeline.backoff import Backoff
from pipeline.fanout.dispatch import Dispatcher
from pipeline.fanout.outputs import claim_output_path
from pipeline.plugins import make_sink
from pipeline.types import Caption

ROOT = Path(__file__).resolve().parent.parent
LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def texts_of(path: Path) -> list[str]:
    """The caption texts of a JSONL, SRT or VTT file, each parsed by a real parser (raises if malformed)."""
    if path.suffix == ".jsonl":
        return [r["text"] for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "caption"]
    if path.suffix == ".srt":
        subs = list(srt.parse(path.read_text()))
        assert [s.index for s in subs] == list(range(1, len(subs) + 1))  # numbering without gaps
        assert all(a.end <= b.start for a, b in zip(subs, subs[1:]))  # no overlap
        return [s.content for s in subs]
    return [c.text for c in webvtt.read(str(path))]


def wait_for(cond, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_disk_full_whole_records_nothing_duplicated(small_disk, tmp_path):
    """JSONL, SRT and VTT on a disk that fills up mid-run and then gets space back; a JSONL elsewhere."""
    on_disk = {"jsonl": small_disk.path / "c.jsonl", "srt": small_disk.path / "c.srt", "vtt": small_disk.path / "c.vtt"}
    other = tmp_path / "other.jsonl"
    sinks = [make_sink(f"{k}:{p}", **({} if k == "jsonl" else {"max_line_chars": 0})) for k, p in on_disk.items()]
    d = Dispatcher([*sinks, make_sink(f"jsonl:{other}")], retry=Backoff(initial=0.01, max_attempts=3))
    d.start()
    sent: list[str] = []

    def send(n: int) -> None:
        for _ in range(n):
            i = len(sent)
            sent.append(f"caption {i:03d} " + "words " * 40)  # ~250 bytes: a page holds ~16
            d.caption(Caption(i, i + 1, sent[-1].strip()))
        assert wait_for(lambda: all(st["captions"] + st["failed"] == len(sent) for st in d.status().values()))

    send(10)
    small_disk.fill()
    send(40)  # the files' last pages take a few more, then a record crosses into a page that is not there
    full = d.status()
    small_disk.free()
    send(10)
    final = d.stop(5)

    expected = [s.strip() for s in sent]
    assert texts_of(other) == expected and final["jsonl#2"]["state"] == "stopped"  # the other sink: everything
    for name, path in zip(("jsonl", "srt", "vtt"), on_disk.values()):
        st, got = final[name], texts_of(path)
        assert len(set(got)) == len(got), name  # nothing twice
        assert set(got) <= set(expected) and got == sorted(got), name  # only whole records, in order
        assert got[:10] == expected[:10] and got[-10:] == expected[-10:], name  # space back: writing again
        assert 10 < len(got) < 50 and st["failed"] == len(expected) - len(got), (name, len(got), st)
        assert full[name]["state"] == "failed" and "No space left on device" in full[name]["last_error"], full[name]
        assert st["state"] == "failed" and "No space left on device" in st["last_error"], st  # in the summary
        print(f"\n{name}: {len(got)} of {len(expected)} written ({len(got) - 20} while full), {st['failed']} lost, "
              f"{st['retries']} retries, {path.stat().st_size} bytes")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_livecc_run_disk_full_exits_1_and_says_which_sink(small_disk, tmp_path):
    """``livecc run`` of a 4 s file with a JSONL on a full disk and an SRT elsewhere."""
    from pipeline.fixtures.testvideo import test_video
    from pipeline.fixtures.tiny import tiny_checkpoint

    model, video = tiny_checkpoint("small"), test_video(seconds=4)
    small_disk.fill()
    r = subprocess.run(LIVECC + ["run", str(video), "--model", str(model), "--device", "cpu", "--status", "off",
                                 "--port", str(servers.free_port()), "--sink", f"jsonl:{small_disk.path / 'c.jsonl'}",
                                 "--sink", f"srt:{tmp_path / 'c.srt'}"],
                       cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=100)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    done = [line for line in r.stderr.splitlines() if "done:" in line]
    assert done and "jsonl failed" in done[-1] and "srt stopped" in done[-1], r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("livecc: error:")]
    assert len(errors) == 1 and "jsonl" in errors[0] and "No space left on device" in errors[0], r.stderr[-3000:]
    assert (small_disk.path / "c.jsonl").read_text() == ""
    assert texts_of(tmp_path / "c.srt")  # the SRT got its cues


def run_sink(spec: str, captions: list[str], **settings) -> dict:
    sink = make_sink(spec, **settings)
    sink.start()
    for i, text in enumerate(captions):
        sink.on_caption(Caption(i, i + 1, text))
    stats = sink.stats()
    sink.stop()
    return stats


def test_second_run_jsonl_continues_after_a_marker(tmp_path):
    path = tmp_path / "c.jsonl"
    run_sink(f"jsonl:{path}", ["first run a", "first run b"])
    path.write_bytes(path.read_bytes() + b'{"type": "caption", "te')  # the first run was cut mid-line
    stats = run_sink(f"jsonl:{path}", ["second run"])
    lines = path.read_text().splitlines()
    assert [json.loads(x)["text"] for x in lines[:2]] == ["first run a", "first run b"]
    assert lines[2] == '{"type": "caption", "te'  # kept, on its own line
    marker, last = json.loads(lines[3]), json.loads(lines[4])
    assert marker["type"] == "run_start" and marker["created_at"] > time.time() - 60 and last["text"] == "second run"
    assert stats["path"] == str(path)
    run_sink(f"jsonl:{path}", ["replaced"], existing="overwrite")
    assert texts_of(path) == ["replaced"]


@pytest.mark.parametrize("ext", ["srt", "vtt"])
def test_second_run_subtitles_get_a_new_name(tmp_path, ext):
    path = tmp_path / f"match.{ext}"
    stats = [run_sink(f"{ext}:{path}", [f"run {n}"]) for n in range(3)]
    paths = [path, tmp_path / f"match.1.{ext}", tmp_path / f"match.2.{ext}"]
    assert [texts_of(p) for p in paths] == [["run 0"], ["run 1"], ["run 2"]]  # each run's file intact
    assert [s["path"] for s in stats] == [str(p) for p in paths]  # the status says where it writes
    run_sink(f"{ext}:{path}", ["replaced"], existing="overwrite")
    assert texts_of(path) == ["replaced"] and not (tmp_path / f"match.3.{ext}").exists()


def test_claim_output_path(tmp_path):
    (tmp_path / "empty.srt").touch()
    assert claim_output_path(tmp_path / "empty.srt", "new") == tmp_path / "empty.srt"  # nothing there to keep
    assert claim_output_path(tmp_path / "sub" / "x.mp4", "new") == tmp_path / "sub" / "x.mp4"  # folders made
    (tmp_path / "sub" / "x.mp4").write_bytes(b"data")
    assert claim_output_path(tmp_path / "sub" / "x.mp4", "new") == tmp_path / "sub" / "x.1.mp4"
    assert (tmp_path / "sub" / "x.1.mp4").exists()  # claimed (created empty)
    assert claim_output_path(tmp_path / "sub" / "x.mp4", "new") == tmp_path / "sub" / "x.1.mp4"  # still empty
    (tmp_path / "sub" / "x.1.mp4").write_bytes(b"data")
    assert claim_output_path(tmp_path / "sub" / "x.mp4", "new") == tmp_path / "sub" / "x.2.mp4"
    assert claim_output_path(tmp_path / "sub" / "x.mp4", "append") == tmp_path / "sub" / "x.mp4"
    with pytest.raises(IsADirectoryError):
        claim_output_path(tmp_path / "sub", "new")
    with pytest.raises(NotADirectoryError):
        claim_output_path(tmp_path / "sub" / "x.mp4" / "y.srt", "new")


def test_jsonl_to_a_fifo(tmp_path):
    """A named pipe (``mkfifo``) as the JSONL target: lines arrive in order (nothing to seek or cut back)."""
    path = tmp_path / "captions.fifo"
    os.mkfifo(path)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(path.read_bytes()))
    reader.start()
    run_sink(f"jsonl:{path}", ["one", "two"])
    reader.join(10)
    assert [json.loads(x)["text"] for x in got[0].splitlines()] == ["one", "two"]


#: A first run in its own process: starts a sink, then writes one caption per line read from stdin, then stops.
FIRST_RUN = """
import sys
from pipeline.plugins import make_sink
from pipeline.types import Caption
sink = make_sink(sys.argv[1])
sink.start()
print("started", flush=True)
for i, line in enumerate(sys.stdin):
    sink.on_caption(Caption(i, i + 1, line.strip()))
    print("written", flush=True)
sink.stop()
print("stopped", flush=True)
"""


@pytest.mark.parametrize("ext", ["jsonl", "srt", "vtt"])
def test_two_runs_at_once_on_one_file_never_mix(tmp_path, ext):
    """A second run started while the first still writes the same file (its sink started, nothing written yet:
    an empty claimed file; then both write). The first run's file holds exactly its own captions; the second
    writes another file (``name.1.ext``, named in its status) that holds exactly its own."""
    path = tmp_path / f"c.{ext}"
    first = subprocess.Popen([sys.executable, "-c", FIRST_RUN, f"{ext}:{path}"], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline().strip() == "started"
        second = make_sink(f"{ext}:{path}")
        second.start()
        for i in range(3):
            first.stdin.write(f"first run caption {i}\n")
            first.stdin.flush()
            assert first.stdout.readline().strip() == "written"
            second.on_caption(Caption(i, i + 1, f"second {i}"))
        other = Path(second.stats()["path"])
        second.stop()
        first.stdin.close()
        assert first.stdout.readline().strip() == "stopped"
    finally:
        first.kill()
        first.wait(10)
    assert texts_of(path) == [f"first run caption {i}" for i in range(3)]
    assert other != path and texts_of(other) == [f"second {i}" for i in range(3)]
