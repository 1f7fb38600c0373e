"""Offline clips follow the reference's frame rule; bad files give one clear error."""

import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline.capture.frames import smart_resize
from pipeline.capture.files import VideoFileError, file_clips, probe


def clock_video(path, fps, seconds, w=320, h=240):
    """Each frame's index is written into its pixels (grey levels 4 apart: colour conversion may round by 1)."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        s.options = {"qp": "0", "preset": "ultrafast"}
        for i in range(int(round(seconds * fps))):
            img = np.zeros((h, w, 3), np.uint8)
            img[:, : w // 2] = (i % 64) * 4 + 2
            img[:, w // 2:] = (i // 64) * 16 + 8
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def frame_index(img):
    h, w, _ = img.shape
    lo = int(float(img[h // 2, w // 4 - 10: w // 4 + 10, 1].mean()) // 4)
    hi = int(float(img[h // 2, 3 * w // 4 - 10: 3 * w // 4 + 10, 1].mean()) // 16)
    return hi * 64 + lo


def expected_indices(fps, n_frames):
    """The reference's rule, written out: frame end times (i+1)/fps; first frame with end >= t."""
    ends = [(i + 1) / fps for i in range(n_frames)]
    turns, nxt, grid, n = [], 0, 0.0, 6
    while True:
        idxs, times = [], [grid + k * 0.5 for k in range(n)]
        j = nxt
        for t in times:
            if t >= ends[-1]:
                break
            while ends[j] < t:
                j += 1
            idxs.append(j)
        idxs = idxs[: len(idxs) - len(idxs) % 2]
        if not idxs:
            return turns
        turns.append((times[: len(idxs)], idxs))
        nxt, grid, n = idxs[-1] + 1, times[len(idxs) - 1] + 0.5, 2


@pytest.mark.parametrize("fps", [30, 25, 29.97])
def test_frames_follow_the_reference_rule(tmp_path, fps):
    path = clock_video(tmp_path / "clock.mp4", fps, 8)
    n = int(round(8 * fps))
    clips = list(file_clips(path))
    want = expected_indices(fps, n)
    assert len(clips) == len(want) == 6  # opener (0-3 s) + 5 one-second turns
    for clip, (times, idxs) in zip(clips, want):
        assert clip.timestamps == tuple(times)
        assert [frame_index(f) for f in clip.frames] == idxs
        assert clip.frames.shape[1:3] == smart_resize(240, 320)


def test_turn_timestamps_and_sizes(tmp_path):
    path = clock_video(tmp_path / "hd.mp4", 30, 5, w=1280, h=720)
    clips = list(file_clips(path))
    assert [(c.start, c.stop) for c in clips] == [(0.0, 3.0), (3.0, 4.0), (4.0, 5.0)]
    assert clips[0].frames.shape == (6, 392, 728, 3)  # 720p -> 392x728 at max_pixels=384*28*28
    assert probe(path) == pytest.approx((5.0, 30.0), rel=1e-3)


def test_one_frame_per_second(tmp_path):
    """sampler.fps 1 with a 4-frame opener: grid times 1 s apart and every stop (Time=a-b) 1 s after the last frame."""
    path = clock_video(tmp_path / "slow.mp4", 10, 8)
    clips = list(file_clips(path, fps=1, opener_frames=4, turn_frames=2))
    assert [c.timestamps for c in clips] == [(0.0, 1.0, 2.0, 3.0), (4.0, 5.0), (6.0, 7.0)]
    assert [(c.start, c.stop, c.interval) for c in clips] == [(0.0, 4.0, 1.0), (4.0, 6.0, 1.0), (6.0, 8.0, 1.0)]
    assert [frame_index(f) for f in clips[0].frames] == [0, 9, 19, 29]  # the first frame ending at or after t
    with pytest.raises(ValueError, match="even"):
        list(file_clips(path, opener_frames=3))


def test_missing_empty_and_not_video(tmp_path):
    with pytest.raises(VideoFileError, match="no such file"):
        list(file_clips(tmp_path / "nope.mp4"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoFileError, match="empty"):
        list(file_clips(tmp_path / "empty.mp4"))
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 100)
    with pytest.raises(VideoFileError, match="not a readable video"):
        list(file_clips(tmp_path / "text.mp4"))


def test_audio_only_file(tmp_path):
    path = tmp_path / "tone.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=2", str(path)],
                   check=True)
    with pytest.raises(VideoFileError, match="no video stream"):
        list(file_clips(path))


def test_truncated_file_keeps_what_decodes(tmp_path):
    path = clock_video(tmp_path / "full.mp4", 30, 6)
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-c", "copy", str(cut)], check=True)
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) * 2 // 3])
    clips = list(file_clips(cut))
    assert 1 <= len(clips) < 4
    assert data  # the source itself is intact


def test_cli_errors_are_one_line(tmp_path):
    for args, msg in ([["caption", str(tmp_path / "x.mp4"), "--model", str(tmp_path)], "no such file"],):
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True)
        assert r.returncode == 2
        assert msg in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_smart_resize_equals_qwen_vl_utils():
    """capture/frames.py keeps its own copy of smart_resize (qwen-vl-utils imports torchvision, which
    the pipeline does not need); it must give the reference's sizes. Needs qwen-vl-utils + torchvision."""
    qvu = pytest.importorskip("qwen_vl_utils", reason="qwen-vl-utils (and the torchvision it imports) not installed")
    sizes = [(h, w) for h in range(28, 2200, 37) for w in range(28, 4000, 53)] + [(1080, 1920), (720, 1280), (29, 5000)]
    assert all(smart_resize(h, w) == tuple(qvu.smart_resize(h, w, 28, min_pixels=100 * 28 * 28, max_pixels=384 * 28 * 28))
               for h, w in sizes)
