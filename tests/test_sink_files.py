"""File and console sinks: SRT / WebVTT (parsed with real parsers), JSONL, console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import srt
import webvtt

from pipeline.plugins import make_sink
from pipeline.types import Caption, StreamEvent

CAPTIONS = [
    Caption(0.0, 1.0, "The match is about to start"),
    Caption(1.0, 2.0, " ..."),  # the model's streaming EOS: no cue
    Caption(2.0, 3.0, "the striker <b>runs</b> & shoots -->"),
    Caption(3.0, 4.0, ""),
    Caption(4.0, 5.0, "Goal! Ça va très bien, 日本語も"),
    Caption(9.0, 10.0, "a very long caption " * 6),
]


def secs(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def run(sink, captions=CAPTIONS, events=()):
    sink.start()
    for c in captions:
        sink.on_caption(c)
    for e in events:
        sink.on_event(e)
    sink.stop()


def test_srt_parses_and_timings_match(tmp_path):
    path = tmp_path / "out.srt"
    run(make_sink(f"srt:{path}", linger_s=2.0))
    subs = list(srt.parse(path.read_text(encoding="utf-8")))
    assert [s.index for s in subs] == [1, 2, 3, 4]
    got = [(s.start.total_seconds(), s.end.total_seconds()) for s in subs]
    # each cue shows from its start until the next caption (silence does not end it) or stop + linger
    assert got == [(0.0, 2.0), (2.0, 4.0), (4.0, 7.0), (9.0, 12.0)]
    assert subs[0].content == "The match is about to start"
    assert "<b>runs</b> & shoots ->" in subs[1].content
    assert subs[2].content == "Goal! Ça va très bien, 日本語も"
    assert all(len(line) <= 42 for line in subs[3].content.splitlines()) and "\n" in subs[3].content


@pytest.mark.parametrize("ext", ["srt", "vtt"])
def test_cues_stay_in_order_across_the_100_hour_mark(tmp_path, ext):
    """A 24/7 stream passes 100 hours of stream time on its fifth day: the hours field grows a digit there (SRT's
    ``hh`` and WebVTT's hours accept more). The cue before the mark still ends where the next begins (its end
    stamp is rewritten in place): no two cues overlap, at 100 h as at 1000 h."""
    path = tmp_path / f"long.{ext}"
    caps = [Caption(t, t + 1.0, f"minute {k}") for k, t in enumerate(
        [359_996.0 + i for i in range(8)] + [3_599_996.0 + i for i in range(8)])]
    run(make_sink(f"{ext}:{path}", linger_s=2.0), captions=caps)
    if ext == "srt":
        got = [(c.start.total_seconds(), c.end.total_seconds()) for c in srt.parse(path.read_text())]
    else:
        got = [(secs(c.start), secs(c.end)) for c in webvtt.read(str(path))]
    assert [start for start, _ in got] == [c.start for c in caps]
    for (_, end), (nxt, _) in zip(got, got[1:]):
        assert end <= nxt, got
    assert "100:00:00" in path.read_text() and "1000:00:00" in path.read_text()


def test_vtt_parses_escapes_and_timings_match(tmp_path):
    path = tmp_path / "out.vtt"
    run(make_sink({"vtt": {"path": str(path), "linger_s": 1.0}}))
    cues = list(webvtt.read(str(path)))
    assert [(secs(c.start), secs(c.end)) for c in cues] == [(0, 2), (2, 4), (4, 6), (9, 11)]
    raw = path.read_text(encoding="utf-8")
    assert raw.startswith("WEBVTT\n\n")
    assert "&lt;b&gt;runs&lt;/b&gt; &amp; shoots --&gt;" in raw.replace("\n", " ")  # markup is text in a cue
    assert cues[2].text == "Goal! Ça va très bien, 日本語も"


def test_subtitles_auto_format_and_answers(tmp_path):
    path = tmp_path / "x.vtt"
    run(make_sink(f"subtitles:{path}"), [Caption(1, 2, "Two goals", kind="answer", query="score?")])
    cues = list(webvtt.read(str(path)))
    assert cues[0].text == "A: Two goals"


WRITER = textwrap.dedent(
    """
    import sys, time
    from pipeline.plugins import make_sink
    from pipeline.types import Caption
    sink = make_sink(sys.argv[1])
    sink.start()
    i = 0
    while True:
        sink.on_caption(Caption(i * 0.5, i * 0.5 + 0.5, f"caption number {i}"))
        print(i, flush=True)
        i += 1
        time.sleep(0.01)
    """
)


@pytest.mark.parametrize("ext", ["srt", "vtt", "jsonl"])
def test_killed_writer_leaves_valid_file(tmp_path, ext):
    path = tmp_path / f"crash.{ext}"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, f"{ext}:{path}"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        n = 0
        deadline = time.monotonic() + 20
        while n < 40 and time.monotonic() < deadline:
            n = int(proc.stdout.readline()) + 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert n >= 40
    if ext == "jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]  # whole lines only
        assert texts[:n] == [f"caption number {i}" for i in range(n)]
        return
    if ext == "srt":
        subs = list(srt.parse(path.read_text(encoding="utf-8")))
        texts = [s.content for s in subs]
        ends = [s.end.total_seconds() for s in subs]
        starts = [s.start.total_seconds() for s in subs]
    else:
        cues = list(webvtt.read(str(path)))
        texts = [c.text for c in cues]
        starts = [secs(c.start) for c in cues]
        ends = [secs(c.end) for c in cues]
    assert len(texts) >= n  # every caption reported written is in the file
    assert texts[:n] == [f"caption number {i}" for i in range(n)]
    assert all(e > s for s, e in zip(starts, ends)), list(zip(starts, ends))
    assert all(ends[i] == starts[i + 1] for i in range(len(starts) - 1))


def test_jsonl_lines(tmp_path):
    path = tmp_path / "ev.jsonl"
    run(make_sink(f"jsonl:{path}"), CAPTIONS[:2], [StreamEvent("source_lost", 3.5, "eof")])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["type"], x.get("text"), x.get("silence")) for x in lines] == [
        ("caption", "The match is about to start", False),
        ("caption", " ...", True),
        ("event", None, None),
    ]
    assert lines[0]["start"] == 0.0 and lines[0]["stop"] == 1.0
    assert lines[2]["kind"] == "source_lost" and lines[2]["stream_time"] == 3.5
    path2 = tmp_path / "ev2.jsonl"
    run(make_sink(f"jsonl:{path2}", include_silence=False, include_events=False), CAPTIONS[:2], [StreamEvent("x", 1)])
    assert len(path2.read_text().splitlines()) == 1


def test_jsonl_flushed_per_line(tmp_path):
    path = tmp_path / "ev.jsonl"
    s = make_sink(f"jsonl:{path}")
    s.start()
    s.on_caption(CAPTIONS[0])
    assert json.loads(path.read_text())["text"] == CAPTIONS[0].text  # readable before stop
    s.stop()


def test_console(capsys):
    run(make_sink("console"), CAPTIONS[:3] + [Caption(5, 6, "2-1", kind="answer", query="score?")], [StreamEvent("source_lost", 3)])
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "[00:00.00-00:01.00] The match is about to start",
        "[00:02.00-00:03.00] the striker <b>runs</b> & shoots -->",
        "[00:05.00-00:06.00] Q: score?",
        "A: 2-1",
        "-- source_lost at 00:03.00",
    ]


def test_console_keeps_a_caption_on_one_line(capsys):
    run(make_sink("console", timestamps=False), [Caption(0, 1, "first line\nsecond  line\r\nthird"),
                                                 Caption(1, 2, "a\nb", kind="answer", query="what\nnow?")])
    assert capsys.readouterr().out.splitlines() == ["first line second line third", "Q: what now?", "A: a b"]


def test_one_caption_text_policy(tmp_path, capsys):
    """include_silence / include_answers / answer_prefix mean the same in every text sink (Sink.text_of)."""
    answer = Caption(5, 6, "two\n goals", kind="answer", query="score?")
    run(make_sink("console", include_silence=True, answer_prefix="> ", timestamps=False), [CAPTIONS[1], answer])
    assert capsys.readouterr().out.splitlines() == ["...", "Q: score?", "> two goals"]
    run(make_sink("console", include_answers=False), [answer])
    assert capsys.readouterr().out == ""
    srt_path, log = tmp_path / "a.srt", tmp_path / "a.jsonl"
    run(make_sink(f"srt:{srt_path}", answer_prefix="[A] ", include_silence=True), [CAPTIONS[1], answer])
    assert [c.content for c in srt.parse(srt_path.read_text())] == ["...", "[A] two goals"]
    run(make_sink(f"jsonl:{log}", include_answers=False, include_silence=False, include_events=False),
        [CAPTIONS[0], CAPTIONS[1], answer])
    assert [json.loads(x)["text"] for x in log.read_text().splitlines()] == [CAPTIONS[0].text]


@pytest.mark.parametrize("ext", ["jsonl", "srt", "vtt"])
def test_output_deleted_while_running_is_written_again(tmp_path, ext):
    """The output file deleted under a running sink (``rm``, a cleanup job): the captions after it went into
    the deleted inode, lost with no word. The sink notices, says so, and writes a new file at its path
    (a valid file of its own: SRT numbering and the VTT header start again)."""
    import logging

    path = tmp_path / f"c.{ext}"
    sink = make_sink(f"{ext}:{path}")
    sink.start()
    for i in range(2):
        sink.on_caption(Caption(i, i + 1, f"before {i}"))
    path.unlink()
    records = logging.getLogger("plugins.sinks")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    records.addHandler(handler)
    try:
        for i in range(2, 4):
            sink.on_caption(Caption(i, i + 1, f"after {i}"))
        sink.stop()
    finally:
        records.removeHandler(handler)
    if ext == "jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    elif ext == "srt":
        subs = list(srt.parse(path.read_text()))
        assert [s.index for s in subs] == [1, 2]
        texts = [s.content for s in subs]
    else:
        texts = [c.text for c in webvtt.read(str(path))]
    assert texts == ["after 2", "after 3"]
    assert any("deleted" in m for m in seen), seen
