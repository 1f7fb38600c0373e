"""A recorded video read in one piece, the way LiveCC's ``video_qa`` and its evaluation loop read it.

Source: livecc-utils 0.0.2 ``_read_video_decord_plus`` (``strict_fps=False``) and ``_spatial_resize_video``,
qwen-vl-utils 0.0.11 ``smart_nframes`` / ``fetch_video``, under the settings livecc-utils puts in place at import
(``VIDEO_MIN_PIXELS`` = 100·28², ``FPS_MAX_FRAMES`` = 480, a total budget ``VIDEO_TOTAL_PIXELS`` = 24,576·28²):

- frame count: ``n = frames / avg_fps * 2`` (2 fps), at least 4, at most ``min(480, frames)``, rounded down
  to even; the frames taken are ``round(linspace(0, frames - 1, n))`` (a long video is thinned evenly);
- with a time range (the evaluation's ``video_start``/``video_end``), only the frames whose end time
  (pts + duration, float32, what decord reports) lies in [start, end] count; start 0 means the first frame's;
- size: qwen-vl-utils' ``smart_resize`` with ``min_pixels`` 100·28² and
  ``max_pixels = max(min(768·28², 24576·28² / n * 2), int(100·28² * 1.05))``: the budget is spread over the
  frames; then bicubic + antialias on uint8 (``frames.resize_frames``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import VideoFileError, _open, decode_frames
from .frames import FACTOR, resize_frames, smart_resize

FPS = 2.0
MIN_FRAMES = 4  # qwen-vl-utils FPS_MIN_FRAMES
MAX_FRAMES = 480  # livecc-utils FPS_MAX_FRAMES
FRAME_FACTOR = 2  # temporal patch
MIN_PIXELS = 100 * FACTOR * FACTOR  # livecc-utils VIDEO_MIN_PIXELS
FRAME_MAX_PIXELS = 768 * FACTOR * FACTOR  # qwen-vl-utils VIDEO_MAX_PIXELS (per frame)
TOTAL_PIXELS = 24576 * FACTOR * FACTOR  # livecc-utils' VIDEO_MAX_PIXELS env -> qwen-vl-utils VIDEO_TOTAL_PIXELS


@dataclass(frozen=True)
class VideoPlan:
    """Which frames a whole-video read takes, at which size: known before anything is decoded."""

    indices: tuple[int, ...]  # decoded-frame indices, ascending
    height: int
    width: int
    avg_fps: float
    max_pixels: float  # the per-frame budget the size came from

    @property
    def video_tokens(self) -> int:
        """Visual tokens the frames make: T/2 * (H/28) * (W/28)."""
        return len(self.indices) // FRAME_FACTOR * (self.height // FACTOR) * (self.width // FACTOR)


def frame_end_times(path: str | Path) -> tuple[np.ndarray, float, tuple[int, int]]:
    """(end time of every frame in seconds, float32, ascending; average frame rate; (height, width)).

    Read from the packets (nothing is decoded): pts relative to the first, plus the packet duration;
    packets flagged discard (before the cut of a stream-copied MP4: an edit list hides them, the
    decoder drops their frames) are not frames.
    A packet without a pts (a raw ``.h264`` / ``.hevc`` elementary stream has none) starts where the
    previous one ended; the frame rate of such a stream is its frames per second of those times (the
    demuxer's rate for it is a default, 25). Raises VideoFileError for a file with no video frames.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        rate = stream.average_rate or stream.guessed_rate
        nominal = round(1 / (float(rate or 30) * float(tb)))  # one frame, in time_base units
        pts, durs = [], []
        untimed = False
        for packet in container.demux(stream):
            if packet.size and not packet.is_discard:  # discard: hidden by an edit list, not decoded
                if packet.pts is not None:
                    pts.append(packet.pts)
                else:  # right after the previous packet
                    untimed = True
                    pts.append(pts[-1] + (durs[-1] or nominal) if pts else 0)
                durs.append(packet.duration or 0)
        size = (stream.height or 0, stream.width or 0)
    finally:
        container.close()
    if not pts:
        raise VideoFileError(f"{path}: no video frames")
    order = np.argsort(pts, kind="stable")
    p = np.asarray(pts, dtype=np.int64)[order]
    d = np.asarray(durs, dtype=np.int64)[order]
    fps = float(rate) if rate else 30.0
    d = np.where(d > 0, d, round(1 / (fps * float(tb))))
    ends = ((p - p[0] + d) * float(tb)).astype(np.float32)
    if untimed and ends[-1] > 0:
        fps = len(ends) / float(ends[-1])
    return ends, fps, size


def frame_count(total: int, avg_fps: float) -> int:
    """qwen-vl-utils' ``smart_nframes`` for fps=2 under livecc-utils' cap; VideoFileError if under 2 frames."""
    def floor2(x: float) -> int:
        return int(x // FRAME_FACTOR) * FRAME_FACTOR

    n = total / avg_fps * FPS
    n = min(min(max(n, MIN_FRAMES), floor2(min(MAX_FRAMES, total))), total)
    n = floor2(n)
    if not (FRAME_FACTOR <= n <= total):
        raise VideoFileError(f"{total} decodable frame(s): a video needs at least {FRAME_FACTOR}")
    return n


def plan(path: str | Path, start: float | None = None, end: float | None = None) -> VideoPlan:
    """The frames and size a whole-video read of ``path`` (optionally only [start, end] seconds) takes."""
    ends, fps, (h, w) = frame_end_times(path)
    if start is None and end is None:
        candidates = np.arange(len(ends))
    else:
        lo = ends[0] if not start else start
        hi = ends[-1] if not end else end
        candidates = ((lo <= ends) & (ends <= hi)).nonzero()[0]
        if len(candidates) == 0:
            raise VideoFileError(f"{path}: no frame between {start or 0:g} s and {end if end else 'the end'} s")
    n = frame_count(len(candidates), fps)
    picked = candidates[np.linspace(0, len(candidates) - 1, n).round().astype(int)]
    budget = max(min(FRAME_MAX_PIXELS, TOTAL_PIXELS / n * FRAME_FACTOR), int(MIN_PIXELS * 1.05))
    try:
        nh, nw = smart_resize(h, w, min_pixels=MIN_PIXELS, max_pixels=budget)
    except ValueError as e:
        raise VideoFileError(f"{path}: {e}") from None
    return VideoPlan(tuple(int(i) for i in picked), nh, nw, fps, budget)


def read_frames(path: str | Path, p: VideoPlan) -> np.ndarray:
    """Decode the planned frames and resize them: T x H x W x 3 uint8 RGB (T = len(p.indices))."""
    want = set(p.indices)
    out = np.empty((len(p.indices), p.height, p.width, 3), np.uint8)
    k = 0
    for frame, _ in decode_frames(path):
        if frame.index in want:
            img = resize_frames(frame.image[None], max_pixels=p.max_pixels, min_pixels=MIN_PIXELS)[0]
            if img.shape[:2] != (p.height, p.width):
                raise VideoFileError(f"{path}: frame {frame.index} is {frame.image.shape[1]}x{frame.image.shape[0]}, "
                                     "not the size the video started with")
            out[k] = img
            k += 1
            if k == len(out):
                return out
    raise VideoFileError(f"{path}: only {k} of the {len(out)} planned frames could be decoded")
