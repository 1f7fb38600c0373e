"""Burn-in sink against real outputs: nginx-rtmp (read back with ffprobe and PyAV), MP4, HLS."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.plugins import make_sink
from pipeline.types import Caption, Frame
from plugins.sinks.burnin import BurninSettings, CaptionRenderer

W, H, FPS = 320, 240, 30
RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"
needs_nginx = pytest.mark.skipif(
    not (shutil.which("nginx") and os.path.exists(RTMP_MODULE)), reason="nginx + libnginx-mod-rtmp not installed"
)


# --- helpers (nginx-rtmp started by the test; no shared fixture existed when written) ------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


class NginxRtmp:
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        (root / "rec").mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        self.conf = root / "nginx.conf"
        self.conf.write_text(
            f"""
load_module {RTMP_MODULE};
daemon off;
master_process off;
pid {root}/nginx.pid;
error_log {root}/logs/error.log info;
events {{ worker_connections 64; }}
rtmp {{
  server {{
    listen 127.0.0.1:{port};
    chunk_size 4096;
    application live {{
      live on;
      record all;
      record_path {root}/rec;
      record_unique on;
    }}
  }}
}}
"""
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["nginx", "-p", str(self.root), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def recordings(self) -> list[Path]:
        return sorted((self.root / "rec").glob("*.flv"), key=lambda p: p.stat().st_mtime)


@pytest.fixture
def nginx(tmp_path):
    srv = NginxRtmp(tmp_path / "nginx", free_port())
    srv.start()
    yield srv
    srv.stop()


def source_image(i: int) -> np.ndarray:
    """Grey frame with a white square moving along the top; the bottom half stays plain grey."""
    img = np.full((H, W, 3), 128, np.uint8)
    x = (i * 4) % (W - 32)
    img[10:42, x : x + 32] = 255
    return img


class Feeder(threading.Thread):
    """Synthetic 30 fps input, as the capture thread would deliver it."""

    def __init__(self, sink, seconds: float) -> None:
        super().__init__(daemon=True)
        self.sink, self.seconds = sink, seconds

    def run(self) -> None:
        t0 = time.monotonic()
        i = 0
        while (t := time.monotonic() - t0) < self.seconds:
            self.sink.on_frame(Frame(source_image(i), i / FPS, index=i))
            i += 1
            time.sleep(max(0.0, t0 + i / FPS - time.monotonic()))


def ffprobe(path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
         "stream=codec_name,r_frame_rate,avg_frame_rate,width,height,nb_read_frames:format=duration,format_name",
         "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def caption_region_diff(img: np.ndarray) -> float:
    """Mean abs difference from the source in the bottom third, where the caption box goes."""
    return float(np.abs(img[H * 2 // 3 :].astype(np.int16) - 128).mean())


# --- tests -----------------------------------------------------------------------------
def test_renderer_wraps_unicode_inside_the_frame():
    r = CaptionRenderer(BurninSettings(max_lines=2))
    y0, x0, premul, inv = r.render("Ünïcödé façade — " + "wörd " * 40, W, H)
    assert premul.shape[1] <= W * 0.9 + 1 and y0 + premul.shape[0] <= H
    assert 0 < inv.min() < 1 or inv.min() == 0  # box and glyphs
    font = r.chain(max(12, round(H / 18)))
    lines = r.wrap("Ünïcödé façade — " + "wörd " * 40, font, W * 0.9)
    assert all(font.length(line) <= W * 0.9 for line in lines)
    assert r.render("   ", W, H) is None


@needs_nginx
def test_burnin_to_rtmp_plays_with_caption_then_expiry(nginx):
    url = f"rtmp://127.0.0.1:{nginx.port}/live/test"
    sink = make_sink(f"burnin:{url}", fps=FPS, ttl_s=1.5, bitrate="800k", gop_s=1.0)
    sink.start()
    feeder = Feeder(sink, 2.6)  # input stops at 2.6 s; the output must keep going
    feeder.start()
    while sink.t0 is None:
        time.sleep(0.01)
    t0 = sink.t0
    time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))
    shown_at = time.monotonic() - t0
    sink.on_caption(Caption(0.5, 1.0, "GOAL! Ünïcödé caption"))
    time.sleep(0.5)
    sink.on_caption(Caption(1.0, 1.5, " ..."))  # silence keeps the caption until expiry
    # meanwhile a viewer plays the live stream
    live = av.open(url, options={"analyzeduration": "500000", "rw_timeout": "5000000"})
    vs = live.streams.video[0]
    got = [f for _, f in zip(range(20), live.decode(vs))]
    live.close()
    assert len(got) == 20 and (got[0].width, got[0].height) == (W, H)
    assert vs.average_rate == FPS or vs.guessed_rate == FPS
    feeder.join()
    time.sleep(max(0.0, t0 + 4.5 - time.monotonic()))
    sink.stop()
    assert sink.error is None and sink.counters["reconnects"] == 0
    time.sleep(0.3)  # nginx closes the recording when the publisher leaves
    rec = nginx.recordings()
    assert len(rec) == 1
    info = ffprobe(rec[0])
    st = info["streams"][0]
    assert st["codec_name"] == "h264" and st["r_frame_rate"] == "30/1"
    duration = float(info["format"]["duration"])
    assert 4.2 <= duration <= 4.8, duration  # the whole run, including 1.9 s with no input
    assert abs(int(st["nb_read_frames"]) - duration * FPS) <= 3
    # decode the recording: caption region vs the (plain grey) source
    with av.open(str(rec[0])) as c:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    t_first = frames[0][0]
    diffs = [(t - t_first, caption_region_diff(img)) for t, img in frames]
    during = [d for t, d in diffs if shown_at + 0.2 <= t <= shown_at + 1.3]
    before = [d for t, d in diffs if t <= shown_at - 0.2]
    after = [d for t, d in diffs if t >= shown_at + 1.5 + 0.3]
    assert during and before and after
    assert min(during) > 8, during[:5]
    assert max(before) < 3 and max(after) < 3, (max(before), max(after))
    # after the input stopped, the last frame repeats: the top (moving square) is frozen
    tail = [img for t, img in frames if t - t_first >= 3.0]
    assert len(tail) > 30 and all(np.abs(tail[0][:60].astype(int) - x[:60]).mean() < 2 for x in tail)
    assert sink.counters["repeated"] > 30


@needs_nginx
def test_burnin_rtmp_reconnects_after_server_restart(nginx):
    url = f"rtmp://127.0.0.1:{nginx.port}/live/test"
    sink = make_sink(f"burnin:{url}", fps=FPS, bitrate="500k", reconnect_initial_s=0.3, reconnect_max_s=1.0)
    sink.start()
    feeder = Feeder(sink, 6.0)
    feeder.start()
    time.sleep(1.5)
    nginx.stop()
    time.sleep(1.0)
    nginx.start()
    deadline = time.monotonic() + 8
    while sink.counters["reconnects"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sink.counters["reconnects"] >= 1
    out_before = sink.counters["frames_out"]
    time.sleep(1.5)
    feeder.join()
    sink.stop()
    assert sink.counters["frames_out"] - out_before > 30  # frames flow again after the restart
    time.sleep(0.3)
    rec = nginx.recordings()
    info = ffprobe(rec[-1])
    assert info["streams"][0]["codec_name"] == "h264" and float(info["format"]["duration"]) > 1.0


def test_an_output_down_for_hours_does_not_flood_the_log(caplog):
    """A restream whose RTMP server stays down (a real refused port) is retried forever, every
    ``reconnect_max_s`` (10 s: 8,640 attempts a day). The log gets a warning for the first attempts, then one a
    minute with the count, not one per attempt; the status counts every attempt."""
    import logging

    url = f"rtmp://127.0.0.1:{free_port()}/live/down"
    sink = make_sink(f"burnin:{url}", fps=FPS, reconnect_initial_s=0.0, reconnect_max_s=0.0)
    with caplog.at_level(logging.WARNING, logger="plugins.sinks.burnin.sink"):
        sink.start()
        try:
            sink.on_frame(Frame(source_image(0), 0.0, index=0))
            deadline = time.monotonic() + 20
            while sink.counters["opens"] < 60 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            sink.stop()
    assert sink.counters["opens"] >= 60 and sink.counters["reconnects"] == 0
    lines = [r for r in caplog.records if r.name == "plugins.sinks.burnin.sink" and "not reachable" in r.getMessage()]
    assert 1 <= len(lines) <= 10, f"{len(lines)} warning lines for {sink.counters['opens']} attempts"


def test_burnin_to_mp4_finalised_on_stop(tmp_path):
    path = tmp_path / "out.mp4"
    sink = make_sink(f"burnin:{path}", fps=FPS, ttl_s=10)
    sink.start()
    feeder = Feeder(sink, 2.0)
    feeder.start()
    time.sleep(0.5)
    sink.on_caption(Caption(0, 1, "written into the file"))
    feeder.join()
    sink.stop()
    info = ffprobe(path)
    assert "mp4" in info["format"]["format_name"]
    assert 1.8 <= float(info["format"]["duration"]) <= 2.3
    assert info["streams"][0]["r_frame_rate"] == "30/1"
    with av.open(str(path)) as c:
        last = None
        for f in c.decode(video=0):
            last = f.to_ndarray(format="rgb24")
    assert caption_region_diff(last) > 8  # ttl 10 s: still captioned at the end


def test_burnin_to_hls_folder(tmp_path):
    folder = tmp_path / "hls"
    sink = make_sink({"burnin": {"output": f"{folder}/", "hls_time": 1.0, "width": 256, "height": 144, "fps": 15}})
    sink.start()  # no input at all: black frames at the configured size
    time.sleep(2.5)
    sink.stop()
    playlist = folder / "index.m3u8"
    assert playlist.exists() and list(folder.glob("*.ts"))
    with av.open(str(playlist)) as c:
        frames = [f for _, f in zip(range(10), c.decode(video=0))]
    assert len(frames) == 10 and frames[0].width == 256


@pytest.mark.skipif(not shutil.which("ffmpeg"), reason="system ffmpeg (with libsrt) not installed")
def test_burnin_to_srt_through_ffmpeg_relay(tmp_path):
    port = free_port()
    out = tmp_path / "srt.ts"
    rx = subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-analyzeduration", "500000",
         "-i", f"srt://127.0.0.1:{port}?mode=listener", "-c", "copy", "-f", "mpegts", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        sink = make_sink(f"burnin:srt://127.0.0.1:{port}?mode=caller", fps=FPS, bitrate="500k")
        sink.start()
        feeder = Feeder(sink, 4.0)
        feeder.start()
        feeder.join()
        sink.stop()
        assert sink.error is None and sink.counters["frames_out"] >= 4 * FPS - 3
        rx.wait(10)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    info = ffprobe(out)
    st = info["streams"][0]
    # the listening ffmpeg misses the first second or so while it probes; the rest arrives
    assert st["codec_name"] == "h264" and st["r_frame_rate"] == "30/1" and (st["width"], st["height"]) == (W, H)
    assert float(info["format"]["duration"]) >= 0.5


def test_delay_lines_captions_up_with_their_frames(tmp_path):
    """With delay_s, a caption about stream time T appears with the frame of pts T, not earlier."""
    path = tmp_path / "delay.mp4"
    sink = make_sink(f"burnin:{path}", fps=FPS, delay_s=1.0, ttl_s=10)
    sink.start()
    feeder = Feeder(sink, 3.5)
    t_start = time.monotonic()
    feeder.start()
    # produced 1.3 s into the input, about the frames of pts 1.2..: shown when those are shown
    time.sleep(max(0.0, t_start + 1.3 - time.monotonic()))
    sink.on_caption(Caption(1.2, 1.7, "delayed caption"))
    feeder.join()
    time.sleep(1.0)
    sink.stop()
    with av.open(str(path)) as c:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    # output time 0 is input pts 0 (the first frame, shown 1 s after it arrived)
    first_captioned = min(t for t, img in frames if caption_region_diff(img) > 8)
    assert 1.1 <= first_captioned <= 1.45, first_captioned  # pts 1.2, not 0.3 (its production)


KILLED_WRITER = """
import sys, time, numpy as np
from pipeline.plugins import make_sink
from pipeline.types import Frame
sink = make_sink(sys.argv[1], fps=30, gop_s=0.5)  # fragmented MP4 is the default
sink.start()
img = np.full((96, 160, 3), 100, np.uint8)
i = 0
t0 = time.monotonic()
while True:
    sink.on_frame(Frame(img, i / 30, index=i))
    i += 1
    if i == 60:
        print("ready", flush=True)
    time.sleep(max(0.0, t0 + i / 30 - time.monotonic()))
"""


def test_fragmented_mp4_survives_sigkill(tmp_path):
    path = tmp_path / "killed.mp4"
    proc = subprocess.Popen([os.sys.executable, "-c", KILLED_WRITER, f"burnin:{path}"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait(10)
    info = ffprobe(path)
    assert info["streams"][0]["codec_name"] == "h264" and int(info["streams"][0]["nb_read_frames"]) >= 30


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs (needs root and mount); unmounted afterwards."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def feed_through_a_full_disk(sink, disk, seconds: float, fill_at: int, free_at: int):
    """Frames of incompressible noise (and a caption every 8) through a ``Dispatcher`` to ``sink`` for ``seconds``
    at FPS; at frame ``fill_at`` a ballast file fills ``disk``, at ``free_at`` the status is taken and the ballast
    removed. Returns (the sink's status while full, its final status)."""
    from pipeline.backoff import Backoff
    from pipeline.fanout.dispatch import Dispatcher

    d = Dispatcher([sink], retry=Backoff(initial=0.01, max_attempts=2))
    d.start()
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(8)]  # incompressible
    ballast = disk / ".ballast"
    full_status = None
    t0, i = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        d.frame(Frame(noise[i % 8], i / FPS, index=i))
        if i % 8 == 0:
            d.caption(Caption(i / FPS, i / FPS + 0.2, f"caption {i}"))
        if i == fill_at:
            with open(ballast, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
        if i == free_at:
            full_status = d.status()[sink.name]
            ballast.unlink()
        i += 1
        time.sleep(max(0.0, t0 + i / FPS - time.monotonic()))
    return full_status, d.stop(10)[sink.name]


def test_a_full_disk_leaves_a_playable_mp4_and_the_stream_goes_on_in_a_new_one(small_disk):
    """A burn-in MP4 on a disk that fills up mid-run (a real 2 MiB tmpfs), then gets space back. Before: the encoder
    stopped for good at the first failed write (the file played up to its last fragment, nothing after). Now the
    full file is closed as it is (it plays), the sink is ``failed`` with ``No space left on device`` while it lasts
    and at the end (``livecc run`` exits 1: video was lost), and once space returns the stream goes on in
    ``full.1.mp4``, which plays too."""
    path = small_disk / "full.mp4"
    sink = make_sink({"burnin": {"output": str(path), "fps": FPS, "gop_s": 0.5, "bitrate": "2M", "audio": False,
                                 "reconnect_initial_s": 0.2, "reconnect_max_s": 0.5}})
    # 0.5 s in: fill what the video has not filled yet; 2.5 s in: the status while full, then space back
    full_status, final = feed_through_a_full_disk(sink, small_disk, 6.0, fill_at=15, free_at=75)
    assert full_status["state"] == "failed" and "No space left" in (full_status["last_error"] or ""), full_status
    assert final["state"] == "failed" and "No space left" in (final["last_error"] or ""), final
    assert sink.error is None  # the encoder went on
    assert int(ffprobe(path)["streams"][0]["nb_read_frames"]) >= 5  # up to its last complete fragment
    second = small_disk / "full.1.mp4"
    assert second.exists(), sorted(p.name for p in small_disk.iterdir())
    assert int(ffprobe(second)["streams"][0]["nb_read_frames"]) >= 15  # written after space returned
    assert sink.counters["outputs_started_after_full_disk"] == 1


def test_a_second_run_does_not_overwrite_an_earlier_mp4(tmp_path):
    """existing: new (the default for files): the first run's MP4 stays as it was; the second writes out.1.mp4."""
    path = tmp_path / "out.mp4"
    for _ in range(2):
        sink = make_sink(f"burnin:{path}", fps=FPS)
        sink.start()
        feeder = Feeder(sink, 1.0)
        feeder.start()
        feeder.join()
        sink.stop()
    first = path.read_bytes()
    assert 0.8 <= float(ffprobe(path)["format"]["duration"]) <= 1.3
    second = tmp_path / "out.1.mp4"
    assert second.exists() and 0.8 <= float(ffprobe(second)["format"]["duration"]) <= 1.3
    assert path.read_bytes() == first
    sink = make_sink(f"burnin:{path}", fps=FPS, existing="overwrite")
    sink.start()
    sink.stop()
    assert not (tmp_path / "out.2.mp4").exists()


@pytest.mark.parametrize("ext", ["ts", "flv", "mkv"])
def test_a_second_run_does_not_overwrite_an_earlier_file_of_any_container(tmp_path, ext):
    """Not only MP4: a second run to ``out.ts`` / ``out.flv`` (muxers also used for network outputs) leaves the
    first run's file as it was and writes ``out.1.EXT``."""
    path = tmp_path / f"out.{ext}"
    for _ in range(2):
        sink = make_sink(f"burnin:{path}", fps=FPS, audio=False)
        sink.start()
        feeder = Feeder(sink, 1.0)
        feeder.start()
        feeder.join()
        sink.stop()
    second = tmp_path / f"out.1.{ext}"
    assert second.exists(), sorted(p.name for p in tmp_path.iterdir())
    for p in (path, second):
        assert 0.6 <= float(ffprobe(p)["format"]["duration"]) <= 1.5


def test_two_runs_at_once_write_two_files(tmp_path):
    """A second run's burn-in started while the first's is running with the same output (the first's file is
    still empty: no frame yet) writes ``out.1.mp4``; both files play, each with its own run's video."""
    path = tmp_path / "out.mp4"
    first, second = make_sink(f"burnin:{path}", fps=FPS, audio=False), make_sink(f"burnin:{path}", fps=FPS, audio=False)
    first.start()
    second.start()
    feeders = [Feeder(first, 1.0), Feeder(second, 2.0)]
    for f in feeders:
        f.start()
    feeders[0].join()
    first.stop()
    feeders[1].join()
    second.stop()
    assert second.describe().endswith("out.1.mp4"), second.describe()
    assert 0.6 <= float(ffprobe(path)["format"]["duration"]) <= 1.5
    assert 1.6 <= float(ffprobe(tmp_path / "out.1.mp4")["format"]["duration"]) <= 2.5


@pytest.mark.parametrize("kind", ["mp4", "plain-mp4", "hls"])
def test_output_folder_deleted_while_running_is_written_again(tmp_path, kind, caplog):
    """The folder holding the burn-in output removed under a running sink (``rm -rf``, a cleanup job). Before: an
    MP4 went on into the deleted inode (nothing at the path, status ``stopped``, no word: every later frame lost);
    an HLS encoder died at its next segment (the stream over for the rest of the run). Now the sink says so (one
    warning, counted in ``outputs_deleted``), makes the folder again and writes a new output at the same path,
    which ffprobe reads with the frames after the deletion."""
    import logging

    folder = tmp_path / "out"
    settings = {"fps": FPS, "gop_s": 0.5, "audio": False}
    if kind == "hls":
        sink = make_sink({"burnin": {"output": f"{folder}/hls/", "hls_time": 0.5, **settings}})
        probe = folder / "hls" / "index.m3u8"
    else:
        sink = make_sink(f"burnin:{folder / 'b.mp4'}", fragmented_mp4=kind == "mp4", **settings)
        probe = folder / "b.mp4"
    with caplog.at_level(logging.WARNING, logger="plugins.sinks.burnin.sink"):
        sink.start()
        feeder = Feeder(sink, 3.0)
        feeder.start()
        time.sleep(1.0)
        shutil.rmtree(folder)
        feeder.join()
        sink.stop()  # raises when the encoder died
    assert sink.error is None and sink.counters["outputs_deleted"] == 1, (sink.error, sink.stats())
    warnings = [r.getMessage() for r in caplog.records if "deleted" in r.getMessage()]
    assert len(warnings) == 1, warnings
    frames = int(ffprobe(probe)["streams"][0]["nb_read_frames"])
    assert frames >= 15, frames  # the ~2 s after the deletion (HLS: the last segments of its window)


def test_hls_on_a_full_disk_counts_the_loss_and_goes_on(small_disk):
    """An HLS output on a disk that fills up mid-run (a real 2 MiB tmpfs), then gets space back. Before: the HLS
    muxer ignores its write errors: segments written empty or cut short, the sink ``ok`` and then ``stopped``,
    exit 0, no word. Now the failed writes are counted: the sink is ``failed`` with ``No space left on device``
    while it lasts and at the end (``livecc run`` exits 1); the stream goes on once space returns and its playlist
    plays (ffprobe)."""
    sink = make_sink({"burnin": {"output": f"{small_disk}/hls/", "hls_time": 0.5, "fps": FPS, "gop_s": 0.5,
                                 "bitrate": "1M", "audio": False}})
    # 1 s in: fill the disk; 2.5 s in: the status while full, then space back
    full_status, final = feed_through_a_full_disk(sink, small_disk, 4.5, fill_at=30, free_at=75)
    assert full_status["state"] == "failed" and "No space left" in (full_status["last_error"] or ""), full_status
    assert final["state"] == "failed" and "No space left" in (final["last_error"] or ""), final
    assert sink.error is None  # the encoder went on: a full disk for a while does not end the stream
    frames = int(ffprobe(small_disk / "hls" / "index.m3u8")["streams"][0]["nb_read_frames"])
    assert frames >= 30, frames  # the segments written after space returned play


#: An HLS burn-in in its own process (another user when the test runs as root, for whom permissions do not count):
#: frames for ``seconds``; "ready" after 1 s, then waits for a line on stdin; prints its outcome as JSON.
HLS_WRITER = """
import json, sys, time, numpy as np
from pipeline.plugins import make_sink
from pipeline.types import Frame
sink = make_sink({"burnin": {"output": sys.argv[1] + "/", "hls_time": 0.5, "fps": 30, "gop_s": 0.5, "audio": False}})
sink.start()
img = np.full((96, 160, 3), 100, np.uint8)
t0, i = time.monotonic(), 0
while time.monotonic() - t0 < 4.0:
    sink.on_frame(Frame(img, i / 30, index=i))
    i += 1
    if i == 30:
        print("ready", flush=True)
    if i in (30, 75):
        sys.stdin.readline()
    time.sleep(max(0.0, t0 + i / 30 - time.monotonic()))
error = None
try:
    sink.stop()
except Exception as e:
    error = str(e)
print(json.dumps({"stop_error": error, "encoder_error": repr(sink.error) if sink.error else None,
                  "write_errors": sink.counters["write_errors"]}), flush=True)
"""


def test_hls_folder_made_read_only_counts_the_loss_and_goes_on(tmp_path):
    """The HLS folder made read-only (``chmod 555``) under a running burn-in, then writable again. Before: the
    encoder died at its next segment (the stream over for the rest of the run). Now the segments it cannot create
    are counted (``write_errors``), ``stop`` reports the loss (the sink ends ``failed``), no traceback is printed,
    and the stream goes on in the folder once it can write there again (its playlist plays)."""
    import tempfile

    root = os.geteuid() == 0
    if root and not shutil.which("setpriv"):
        pytest.skip("running as root (chmod does not stop root's writes) and no setpriv to run the writer as another user")
    base = Path(tempfile.mkdtemp(prefix="livecc-ro-"))  # not under pytest's 0700 tmp: the other user must reach it
    folder = base / "hls"
    folder.mkdir()
    try:
        cmd = [os.sys.executable, "-c", HLS_WRITER, str(folder)]
        if root:
            os.chmod(base, 0o755)
            os.chown(folder, 65534, 65534)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
            if subprocess.run([*cmd[:4], os.sys.executable, "-c", "import av"], capture_output=True).returncode:
                pytest.skip("running as root, and this Python cannot be run as another user (nobody)")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parent.parent,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        try:
            assert proc.stdout.readline().strip() == "ready"
            os.chmod(folder, 0o555)
            proc.stdin.write("\n")
            proc.stdin.flush()
            time.sleep(1.5)  # a few segments' time with the folder read-only
            os.chmod(folder, 0o755)
            proc.stdin.write("\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait(10)
        result = json.loads(out.splitlines()[-1])
        assert result["encoder_error"] is None, (result, err[-2000:])  # the stream went on
        assert result["write_errors"] > 0 and "Permission denied" in (result["stop_error"] or ""), result
        assert "Traceback" not in err, err[-3000:]
        frames = int(ffprobe(folder / "index.m3u8")["streams"][0]["nb_read_frames"])
        assert frames >= 15, frames  # written after the folder could be written again
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(base, ignore_errors=True)
