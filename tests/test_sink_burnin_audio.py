"""Burn-in audio passthrough with real parts: ffmpeg publishes (with or without a sine track) to
nginx-rtmp -> CaptureThread (demuxes and decodes the audio) -> Dispatcher -> two burn-in sinks, an
MP4 file and an RTMP restream (recorded by nginx) -> ffprobe reads every packet back.
And without a server: frames and audio handed to the dispatcher as a capture thread would after a
slow start (a burst of old frames, then live ones), the sound still lands on its picture.

With audio: both outputs carry h264 + aac, and the audio track spans the video track (start and
duration within 0.5 s); with a once-a-second white flash and 1 kHz beep published together, the
beeps in the output start with the flashes (lip sync). Without audio: no audio stream, the video
as before.
"""

from __future__ import annotations

import json
import subprocess
import time

import av
import numpy as np
import pytest

from pipeline.app import _TeeRing
from pipeline.capture import CaptureThread
from pipeline.fanout.dispatch import Dispatcher
from pipeline.plugins import make_sink
from pipeline.types import AudioChunk, Frame
import servers
from servers import Publisher
from test_sink_burnin import NginxRtmp, free_port, needs_nginx

pytestmark = [pytest.mark.timeout(90)]

FPS = 30
RUN_S = 5.0


@pytest.fixture
def nginx(tmp_path):
    srv = NginxRtmp(tmp_path / "nginx", free_port())
    srv.start()
    yield srv
    srv.stop()


def tracks(path) -> dict[str, dict]:
    """Per codec type: codec name, first pts, and end (last pts + duration), from every packet."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=index,codec_type,codec_name,sample_rate,channels"
         ":packet=stream_index,pts_time,duration_time", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True)
    info = json.loads(out.stdout)
    res = {}
    for st in info["streams"]:
        pk = [p for p in info.get("packets", []) if p["stream_index"] == st["index"] and p.get("pts_time") not in (None, "N/A")]
        starts = [float(p["pts_time"]) for p in pk]
        ends = [float(p["pts_time"]) + float(p.get("duration_time") or 0) for p in pk]
        res[st["codec_type"]] = {"codec": st["codec_name"], "packets": len(pk), "start": min(starts, default=0.0),
                                 "end": max(ends, default=0.0), "sample_rate": st.get("sample_rate"),
                                 "channels": st.get("channels")}
    return res


class FlashBeep(Publisher):
    """A black picture that flashes white for 0.2 s every second, with a 1 kHz beep at the same time."""

    def __init__(self, url: str):
        super().__init__(url)
        self.args = [servers.FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error",
                     "-re", "-f", "lavfi", "-i",
                     f"color=c=black:s=320x240:r={FPS}[bg];color=c=white:s=320x240:r={FPS}[fg];"
                     "[bg][fg]overlay=enable='lt(mod(t,1),0.2)'[out0]",
                     "-re", "-f", "lavfi", "-i", "aevalsrc='if(lt(mod(t,1),0.2),0.8*sin(2*PI*1000*t),0)':s=44100",
                     "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
                     "-g", str(FPS), "-bf", "0", "-c:a", "aac", "-b:a", "64k", "-f", "flv", url]


def onsets(times_on: list[float], min_gap: float = 0.5) -> list[float]:
    """The starts of runs: times more than ``min_gap`` after the previous 'on' time."""
    out, last = [], None
    for t in times_on:
        if last is None or t - last > min_gap:
            out.append(t)
        last = t
    return out


def run_chain(nginx: NginxRtmp, tmp_path, audio: bool, publisher=None):
    """Publish for RUN_S seconds through capture -> dispatcher -> burn-in (MP4 + RTMP)."""
    base = f"rtmp://127.0.0.1:{nginx.port}/live"
    mp4 = tmp_path / "out.mp4"
    sinks = [make_sink(f"burnin:{mp4}", fps=FPS, bitrate="500k"),
             make_sink(f"burnin:{base}/out", fps=FPS, bitrate="500k")]
    d = Dispatcher(sinks)
    d.start()
    assert d.wants_audio
    pub = (publisher or Publisher)(f"{base}/in", **({} if publisher else {"size": "320x240", "fps": FPS, "audio": audio}))
    pub.start()
    cap = None
    try:
        ring = _TeeRing(64, d.frame)
        cap = CaptureThread(f"{base}/in", ring, on_audio=d.audio, wait_for_source=True).start()
        assert cap.wait_ready(20)
        time.sleep(RUN_S)
        status = d.stop(15)  # sinks first: the audio then runs to the end of the video
        cap.stop()
    finally:
        pub.close()
        if cap is not None:
            cap.stop()
    time.sleep(0.3)  # nginx closes the recording when the publisher leaves
    recs = [p for p in nginx.recordings() if p.name.startswith("out")]
    assert len(recs) == 1, recs
    return sinks, status, cap, mp4, recs[0]


@needs_nginx
def test_audio_passed_through_to_mp4_and_rtmp(nginx, tmp_path):
    sinks, status, cap, mp4, rec = run_chain(nginx, tmp_path, audio=True)
    assert cap.stats["audio_chunks"] > 100 and cap.stats["audio_errors"] == 0
    for name, st in status.items():
        assert st["state"] == "stopped" and st["audio"] > 100 and st["audio_dropped"] == 0, (name, st)
    for sink in sinks:
        assert sink.error is None and sink.has_audio, sink.stats()
        assert sink.counters["audio_ok"] > 100 and not sink.counters["audio_errors"], sink.stats()
    for path in (mp4, rec):
        t = tracks(path)
        print(path.name, t)
        v, a = t["video"], t["audio"]
        assert v["codec"] == "h264" and a["codec"] == "aac"
        assert a["sample_rate"] == "48000" and a["channels"] == 2
        v_dur, a_dur = v["end"] - v["start"], a["end"] - a["start"]
        assert v_dur > RUN_S - 0.5, t
        assert abs(a_dur - v_dur) <= 0.5, t
        assert abs(a["start"] - v["start"]) <= 0.5, t


@needs_nginx
def test_no_audio_input_gives_video_only(nginx, tmp_path):
    sinks, status, cap, mp4, rec = run_chain(nginx, tmp_path, audio=False)
    assert cap.stats["audio_chunks"] == 0
    for sink in sinks:
        assert sink.error is None and not sink.has_audio, sink.stats()
        assert sink.counters["ticks_waiting_audio"] > 0 and sink.counters["frames_out"] > RUN_S * FPS - 15
    for path in (mp4, rec):
        t = tracks(path)
        print(path.name, t)
        assert set(t) == {"video"} and t["video"]["codec"] == "h264", t
        assert t["video"]["end"] - t["video"]["start"] > RUN_S - 0.5, t


def lip_sync_skew(mp4) -> list[float]:
    """Seconds from each white flash's first frame (after the first second) to the nearest beep's first loud
    sample in ``mp4``, sorted; > 0: the sound comes after the picture."""
    with av.open(str(mp4)) as c:
        flashes = onsets([f.time for f in c.decode(video=0) if f.to_ndarray(format="gray").mean() > 128])
    with av.open(str(mp4)) as c:
        loud = []
        for f in c.decode(audio=0):
            x = np.abs(f.to_ndarray()).max(axis=0)
            loud += [f.time + i / f.sample_rate for i in np.flatnonzero(x > 0.3)[:1]]
        beeps = onsets(loud)
    print("flashes", flashes, "beeps", beeps)
    assert len(flashes) >= 3 and len(beeps) >= 3
    # the first second may start in the middle of a flash or a beep
    skew = sorted(min(beeps, key=lambda b: abs(b - t)) - t for t in flashes if t >= 0.9)
    print("skew", skew)
    return skew


def in_sync(skew: list[float]) -> bool:
    """Bounds from ITU-R BT.1359 (broadcast lip sync): the median within what viewers cannot detect (sound at
    most 45 ms early, 125 ms late), every flash within what they accept (90 ms early, 185 ms late). The output
    clock samples the video at 30 fps (33 ms a frame)."""
    return -0.045 <= skew[len(skew) // 2] <= 0.125 and all(-0.09 <= d <= 0.185 for d in skew)


@needs_nginx
def test_audio_stays_in_sync_with_the_video(nginx, tmp_path):
    sinks, status, cap, mp4, rec = run_chain(nginx, tmp_path, audio=True, publisher=FlashBeep)
    assert all(sink.has_audio for sink in sinks)
    # a loaded CI run once put the sound 119 ms, then 135 ms late on every flash (alone: 20 ms early): the audio
    # was placed by the frames' arrival offset, inflated by a slow start, and anchored once; the next test
    # reproduces that start
    assert in_sync(lip_sync_skew(mp4))


def test_a_slow_start_does_not_delay_the_sound(tmp_path):
    """As a capture thread delivers after a slow connect: nothing for BURST seconds, then the frames and audio
    of those seconds at once (arrival - pts from BURST down to 0), then live ones as they are made. The sound
    goes where the picture went (the old placement, the median arrival - pts when audio first came, anchored
    once, put it 250 ms late here)."""
    burst, run_s, rate, chunk = 0.6, 6.0, 44100, 1024
    mp4 = tmp_path / "out.mp4"
    sink = make_sink(f"burnin:{mp4}", fps=FPS, bitrate="300k")
    d = Dispatcher([sink])
    d.start()
    white = np.full((48, 64, 3), 255, np.uint8)
    black = np.zeros((48, 64, 3), np.uint8)
    beep = (0.8 * 32767 * np.sin(2 * np.pi * 1000 * np.arange(int(rate * run_s) + chunk) / rate)).astype(np.int16)

    def audio_at(i: int):
        t = (i * chunk + np.arange(chunk)) / rate
        a = av.AudioFrame.from_ndarray(np.where(np.mod(t, 1) < 0.2, beep[i * chunk:(i + 1) * chunk], 0)[None],
                                       format="s16", layout="mono")
        a.sample_rate = rate
        return AudioChunk(a, i * chunk / rate)

    made = sorted([(n / FPS, "v", n) for n in range(int(run_s * FPS))]
                  + [(i * chunk / rate, "a", i) for i in range(int(run_s * rate / chunk))])
    t0 = time.monotonic()
    try:
        for pts, kind, i in made:
            wait = t0 + max(pts, burst) - time.monotonic()  # made at t0 + pts, nothing before t0 + burst
            if wait > 0:
                time.sleep(wait)
            if kind == "v":
                d.frame(Frame(white if pts % 1 < 0.2 else black, pts, index=i))
            else:
                d.audio(audio_at(i))
    finally:
        d.stop(15)
    assert sink.error is None and sink.has_audio, sink.stats()
    assert in_sync(lip_sync_skew(mp4))


@needs_nginx
def test_livecc_run_passes_audio_through(nginx, tmp_path):
    """The app wiring: ``livecc run`` (tiny model on CPU) with a burn-in MP4 of an input with audio."""
    import os
    import signal
    import sys

    from pipeline.fixtures.tiny import tiny_checkpoint

    model = tiny_checkpoint("small")
    src = f"rtmp://127.0.0.1:{nginx.port}/live/in"
    mp4 = tmp_path / "live.mp4"
    pub = Publisher(src, size="320x240", fps=FPS, audio=True).start()
    log = open(tmp_path / "livecc.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())", "run", src,
         "--model", str(model), "--device", "cpu", "--seed", "0", "--status", "plain", "--sink", f"burnin:{mp4}",
         "--set", "sinks[0].bitrate=500k", "--set", "capture.wait_for_source=true",
         "--set", "engine.max_pixels=100352"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        servers.wait_until(lambda: mp4.exists() or proc.poll() is not None, 60, "the burn-in output")
        assert proc.poll() is None, (tmp_path / "livecc.log").read_text()[-3000:]
        time.sleep(6)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "livecc.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pub.close()
        log.close()
    t = tracks(mp4)
    print(t)
    v, a = t["video"], t["audio"]
    assert v["codec"] == "h264" and a["codec"] == "aac"
    assert v["end"] - v["start"] > 5 and abs((a["end"] - a["start"]) - (v["end"] - v["start"])) <= 0.5, t


def test_the_audio_write_head_follows_where_chunks_belong(tmp_path):
    """``Output.write_audio`` with 1024-sample chunks at 48 kHz (21.3 ms): contiguous within 45 ms of where
    they belong; more than that later: a gap (anchored); more than that earlier (the picture's offset shrank):
    chunks dropped until the head is back within half a chunk, then contiguous again. ffprobe reads the track."""
    from plugins.sinks.burnin import BurninSettings
    from plugins.sinks.burnin.output import Output

    out = Output(BurninSettings(output=str(tmp_path / "a.mp4")), 64, 48, "libx264", audio=True)
    n = 1024
    silence = np.zeros((1, n), np.int16)

    def write(start_s):
        a = av.AudioFrame.from_ndarray(silence, format="s16", layout="mono")
        a.sample_rate = 48000
        return out.write_audio(a, start_s)

    dur = n / 48000
    got = [write(1.0)] + [write(1.0 + k * dur + 0.01) for k in (1, 2)]  # 10 ms jitter: contiguous
    assert got == ["anchored", "ok", "ok"]
    assert out.a_in_next == 48000 + 3 * n
    got = [write(1.0 + 3 * dur + 0.06)]  # 60 ms later than the head: a gap
    assert got == ["anchored"] and out.a_in_next == round((1.0 + 3 * dur + 0.06) * 48000) + n
    head = out.a_in_next / 48000
    # the source's offset shrinks by 100 ms: the chunks that belong before the head are dropped
    starts = [head - 0.1 + k * dur for k in range(8)]
    got = [write(s) for s in starts]
    back = got.index("ok")
    assert got[:back] == ["late"] * back and set(got[back:]) == {"ok"}, got
    assert abs(starts[back] - head) <= dur / 2  # back in place within half a chunk
    for k in range(int(0.5 / dur)):  # half a second more so the file has a track to read
        write(starts[-1] + (k + 1) * dur)
    out.close()
    info = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries", "stream=codec_name",
                           "-of", "csv=p=0", str(tmp_path / "a.mp4")], capture_output=True, text=True, check=True)
    assert info.stdout.strip() == "aac"
