"""Clear, one-line, redacted errors; bounded time to fail; retries that give up."""

from __future__ import annotations

import time

import pytest

import servers
from pipeline.capture import Backoff, CaptureError, CaptureThread, RingBuffer, resolve

pytestmark = pytest.mark.timeout(60)


def _fail(spec, within: float, **kw) -> tuple[CaptureError, list]:
    events = []
    t = time.monotonic()
    kw.setdefault("wait_for_source", False)  # fail fast (live sources wait by default)
    cap = CaptureThread(spec, RingBuffer(2), on_event=events.append, **kw).start()
    with pytest.raises(CaptureError) as ei:
        cap.wait_ready(within + 5)
    took = time.monotonic() - t
    assert took < within, f"took {took:.1f}s"
    assert cap.stop(2) and not cap.alive
    assert "\n" not in str(ei.value)
    kinds = [e.kind for e in events]  # retries say "waiting_for_source" (once) before they give up
    assert kinds in (["source_error"], ["waiting_for_source", "source_error"]) and events[-1].detail == str(ei.value)
    return ei.value, events


def test_dead_rtmp_url_fails_fast_and_redacted():
    port = servers.free_port()  # nothing listens there: connection refused
    err, _ = _fail(f"rtmp://127.0.0.1:{port}/live/sk_live_SECRET", within=2.0)
    assert "refused" in str(err).lower()
    assert "SECRET" not in str(err) and "/live/***" in str(err)


def test_dead_url_with_retries_gives_up():
    port = servers.free_port()
    err, _ = _fail(f"rtsp://admin:hunter2@127.0.0.1:{port}/cam", within=4.0, wait_for_source=True,
                   backoff=Backoff(initial=0.2, max_attempts=3))
    assert "gave up after 3 attempts" in str(err) and "hunter2" not in str(err)


def test_dead_srt_url_through_relay():
    port = servers.free_port("udp")
    before = servers.child_pids()
    src = resolve(f"srt://127.0.0.1:{port}?mode=caller&connect_timeout=1000")
    err, _ = _fail(src, within=8.0)
    assert str(port) in str(err)
    assert not servers.child_pids() - before  # the relay is reaped


def test_audio_only_file(media_dir):
    path = servers.make_audio(media_dir / "only_audio.m4a")
    err, _ = _fail(str(path), within=2.0)
    assert "no video stream" in str(err) and "audio" in str(err)


def test_nonexistent_file(tmp_path):
    err, _ = _fail(str(tmp_path / "nope.mp4"), within=2.0)
    assert "No such file" in str(err)


def test_url_that_is_not_video(tmp_path):
    (tmp_path / "page.html").write_text("<html><body>" + "not a video " * 500 + "</body></html>")
    with servers.HttpDir(tmp_path) as http:
        err, _ = _fail(http.url("page.html"), within=5.0)
    assert "not a media stream" in str(err) or "Invalid data" in str(err)


def test_unknown_scheme():
    with pytest.raises(CaptureError, match="unknown source kind 'gopher'"):
        resolve("gopher://example.org/x")


def test_live_stream_without_video(nginx_rtmp, stream_key):
    """A live stream that carries only audio is a clear error at the first open when told not to
    wait (by default it waits for the video: test_capture_inputs.py)."""
    url = nginx_rtmp.url(stream_key)
    audio_only = servers.Publisher(url, fmt="flv")
    audio_only.args = [servers.FFMPEG, "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                       "sine=frequency=440:sample_rate=44100", "-c:a", "aac", "-f", "flv", url]
    with audio_only:
        err, _ = _fail(url, within=10.0)
    assert "no video stream (has audio)" in str(err), err


def test_a_source_down_for_hours_does_not_flood_the_log(caplog):
    """A live source that stays down is retried forever (every ``reconnect_max_s``, 5 s: 17,280 attempts a day);
    the log gets a warning for the first attempts, then one now and then with the count, not one per attempt.
    Here 300 real refused connections with no wait between them stand in for hours of retries."""
    import logging

    port = servers.free_port()  # nothing listens there: connection refused, at once
    cap = CaptureThread(f"rtmp://127.0.0.1:{port}/live/key", RingBuffer(2), wait_for_source=True,
                        backoff=Backoff(initial=0.0, max_delay=0.0))
    with caplog.at_level(logging.WARNING, logger="pipeline.capture.reader"):
        cap.start()
        deadline = time.monotonic() + 30
        while cap.stats["attempts"] < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cap.stop(5)
    assert cap.stats["attempts"] >= 300 and cap.state == "stopped"
    lines = [r for r in caplog.records if r.name == "pipeline.capture.reader" and r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 10, f"{len(lines)} warning lines for {cap.stats['attempts']} attempts"
    assert "refused" in cap.state_reason.lower() or "refused" in lines[-1].getMessage().lower()


def test_log_limit_rule():
    """``backoff.LogLimit``, the one rule for the capture thread's, the burn-in output's and the dispatcher's
    repeated failures: the first ``first`` occurrences each logged, then one every ``every_s`` seconds with the
    number left out since the last line; the ``first``-th says so."""
    from pipeline.backoff import LogLimit

    lim = LogLimit(first=3, every_s=60.0)
    got = [lim.check(n, now=100.0 + n) for n in range(1, 8)]  # 7 failures within 7 s
    assert got[:2] == ["", ""] and "once every 60 s" in got[2] and got[3:] == [None] * 4
    assert lim.check(8, now=103.0 + 60.0) == " (4 more since the last line)"  # a minute after the last line
    assert lim.check(9, now=164.0) is None
    one = LogLimit(first=1)
    assert one.check(1, now=0.0) is not None and one.check(2, now=59.0) is None and one.check(3, now=60.0)
