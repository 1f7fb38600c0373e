"""The ``opencv:`` source: frames through OpenCV's ``cv2.VideoCapture``, for machines where
FFmpeg's device input does not work (a camera only the platform's own API reaches: Media
Foundation, DirectShow, AVFoundation, V4L2, GStreamer).

Spec: ``opencv:TARGET[?api=NAME]``

- ``TARGET``: a camera index (``opencv:0``), a device path (``opencv:/dev/video0``), a video file
  (``opencv:clip.mp4``) or anything else ``VideoCapture`` opens (a URL, a GStreamer pipeline).
- ``api``: the backend, one of ``cv2.videoio_registry.getBackends()`` by name (``v4l2``, ``dshow``,
  ``msmf``, ``avfoundation``, ``gstreamer``, ``ffmpeg``, ...); default: OpenCV picks.

A regular file is finite and paced at real time, with its own frame times (``CAP_PROP_POS_MSEC``);
anything else is live (reconnects with backoff) and timed by the wall clock at capture. The
capture options ``video_size`` ("1280x720"), ``framerate`` and ``pixel_format`` (a FOURCC such as
``MJPG``) are requested with ``VideoCapture.set``; the backend may ignore them. Frames go to the
same capture thread and ring buffer as PyAV's (``Picture``: RGB uint8, times in seconds). No
audio. OpenCV has no read timeout for every backend: a camera that blocks in ``read`` can delay
``stop()`` past its bound (the thread is then abandoned, as a daemon).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from urllib.parse import parse_qsl

import cv2
import numpy as np

from pipeline.capture.errors import CaptureError
from pipeline.capture.inputs import Picture
from pipeline.capture.sources import Source, SourceOptions


def backends() -> dict[str, int]:
    """The backends this OpenCV build has: lower-case name -> ``cv2.CAP_*`` id."""
    return {cv2.videoio_registry.getBackendName(b).lower(): int(b) for b in cv2.videoio_registry.getBackends()}


def opencv(spec: str, opts: SourceOptions) -> Source:
    """The ``livecc.sources`` factory for ``opencv:`` specs (see the module docstring)."""
    target, _, query = spec.split(":", 1)[1].partition("?")
    params = dict(parse_qsl(query))
    unknown = set(params) - {"api"}
    if unknown or not target:
        raise CaptureError(f"{spec}: expected opencv:INDEX|PATH[?api=NAME], not {', '.join(sorted(unknown)) or 'empty'}")
    api = params.get("api", "any").lower()
    if api != "any" and api not in backends():
        raise CaptureError(f"{spec}: OpenCV has no backend {api!r} here (has: {', '.join(sorted(backends()))})")
    is_file = os.path.isfile(os.path.expanduser(target))
    live = (not is_file) if opts.live is None else opts.live
    pace = is_file if opts.pace is None else opts.pace
    props = {}
    if opts.video_size:
        w, _, h = opts.video_size.partition("x")
        props.update({cv2.CAP_PROP_FRAME_WIDTH: float(w), cv2.CAP_PROP_FRAME_HEIGHT: float(h)})
    if opts.framerate:
        props[cv2.CAP_PROP_FPS] = float(opts.framerate)
    if opts.pixel_format:
        props[cv2.CAP_PROP_FOURCC] = float(cv2.VideoWriter_fourcc(*opts.pixel_format.ljust(4)[:4]))
    options = {"api": api, **{str(k): str(v) for k, v in props.items()}}
    return Source("opencv", os.path.expanduser(target) if is_file else target, format=api, options=options,
                  live=live, pace=pace, open_timeout=opts.open_timeout or 10.0,
                  read_timeout=opts.read_timeout or 10.0, opener=open_capture)


@dataclass
class OpenCVInput:
    """An open ``cv2.VideoCapture``: the :class:`pipeline.capture.inputs.Input` the capture thread reads."""

    cap: cv2.VideoCapture
    source: Source
    relay: None = None
    playlist: None = None  # (an HLS playlist: only for FFmpeg's inputs)

    @property
    def read_timeout(self) -> float:
        return self.source.read_timeout

    @property
    def interval(self) -> float:
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        return 1.0 / fps if 0 < fps < 1000 else 1.0 / 30

    def read(self, audio: bool, seen=None) -> Iterator[Picture]:
        file_times = not self.source.live  # a file's own clock; a camera's: the wall clock
        while True:
            ok, bgr = self.cap.read()
            if not ok or bgr is None:
                if self.source.live:
                    raise OSError("OpenCV read no frame (camera disconnected or busy)")
                return
            t = self.cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 if file_times else None
            h, w = bgr.shape[:2]
            yield Picture(t, (w, h, "bgr24" if bgr.ndim == 3 else "gray"), partial(_rgb, bgr))

    def close(self) -> None:
        self.cap.release()


def _rgb(image: np.ndarray) -> np.ndarray:
    code = cv2.COLOR_BGR2RGB if image.ndim == 3 and image.shape[2] == 3 else \
        cv2.COLOR_BGRA2RGB if image.ndim == 3 else cv2.COLOR_GRAY2RGB
    return cv2.cvtColor(image, code)


def open_capture(source: Source) -> OpenCVInput:
    """Open ``source`` (made by :func:`opencv`); CaptureError when OpenCV cannot."""
    api = backends().get(source.format, cv2.CAP_ANY)
    target: int | str = int(source.url) if source.url.isdigit() else source.url
    cap = cv2.VideoCapture(target, api)
    if not cap.isOpened():
        cap.release()
        raise CaptureError(f"{source.display}: OpenCV ({source.format} backend) cannot open it", transient=source.live)
    for prop, value in source.options.items():
        if prop != "api":
            cap.set(int(prop), float(value))
    return OpenCVInput(cap, source)
