"""Clips from a recorded video, chosen exactly as LiveCC's reference loop chooses them.

Grid times run 0, 1/fps, 2/fps, ... (the caller's ``sampler.fps``, 2 by default: 0, 0.5, 1.0, ...).
The opener takes ``opener_frames`` grid times (6: 0.0-2.5), every later turn ``turn_frames`` (2).
For each grid time ``t`` the frame used is the first frame whose *end* time
(pts + duration, what decord reports as a frame's timestamp) is >= ``t``, searching from the
frame after the previous turn's last one; grid times at or past the video's end are not used and
a turn keeps an even number of frames. Frames are decoded once, in order, without holding the file.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .frames import MAX_PIXELS, MAX_RATIO, TEXT_DEMUXERS, Upright, resize_frames
from .reader import JUMP_S
from .sampler import FPS, OPENER_FRAMES, TURN_FRAMES, conform
from ..types import Clip, Frame
from ..errors import VideoFileError  # noqa: F401  (re-exported)



def probe(path: str | Path) -> tuple[float, float]:
    """(duration seconds, frame rate) of the first video stream, or a clear VideoFileError."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        return duration, rate
    finally:
        container.close()


def _open(path: str | Path):
    p = Path(path)
    if not p.exists():
        raise VideoFileError(f"{path}: no such file")
    if p.is_dir():
        raise VideoFileError(f"{path} is a folder, not a video file")
    if p.stat().st_size == 0:
        raise VideoFileError(f"{path} is empty (0 bytes)")
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, OSError) as e:
        raise VideoFileError(f"{path} is not a readable video: {getattr(e, 'strerror', None) or e}") from None
    if not container.streams.video:
        container.close()
        raise VideoFileError(f"{path} has no video stream")
    if container.format.name in TEXT_DEMUXERS:
        container.close()
        raise VideoFileError(f"{path} is a text file, not a video")
    w, h = container.streams.video[0].width or 0, container.streams.video[0].height or 0
    if w > 0 and h > 0 and max(w, h) / min(w, h) > MAX_RATIO:
        container.close()
        raise VideoFileError(f"{path}: frames of {w}x{h} (aspect ratio {max(w, h) / min(w, h):.0f}) "
                             f"are beyond the model's limit of {MAX_RATIO}")
    return container


def decode_frames(path: str | Path) -> Iterator[tuple[Frame, float]]:
    """(frame, end time) for every decoded frame, pts from 0, upright as players show it (the
    display rotation applied: :class:`~pipeline.capture.frames.Upright`). Corrupt packets are skipped.
    A frame without a timestamp (a raw ``.h264`` / ``.hevc`` elementary stream has none) starts where
    the previous frame ended: such a stream is timed by its frame durations (the stream's frame rate).
    Timestamps that go back, or on by more than ``JUMP_S`` (10 s) past the previous frame's end
    (concatenated recordings), are a discontinuity: the video continues at the previous frame's end,
    as the capture thread continues it."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        first = None
        end = None  # the previous frame's end time
        index = 0
        upright = Upright()
        try:
            for frame in _decode_skipping_damage(container, stream):
                # exact arithmetic: an end time of 2.5 s must compare equal to the grid time 2.5
                tb = frame.time_base or stream.time_base or Fraction(1, 90000)
                dur = frame.duration * tb if getattr(frame, "duration", None) else 1 / rate
                if frame.pts is None:  # no timestamp: right after the previous frame
                    t = end if end is not None else Fraction(0)
                else:
                    first = frame.pts * tb - (end or 0) if first is None else first
                    t = frame.pts * tb - first
                    if end is not None and not end - dur <= t <= end + JUMP_S:
                        # timestamps went back or jumped far on (concatenated recordings): continue
                        first, t = frame.pts * tb - end, end
                end = t + dur
                img = upright.image(frame)
                yield Frame(img, float(t), time.monotonic(), index), float(t + dur)
                index += 1
        except av.error.InvalidDataError:
            if index:
                return  # a truncated tail: keep what decoded
        if index == 0:
            raise VideoFileError(f"{path}: no frame could be decoded")
    finally:
        container.close()


def _decode_skipping_damage(container, stream) -> Iterator:
    """``container.decode(stream)``, but a packet the decoder rejects is skipped, not the end."""
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except (av.error.InvalidDataError, av.error.PatchWelcomeError):
            continue
        yield from frames


def reference_clips(frames: Iterable[tuple[Frame, float]], max_pixels: int = MAX_PIXELS, *, fps: float = FPS,
                    opener_frames: int = OPENER_FRAMES, turn_frames: int = TURN_FRAMES) -> Iterator[Clip]:
    """Group (frame, end time) pairs into the reference's turns: ``opener_frames`` frames, then
    ``turn_frames`` at a time, one per ``1/fps`` seconds of grid time. Frame counts must be even."""
    if opener_frames % 2 or turn_frames % 2 or min(opener_frames, turn_frames) < 2 or fps <= 0:
        raise ValueError("fps must be > 0 and frames per clip even and >= 2 (temporal patch of 2)")
    it = iter(frames)
    look: list[tuple[Frame, float]] = []  # the candidate frame and one frame of lookahead

    def fill() -> None:
        while len(look) < 2:
            try:
                look.append(next(it))
            except StopIteration:
                return

    grid, n = 0.0, opener_frames
    while True:
        chosen: list[Frame] = []
        times = [grid + i / fps for i in range(n)]
        for t in times:
            fill()
            while look and look[0][1] < t:
                look.pop(0)
                fill()
            if not look or (len(look) == 1 and t >= look[0][1]):
                break  # the video ends before t
            chosen.append(look[0][0])
        keep = len(chosen) - len(chosen) % 2
        if keep == 0:
            return
        if look and look[0][0] is chosen[keep - 1]:
            look.pop(0)  # the next turn searches from the frame after the last one used
        images = [f.image for f in chosen[:keep]]
        if len({im.shape for im in images}) > 1:  # the resolution changed inside this turn
            images = conform(images)
        images = np.stack(images)
        yield Clip(resize_frames(images, max_pixels=max_pixels), tuple(times[:keep]), interval=1 / fps)
        grid, n = times[keep - 1] + 1 / fps, turn_frames


def file_clips(path: str | Path, max_pixels: int = MAX_PIXELS, *, fps: float = FPS,
               opener_frames: int = OPENER_FRAMES, turn_frames: int = TURN_FRAMES) -> Iterator[Clip]:
    """The clips of a recorded video (see :func:`reference_clips`; pass the run's ``sampler`` settings).

    Raises VideoFileError when the file cannot be read or holds less than one turn."""
    n = 0
    for clip in reference_clips(decode_frames(path), max_pixels, fps=fps, opener_frames=opener_frames,
                                turn_frames=turn_frames):
        n += 1
        yield clip
    if n == 0:  # e.g. one decodable frame: a turn needs two
        raise VideoFileError(f"{path}: too short to caption (less than one turn of decodable video)")
