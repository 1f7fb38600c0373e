"""Real-world inputs (issue 13): phone video with a display rotation, a live stream joined between
keyframes, HLS that ends or stalls, a live source that is not up yet. Inputs are made by ffmpeg,
served by nginx-rtmp or a local HTTP server; what players show is ffmpeg's own (autorotated) decode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import servers
from capture_helpers import grab
from pipeline.capture import Backoff, CaptureError, CaptureThread, ClipQueue, LiveSampler, RingBuffer, resolve
from pipeline.capture.files import VideoFileError, decode_frames, file_clips, probe

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parent.parent


# -- rotation -----------------------------------------------------------------------------------
def _shown(path, w: int, h: int) -> np.ndarray:
    """The first frame as ffmpeg shows it (autorotation on, its default): H x W x 3 RGB."""
    raw = subprocess.run([servers.FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(path), "-frames:v", "1",
                          "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(h, w, 3)


@pytest.fixture(scope="module")
def landscape(tmp_path_factory):
    """2 s of 320x180 at 10 fps, as a phone stores a portrait video: landscape pixels."""
    return servers.make_video(tmp_path_factory.mktemp("rot") / "base.mp4", size="320x180", fps=10, seconds=2)


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_rotated_file_is_upright(landscape, rotate):
    """MP4 with a rotation in its track matrix: livecc caption's frames and the capture thread's
    frames equal ffmpeg's autorotated picture (portrait for 90 / 270)."""
    rot = landscape.with_name(f"rot{rotate}.mp4")
    subprocess.run([servers.FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-i", str(landscape), "-c", "copy",
                    "-metadata:s:v:0", f"rotate={rotate}", str(rot)], check=True)
    w, h = (180, 320) if rotate in (90, 270) else (320, 180)
    shown = _shown(rot, w, h)
    first = next(decode_frames(rot))[0].image
    assert first.shape == (h, w, 3) and np.array_equal(first, shown)
    clip = next(file_clips(rot))
    assert clip.frames.shape[1] > clip.frames.shape[2] if rotate != 180 else clip.frames.shape[1] < clip.frames.shape[2]
    frames, cap, _ = grab(str(rot), n=3, pace=False)
    assert frames[0].image.shape == (h, w, 3) and np.array_equal(frames[0].image, shown)
    assert cap.stats["format_changes"] == 0


def test_rotated_live_stream_is_upright(nginx_rtmp, publisher, stream_key, tmp_path):
    """A live H.264 stream whose display-orientation SEI says 90 degrees: frames come portrait, as
    ffmpeg shows the stream. The SEI comes with one frame (here the first of a 1 s file the encoder
    loops) and holds for the frames after it."""
    src = servers.make_video(tmp_path / "sei.mp4", size="320x180", fps=15, seconds=1,
                             extra=["-bsf:v", "h264_metadata=display_orientation=insert:rotate=90"])
    shown = _shown(src, 180, 320)
    url = nginx_rtmp.url(stream_key)
    ring = RingBuffer(64)
    with CaptureThread(url, ring, wait_for_source=True) as cap:
        publisher(url, input_file=str(src))
        assert cap.wait_ready(20)
        threads = len(os.listdir("/proc/self/task"))
        servers.wait_until(lambda: cap.stats["frames"] >= 45, 20, "3 s of frames")
        frames = ring.snapshot()[-15:]  # the last second: after an SEI whichever frame we joined at
        # reading VideoFrame.side_data per frame made PyAV start native threads without end (+200 in 3 s)
        assert len(os.listdir("/proc/self/task")) <= threads + 4
    assert all(f.image.shape == (320, 180, 3) for f in frames), {f.image.shape for f in frames}
    diff = min(np.abs(f.image.astype(int) - shown).mean() for f in frames)
    assert diff < 10, diff  # the loop's first frame (testsrc2 moves a little); sideways would be > 50


# -- a live stream joined between keyframes -----------------------------------------------------
def _long_gop(url: str, gop_s: int = 8) -> servers.Publisher:
    """An encoder with audio and a keyframe every ``gop_s`` seconds (OBS "auto" and phones do 8-10 s)."""
    pub = servers.Publisher(url, size="320x240", fps=15, audio=True)
    pub.args[pub.args.index("-g") + 1] = str(15 * gop_s)
    return pub


def test_joined_between_keyframes_waits_for_the_video(nginx_rtmp, stream_key):
    """nginx-rtmp sends the audio at once and the video from the next keyframe, ~6 s later here:
    the capture says it waits for the video (state and event), then captures it; no error."""
    url = nginx_rtmp.url(stream_key)
    events = []
    with _long_gop(url) as pub:
        time.sleep(2)  # not a readiness wait: joins 2 s into the encoder's first 8 s GOP
        t0 = time.monotonic()
        cap = CaptureThread(url, RingBuffer(4), on_event=events.append).start()
        try:
            states = set()
            while not cap.ready.wait(0.05) and time.monotonic() - t0 < 25:
                states.add((cap.state, cap.state_reason))
            assert cap.wait_ready(0), (events, cap.stats, pub.log_text())
        finally:
            assert cap.stop()
    kinds = [e.kind for e in events]
    assert "source_error" not in kinds and kinds[0] == "waiting_for_video", events
    assert any(s == "waiting_for_video" and "audio" in r for s, r in states), states
    print(f"\nfirst frame {cap.first_arrival - t0:.1f} s after the join; states {sorted(states)}")


def test_audio_only_stream_waits_for_video(nginx_rtmp, stream_key):
    """A live stream with no video at all: by default the capture keeps waiting for it and says
    why (wait_for_source=false: one clear error instead, test_capture_errors.py)."""
    url = nginx_rtmp.url(stream_key)
    audio_only = servers.Publisher(url, fmt="flv")
    audio_only.args = [servers.FFMPEG, "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                       "sine=frequency=440:sample_rate=44100", "-c:a", "aac", "-f", "flv", url]
    events = []
    with audio_only, CaptureThread(url, RingBuffer(2), on_event=events.append) as cap:
        servers.wait_until(lambda: cap.state == "waiting_for_video", 15, "waiting for video")
        assert "no video stream (has audio)" in cap.state_reason and cap.alive
    assert [e.kind for e in events] == ["waiting_for_video"] and cap.error is None


# -- a live source that is not up yet -----------------------------------------------------------
def test_network_source_not_up_yet_is_retried(nginx_rtmp, stream_key):
    """Started before the encoder: a refused port, then a stream key nothing publishes yet, are
    retried with backoff by default and reported as "waiting_for_source" with the reason; the
    stream is captured once it is up. Told not to wait, the same source fails at once."""
    port = servers.free_port()
    events = []
    with CaptureThread(f"rtmp://127.0.0.1:{port}/live/KEY", RingBuffer(2), on_event=events.append) as cap:
        servers.wait_until(lambda: cap.stats["attempts"] >= 3, 10, "3 attempts")
        assert cap.state == "waiting_for_source" and "refused" in cap.state_reason.lower() and cap.alive
        assert "KEY" not in cap.state_reason
    assert [e.kind for e in events] == ["waiting_for_source"], events  # once, not once per attempt
    url = nginx_rtmp.url(stream_key)
    with CaptureThread(url, RingBuffer(2), backoff=Backoff(initial=0.2, max_delay=0.5)) as cap:
        servers.wait_until(lambda: cap.stats["attempts"] >= 1, 10, "a first attempt")
        assert cap.state == "waiting_for_source" and "nothing published yet" in cap.state_reason
        with servers.Publisher(url, size="320x240", fps=15):
            assert cap.wait_ready(20) and cap.state == "running" and cap.state_reason == ""
    t0 = time.monotonic()
    with pytest.raises(CaptureError, match="refused"):
        CaptureThread(f"rtmp://127.0.0.1:{port}/live/k", RingBuffer(2), wait_for_source=False).start().wait_ready(5)
    assert time.monotonic() - t0 < 2


def test_hls_playlist_not_written_yet(tmp_path):
    """An HLS URL that answers 404 (the encoder has not written the playlist yet) is waited for."""
    with servers.HttpDir(tmp_path) as http:
        cap = CaptureThread(http.url("live.m3u8"), RingBuffer(2), backoff=Backoff(initial=0.2, max_delay=0.5)).start()
        try:
            servers.wait_until(lambda: cap.stats["attempts"] >= 2, 10, "2 attempts")
            assert cap.state == "waiting_for_source" and "404" in cap.state_reason, cap.state_reason
            with _hls_encoder(tmp_path):
                assert cap.wait_ready(20), cap.error
        finally:
            assert cap.stop()


def test_files_still_fail_at_once(tmp_path):
    with pytest.raises(CaptureError, match="No such file"):
        CaptureThread(str(tmp_path / "nope.mp4"), RingBuffer(2)).start().wait_ready(5)


# -- HLS that ends or stalls ----------------------------------------------------------------------
def _hls_encoder(folder, seconds: float | None = None, pattern: str = "testsrc2", endlist: bool = True):
    """ffmpeg writing a live HLS playlist of 1 s segments into ``folder`` (``#EXT-X-ENDLIST`` at its
    end when ``endlist``; killed, it writes nothing more: a stalled playlist)."""
    flags = "delete_segments" + ("" if endlist else "+omit_endlist")
    return servers.Publisher(str(folder / "live.m3u8"), size="320x240", fps=15, fmt="hls", duration=seconds,
                             pattern=pattern, extra_out=["-hls_time", "1", "-hls_list_size", "4", "-hls_flags", flags])


def _playlist_up(folder, segments: int = 2) -> bool:
    p = folder / "live.m3u8"
    return p.exists() and p.read_text().count("#EXTINF") >= segments


def test_hls_that_ends_ends_the_source(tmp_path):
    """The encoder closes the playlist (#EXT-X-ENDLIST): the capture ends like a file (source_ended,
    no reconnects, no replayed segment, stream time without a jump)."""
    events = []
    ring = RingBuffer(512)
    with servers.HttpDir(tmp_path) as http, _hls_encoder(tmp_path, seconds=5) as enc:
        servers.wait_until(lambda: _playlist_up(tmp_path), 20, "the playlist")
        cap = CaptureThread(http.url("live.m3u8"), ring, on_event=events.append).start()
        try:
            assert cap.done.wait(30), (events, cap.stats, enc.log_text())
        finally:
            assert cap.stop()
    assert [e.kind for e in events] == ["source_ended"], events
    assert "EXT-X-ENDLIST" in events[0].detail and cap.state == "ended" and cap.error is None
    pts = [f.pts for f in ring.snapshot()]
    assert all(0 < b - a < 0.1 for a, b in zip(pts, pts[1:])), pts  # 15 fps, no jump, no repeat
    assert cap.stats["sessions"] == 1 and pts[-1] < 5.0


def test_hls_that_ends_can_wait_for_a_new_stream(tmp_path):
    """wait_after_end: an ended playlist is polled until an encoder writes a new stream there,
    which is captured from its newest segment; the ended stream is not replayed."""
    events = []
    with servers.HttpDir(tmp_path) as http:
        with _hls_encoder(tmp_path, seconds=3):
            servers.wait_until(lambda: _playlist_up(tmp_path), 20, "the playlist")
            cap = CaptureThread(http.url("live.m3u8"), RingBuffer(2), on_event=events.append, wait_after_end=True,
                                backoff=Backoff(initial=0.2, max_delay=0.5)).start()
            servers.wait_until(lambda: "source_lost" in [e.kind for e in events], 20, "the end")
        try:
            assert cap.state == "lost" and "waiting for a new stream" in cap.state_reason and cap.alive
            frames = cap.stats["frames"]
            with _hls_encoder(tmp_path, pattern="smptebars"):
                servers.wait_until(lambda: "source_back" in [e.kind for e in events], 30, "the new stream")
                servers.wait_until(lambda: cap.stats["frames"] > frames + 15, 10, "a second of the new stream")
        finally:
            assert cap.stop()
    kinds = [e.kind for e in events]
    assert kinds == ["source_lost", "source_back"], events
    assert cap.stats["sessions"] == 2 and cap.stats["replayed_packets"] == 0


@pytest.mark.slow
def test_hls_that_stalls_is_a_lost_source(tmp_path):
    """The encoder dies without closing the playlist: sampling pauses, and once FFmpeg's HLS demuxer
    gives up on new segments the source is lost; reconnects re-read the newest segment, which is
    not captured again; when segments come again, capture resumes."""
    events = []
    ring, clips = RingBuffer(4), ClipQueue(100)
    with servers.HttpDir(tmp_path) as http:
        enc = _hls_encoder(tmp_path, endlist=False).start()
        servers.wait_until(lambda: _playlist_up(tmp_path), 20, "the playlist")
        cap = CaptureThread(http.url("live.m3u8"), ring, on_event=events.append,
                            backoff=Backoff(initial=0.2, max_delay=0.5)).start()
        sampler = LiveSampler(ring, clips, on_event=events.append).start()
        try:
            assert cap.wait_ready(20)
            servers.wait_until(lambda: cap.stats["frames"] >= 30, 10, "2 s of video")
            enc.close()  # SIGKILL: no #EXT-X-ENDLIST, the playlist stays as it was
            servers.wait_until(lambda: "source_lost" in [e.kind for e in events], 15, "the loss")
            assert "sampling_paused" in [e.kind for e in events]
            frames = cap.stats["frames"]  # (the decoder's last frames come out at the end of the session)
            servers.wait_until(lambda: cap.stats["replayed_packets"] > 0 and cap.stats["attempts"] >= 1, 20,
                               "reconnects re-reading the newest segment")
            assert cap.stats["frames"] == frames and cap.state == "lost", cap.stats
            assert "stopped updating" in cap.state_reason
            n_clips = clips.stats()["put"]
            enc = _hls_encoder(tmp_path, endlist=False, pattern="smptebars").start()
            servers.wait_until(lambda: "source_back" in [e.kind for e in events], 30, "new segments")
            servers.wait_until(lambda: clips.stats()["put"] > n_clips, 10, "a clip of the new segments")
        finally:
            assert sampler.stop() and cap.stop()
            enc.close()
    kinds = [e.kind for e in events if e.kind.startswith("source")]
    assert kinds == ["source_lost", "source_back"], events  # one loss, however many reconnects


# -- livecc run ---------------------------------------------------------------------------------
LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def _livecc_run(source: str, tmp_path, *extra: str) -> tuple[subprocess.Popen, int, Path]:
    from pipeline.fixtures.tiny import tiny_checkpoint

    port, log_path = servers.free_port(), tmp_path / "livecc.log"
    cmd = LIVECC + ["run", source, "--model", str(tiny_checkpoint("small")), "--device", "cpu", "--port", str(port),
                    "--status", "plain", "--log-format", "json", "--sink", f"jsonl:{tmp_path / 'o.jsonl'}",
                    "--set", "engine.max_pixels=100352", *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return proc, port, log_path


def _messages(log_path) -> list[str]:
    return [r.get("msg", "") for r in servers.read_jsonl(log_path)]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_livecc_run_started_before_the_encoder(nginx_rtmp, stream_key, tmp_path):
    """``livecc run rtmp://...`` before anything publishes: it waits (the source is tried while the
    model loads; /api/status says "waiting_for_source" and why), captions once the encoder is up,
    and exits 0 on SIGTERM."""
    url = nginx_rtmp.url(stream_key)
    proc, port, log_path = _livecc_run(url, tmp_path)
    try:
        def status():
            code, body = servers.http_get(f"http://127.0.0.1:{port}/api/status", 2)
            return json.loads(body) if code == 200 else None

        servers.wait_until(lambda: (s := status()) and s["capture"]["state"] == "waiting_for_source"
                           or proc.poll() is not None, 60, "waiting for the source")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert "nothing published yet" in status()["capture"]["state_reason"]
        code, body = servers.http_get(f"http://127.0.0.1:{port}/health", 2)
        health = json.loads(body)
        assert code == 503 and health["source"]["state"] == "waiting_for_source", health
        assert "nothing published yet" in health["source"]["reason"]
        # the source is tried while the model loads, so "waiting_for_source" can come before "loaded ..." is logged
        # (a CI run read the log in between): wait for it, then check the order
        servers.wait_until(lambda: any(m.startswith("loaded ") for m in _messages(log_path))
                           or proc.poll() is not None, 60, "the model loaded")
        msgs = _messages(log_path)
        opening = next(i for i, m in enumerate(msgs) if m.startswith("opening rtmp://"))
        loaded = next(i for i, m in enumerate(msgs) if m.startswith("loaded "))
        assert opening < loaded, msgs  # the source was tried while the model loaded
        with servers.Publisher(url, size="320x240", fps=15):
            servers.wait_until(lambda: any(r.get("kind") == "caption" for r in servers.read_jsonl(tmp_path / "o.jsonl"))
                               or proc.poll() is not None, 60, "a caption")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert status()["capture"]["state"] == "running"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        servers.kill(proc)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_livecc_run_ends_with_the_hls_playlist(tmp_path):
    """An HLS stream whose encoder closes the playlist: ``livecc run`` ends by itself, exit 0 (what
    came while the model loaded is skipped, as for any live source: the ring keeps the newest frames)."""
    (tmp_path / "hls").mkdir()
    with servers.HttpDir(tmp_path / "hls") as http, _hls_encoder(tmp_path / "hls", seconds=16):
        servers.wait_until(lambda: _playlist_up(tmp_path / "hls"), 20, "the playlist")
        proc, _, log_path = _livecc_run(http.url("live.m3u8"), tmp_path)
        try:
            assert proc.wait(90) == 0, log_path.read_text()[-3000:]
        finally:
            servers.kill(proc)
    assert any("EXT-X-ENDLIST" in m for m in _messages(log_path)), _messages(log_path)
    caps = [r for r in servers.read_jsonl(tmp_path / "o.jsonl") if r.get("kind") == "caption"]
    stops = [c["stop"] for c in caps]
    assert stops and stops == sorted(stops) and stops[-1] <= 17, stops  # no replayed segment, no stream-time jump


@pytest.mark.timeout(120)
def test_livecc_run_burns_in_a_rotated_file_upright(landscape, tmp_path):
    """The burn-in of a phone video (rotate=90) is portrait and shows what ffmpeg shows."""
    rot = tmp_path / "rot90.mp4"
    subprocess.run([servers.FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-i", str(landscape), "-c", "copy",
                    "-metadata:s:v:0", "rotate=90", str(rot)], check=True)
    out = tmp_path / "out.mp4"
    proc, _, log_path = _livecc_run(str(rot), tmp_path, "--sink", f"burnin:{out}")
    try:
        assert proc.wait(90) == 0, log_path.read_text()[-3000:]
    finally:
        servers.kill(proc)
    v = servers.probe_video(str(out))
    assert (v["width"], v["height"]) == (180, 320) and not v.get("side_data_list"), v
    top = slice(0, 160)  # above the caption box
    diff = np.abs(_shown(out, 180, 320)[top].astype(int) - _shown(rot, 180, 320)[top]).mean()
    assert diff < 12, diff  # x264 at the burn-in's bitrate; sideways would not even have this shape


# -- a raw elementary stream: no timestamps at all ------------------------------------------------
@pytest.fixture(scope="module")
def raw_h264(tmp_path_factory):
    """4 s of 160x120 at 10 fps as a raw H.264 elementary stream (a ``.h264`` file, what a Raspberry
    Pi camera, a drone or ``ffmpeg -f h264`` writes): no container, no pts on any packet or frame."""
    return servers.make_video(tmp_path_factory.mktemp("raw") / "cam.h264", size="160x120", fps=10, seconds=4)


def test_raw_h264_file_is_captioned_on_its_frame_clock(raw_h264):
    """livecc caption: frames without timestamps are timed by their durations (the stream's frame
    rate), so 4 s of video are an opener and one turn, as the same video in an MP4 is (was: every
    frame skipped, 'no frame could be decoded')."""
    frames = list(decode_frames(raw_h264))
    assert len(frames) == 40
    assert [round(f.pts, 6) for f, _ in frames] == [round(i / 10, 6) for i in range(40)]
    clips = list(file_clips(raw_h264))
    assert [(c.start, c.stop) for c in clips] == [(0.0, 3.0), (3.0, 4.0)]


def test_livecc_caption_of_a_raw_h264_file_on_a_terminal(raw_h264, tmp_path):
    """The command on a terminal (a pty: the progress bar runs) for a file whose length is unknown before it is
    read: no bar over a made-up length, and the summary gives the video time captioned (was '0.0 s of video')."""
    import os
    import pty
    import subprocess
    import sys

    from pipeline.fixtures.tiny import tiny_checkpoint

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())",
                             "caption", str(raw_h264), "--model", str(tiny_checkpoint("small")), "--device", "cpu",
                             "--srt", str(tmp_path / "cam.srt")],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(120) == 0, seen[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"captioned 2 turns (4.0 s of video)" in seen, seen[-2000:]
    assert b"Traceback" not in seen


def captured_pts(path) -> tuple[CaptureThread, list[float]]:
    """Run the capture thread over the file ``path`` unpaced to its end: (the stopped thread, every frame's
    stream time in seconds, in order)."""
    seen: list[float] = []

    class Recording(RingBuffer):
        def put(self, frame):
            seen.append(frame.pts)
            super().put(frame)

    cap = CaptureThread(resolve(str(path), pace=False), Recording(4)).start()
    try:
        assert cap.done.wait(20)
    finally:
        assert cap.stop(5)
    return cap, seen


def test_raw_h264_file_plays_at_its_frame_rate_in_the_capture_thread(raw_h264):
    """livecc run: a file without timestamps gets stream time from its frames' durations, not the
    wall clock of decoding (was: 4 s of video as 0.1 s of stream time, paced at decode speed: one turn)."""
    cap, seen = captured_pts(raw_h264)
    assert cap.error is None and cap.state == "ended"
    assert len(seen) == 40
    assert seen == pytest.approx([i / 10 for i in range(40)], abs=1e-6)


def test_raw_h264_file_for_ask(raw_h264):
    """livecc ask / --protocol evaluation: the whole-video read plans 8 frames (2 fps of 4 s), not
    'no video frames'."""
    from pipeline.capture import whole_video

    p = whole_video.plan(raw_h264)
    assert len(p.indices) == 8
    assert whole_video.read_frames(raw_h264, p).shape[0] == 8


# -- a clip cut with stream copy: packets before the cut are in the file, marked discard ----------
def test_stream_copy_cut_for_ask(tmp_path):
    """``ffmpeg -ss 1.5 -i in.mp4 -c copy cut.mp4`` (the usual way to trim a clip) keeps the GOP before
    the cut point and an edit list that hides it: those packets are flagged discard, and the decoder
    drops their frames. The whole-video read (livecc ask, --protocol evaluation) must count and time
    the frames that are shown (was: 60 packets counted, 45 frames decoded: 'only 9 of the 12 planned
    frames could be decoded')."""
    from pipeline.capture import whole_video

    src = servers.make_video(tmp_path / "in.mp4", size="160x120", fps=10, seconds=6, gop=30)
    cut = tmp_path / "cut.mp4"
    subprocess.run([servers.FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-ss", "1.5", "-i", str(src), "-c", "copy",
                    str(cut)], check=True)
    shown = len(list(decode_frames(cut)))
    assert shown == 45
    ends, _, _ = whole_video.frame_end_times(cut)
    assert len(ends) == shown and ends[0] == pytest.approx(0.1) and ends[-1] == pytest.approx(4.5)
    p = whole_video.plan(cut)
    assert whole_video.read_frames(cut, p).shape[0] == len(p.indices) == 8


# -- a text file given as the source --------------------------------------------------------------
def test_text_file_is_not_a_video(tmp_path):
    """FFmpeg's tty demuxer opens any .txt / .nfo / .ans file as a 'video' of the text drawn as ANSI art
    (640x400, 25 fps, as long as the text). A notes or log file given by mistake must be an error,
    not captioned (was: 'livecc caption notes.txt' captioned 51 s of rendered text)."""
    text = tmp_path / "notes.txt"
    text.write_text((ROOT / "README.md").read_text() * 2)
    with pytest.raises(VideoFileError, match="text file"):
        list(file_clips(text))
    with pytest.raises(VideoFileError, match="text file"):
        probe(text)
    events = []
    cap = CaptureThread(resolve(str(text), pace=False), RingBuffer(4), on_event=events.append).start()
    try:
        assert cap.done.wait(20)
    finally:
        assert cap.stop(5)
    assert [e.kind for e in events] == ["source_error"] and "text file" in events[0].detail, events
    assert cap.stats["frames"] == 0


# -- timestamps that jump far forward (concatenated recordings) -----------------------------------
def test_timestamps_jumping_an_hour_forward(tmp_path):
    """Two 3-s MPEG-TS recordings concatenated, the second's timestamps an hour on (``cat a.ts b.ts``
    of an encoder restarted later). livecc caption continues the video after the jump, as the capture
    thread (livecc run) does for a jump over 10 s: 6 s of video are the opener and 3 turns (was: the 90
    frames after the jump taken one per turn, 90 turns labelled 3-93 s for 3 s of video)."""
    a = servers.make_video(tmp_path / "a.ts", size="160x120", fps=30, seconds=3)
    b = servers.make_video(tmp_path / "b.ts", size="160x120", fps=30, seconds=3, extra=["-output_ts_offset", "3600"])
    joined = tmp_path / "joined.ts"
    joined.write_bytes(a.read_bytes() + b.read_bytes())
    frames = [f for f, _ in decode_frames(joined)]
    assert len(frames) == 180 and frames[-1].pts == pytest.approx(179 / 30, abs=1e-3)
    clips = list(file_clips(joined))
    assert [(c.start, c.stop) for c in clips] == [(0.0, 3.0), (3.0, 4.0), (4.0, 5.0), (5.0, 6.0)]
    cap, seen = captured_pts(joined)
    assert seen == pytest.approx([f.pts for f in frames], abs=1e-3)  # livecc run: the same stream time
