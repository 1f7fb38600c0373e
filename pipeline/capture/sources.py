"""From a user's SOURCE string to a :class:`Source`: what FFmpeg opens, with which options.

A source kind is a plugin of the ``livecc.sources`` entry-point group (``pipeline/plugins.py``):
the entry point's name is the scheme, its object a factory ``f(spec: str, opts: SourceOptions)
-> Source``. The FFmpeg (PyAV) kinds below are listed there by this package's pyproject.toml,
exactly as a third-party package lists its own: ``rtmp`` (and ``rtmps``, ``rtmpt``, ...), ``rtsp``,
``rtsps``, ``srt``, ``udp``, ``rtp``, ``http``, ``https``, ``file``, ``lavfi``, ``v4l2``,
``avfoundation``, ``dshow``; ``opencv`` (``plugins/sources/opencv.py``) opens with OpenCV instead.
A factory whose source is not opened by PyAV sets :attr:`Source.opener`.

Spec forms::

    rtmp://host/app/key                 pull from a server
    rtmp://0.0.0.0:1935/live?listen=1   listen: an encoder (OBS, ffmpeg) pushes to us
    rtsp://cam/stream                   pull (transport tcp by default, opts.transport='udp')
    rtsp://0.0.0.0:8554/live?listen=1   listen: an encoder pushes RTSP (ANNOUNCE/RECORD) to us
    srt://host:9000?mode=caller         through a system-ffmpeg relay (PyAV wheels lack libsrt)
    http(s)://.../x.m3u8                HLS
    udp://127.0.0.1:5000                MPEG-TS over UDP (we bind the port)
    /path/video.mp4, file:/path         paced at real time (opts.pace=False: as fast as possible)
    lavfi:testsrc2=size=1280x720:rate=30  test pattern, paced at real time
    v4l2:/dev/video0  avfoundation:0  dshow:video=Cam   webcams (opts.video_size/framerate/pixel_format)
    opencv:0  opencv:/dev/video0?api=v4l2  opencv:clip.mp4   OpenCV VideoCapture (plugins/sources/opencv.py)

``listen=1`` is taken out of the URL (it is our option, not FFmpeg's).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

import av

from pipeline.capture.errors import CaptureError
from pipeline.plugins import SOURCES, PluginError, registry
from pipeline.redact import redact

log = logging.getLogger(__name__)

# FFmpeg's default analyzeduration (5 s) alone delays the first frame of a live flv/mpegts input
# by about 4 s; half a second is enough to find a video stream's parameters.
LOW_LATENCY_OPTIONS = {"analyzeduration": "500000", "probesize": "2000000", "fflags": "nobuffer"}
OPEN_TIMEOUT_S = 5.0  # opening a network source (connect + probe); also bounds stop() while opening
READ_TIMEOUT_S = 3.0  # no packet for this long: the source is lost (and stop() waits at most this)
LISTEN_WINDOW_S = 2.0  # listen mode waits for a publisher in slices this long (so stop() is prompt)


@dataclass(frozen=True)
class SourceOptions:
    """What a user may set about a source; ``None`` means the kind's default."""

    pace: bool | None = None  # files / lavfi: real time (True) or as fast as possible (False)
    listen: bool | None = None  # rtmp / rtsp: wait for an encoder to push to us
    transport: str | None = None  # rtsp: "tcp" | "udp"
    low_latency: bool = True  # small analyzeduration / probesize, no input buffering
    relay: bool | None = None  # through the system ffmpeg (None: when PyAV lacks the protocol)
    video_size: str | None = None  # webcams: "1280x720"
    framerate: str | None = None  # webcams: "30"
    pixel_format: str | None = None  # webcams: "yuyv422", "mjpeg", "nv12", ...
    decoder_threads: int = 0  # 0: FFmpeg picks
    thread_type: str = "AUTO"  # "SLICE" (no added latency), "FRAME", "AUTO"
    open_timeout: float | None = None
    read_timeout: float | None = None
    live: bool | None = None  # reconnect when it ends (None: by kind; set False for an HLS VOD)
    options: Mapping[str, str] = field(default_factory=dict)  # extra FFmpeg input options


@dataclass(frozen=True)
class Source:
    """What to open. ``url`` goes to FFmpeg as is; never log it: log :attr:`display`."""

    kind: str
    url: str
    format: str | None = None  # demuxer / device to force (lavfi, v4l2, mpegts, ...)
    options: Mapping[str, str] = field(default_factory=dict)  # FFmpeg input options
    live: bool = True  # reconnect on loss; False: EOF ends the capture
    pace: bool = False  # sleep to the frames' pts (files, lavfi)
    listen: bool = False
    relay: bool = False  # open through the system ffmpeg (see relay.py)
    relay_format: str = "mpegts"  # container of the relay pipe (nut for raw webcam video)
    open_timeout: float = OPEN_TIMEOUT_S
    read_timeout: float = READ_TIMEOUT_S
    decoder_threads: int = 0
    thread_type: str = "AUTO"
    #: ``opener(source) -> Input`` (see ``pipeline/capture/inputs.py``) for a source that PyAV does
    #: not open; None: ``open_input`` (PyAV, or the system-ffmpeg relay)
    opener: Callable[["Source"], Any] | None = None

    @property
    def display(self) -> str:
        """The source for logs and events, secrets redacted."""
        return redact(self.url) if self.kind not in ("lavfi", "opencv") else f"{self.kind}:{redact(self.url)}"


Factory = Callable[[str, SourceOptions], Source]


def resolve(spec: str, opts: SourceOptions | None = None, **kw) -> Source:
    """``spec`` (a URL, path, or ``kind:arg``) -> :class:`Source`. ``kw`` are SourceOptions fields.

    A spec without a scheme is a file path. Raises CaptureError for an unknown or broken kind."""
    opts = replace(opts or SourceOptions(), **kw)
    spec = str(spec).strip()
    scheme = _scheme(spec)
    if scheme is None:
        return file(spec, opts)
    try:
        factory: Factory = registry.get(SOURCES, scheme)
    except PluginError as e:
        raise CaptureError(redact(f"{spec}: {e}")) from None
    return factory(spec, opts)


def _scheme(spec: str) -> str | None:
    if ":" not in spec:
        return None
    head = spec.split(":", 1)[0]
    if len(head) == 1 and os.name == "nt":  # C:\video.mp4
        return None
    if head.isidentifier() or head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return head.lower()
    return None


def _timeouts(opts: SourceOptions, live: bool) -> dict:
    return {"open_timeout": opts.open_timeout or OPEN_TIMEOUT_S,
            "read_timeout": opts.read_timeout or (READ_TIMEOUT_S if live else 30.0)}


def _base(opts: SourceOptions) -> dict:
    return {"decoder_threads": opts.decoder_threads, "thread_type": opts.thread_type}


def _net_options(opts: SourceOptions) -> dict[str, str]:
    o = dict(LOW_LATENCY_OPTIONS) if opts.low_latency else {}
    o.update({k: str(v) for k, v in opts.options.items()})
    return o


def _take_listen(url: str, opts: SourceOptions) -> tuple[str, bool]:
    """Strip our ``listen=1`` query flag; return (url, listen)."""
    parts = urlsplit(url, allow_fragments=False)
    params = [p for p in parts.query.split("&") if p]
    flag = [p for p in params if p.split("=", 1)[0] == "listen"]
    rest = [p for p in params if p.split("=", 1)[0] != "listen"]
    listen = opts.listen
    if listen is None:
        listen = bool(flag) and flag[-1].split("=", 1)[-1].lower() not in ("0", "false", "no")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "&".join(rest), "")), bool(listen)


def rtmp(spec: str, opts: SourceOptions) -> Source:
    url, listen = _take_listen(spec, opts)
    o = _net_options(opts)
    if listen:
        o.setdefault("listen", "1")
        # the rtmp protocol's own accept timeout (s): listen in slices so stop() stays prompt
        o.setdefault("timeout", str(int(LISTEN_WINDOW_S)))
    else:
        o.setdefault("rtmp_live", "live")
    live = True if opts.live is None else opts.live
    return Source("rtmp", url, format="flv" if listen else None, options=o, live=live, listen=listen,
                  **_timeouts(opts, live), **_base(opts))


def rtsp(spec: str, opts: SourceOptions) -> Source:
    url, listen = _take_listen(spec, opts)
    o = _net_options(opts)
    transport = (opts.transport or "tcp").lower()
    if transport not in ("tcp", "udp", "udp_multicast", "http", "https"):
        raise CaptureError(f"rtsp transport must be tcp or udp, not {transport!r}")
    o.setdefault("rtsp_transport", transport)
    if listen:
        o.setdefault("rtsp_flags", "listen")
        # PyAV 18's FFmpeg rejects the default (-1000); seconds to wait for the encoder
        o.setdefault("listen_timeout", str(int(LISTEN_WINDOW_S)))
    live = True if opts.live is None else opts.live
    return Source("rtsp", url, format="rtsp", options=o, live=live, listen=listen,
                  **_timeouts(opts, live), **_base(opts))


def srt(spec: str, opts: SourceOptions) -> Source:
    live = True if opts.live is None else opts.live
    relay = True if opts.relay is None else opts.relay  # PyAV wheels are built without libsrt
    listen = opts.listen if opts.listen is not None else "mode=listener" in spec
    return Source("srt", spec, options=_net_options(opts), live=live, relay=relay, listen=listen,
                  **_timeouts(opts, live), **_base(opts))


def udp(spec: str, opts: SourceOptions) -> Source:
    o = _net_options(opts)
    o.setdefault("overrun_nonfatal", "1")
    o.setdefault("fifo_size", "50000")  # x188-byte packets, about 10 MB
    live = True if opts.live is None else opts.live
    return Source("udp", spec, format="mpegts", options=o, live=live, relay=bool(opts.relay),
                  **_timeouts(opts, live), **_base(opts))


def http(spec: str, opts: SourceOptions) -> Source:
    o = _net_options(opts)
    path = urlsplit(spec).path.lower()
    kind = "hls" if path.endswith(".m3u8") else "http"
    if kind == "hls":
        o.pop("fflags", None)  # nobuffer makes the HLS demuxer probe segment by segment
        o.setdefault("live_start_index", "-1")  # start at the newest segment
    live = True if opts.live is None else opts.live
    return Source(kind, spec, options=o, live=live, relay=bool(opts.relay),
                  **_timeouts(opts, live), **_base(opts))


def file(path: str, opts: SourceOptions) -> Source:
    if path.startswith("file:"):
        path = path[5:]
        if path.startswith("//"):
            path = path[2:]
    pace = True if opts.pace is None else opts.pace
    live = False if opts.live is None else opts.live
    return Source("file", os.path.expanduser(path), options=dict(opts.options), live=live, pace=pace,
                  **_timeouts(opts, False), **_base(opts))


def lavfi(spec: str, opts: SourceOptions) -> Source:
    graph = spec.split(":", 1)[1]
    pace = True if opts.pace is None else opts.pace
    live = False if opts.live is None else opts.live
    return Source("lavfi", graph, format="lavfi", options=dict(opts.options), live=live, pace=pace,
                  **_timeouts(opts, False), **_base(opts))


def _device(fmt: str) -> Factory:
    def factory(spec: str, opts: SourceOptions) -> Source:
        target = spec.split(":", 1)[1]
        o: dict[str, str] = {}
        if opts.video_size:
            o["video_size"] = opts.video_size
        if opts.framerate:
            o["framerate"] = str(opts.framerate)
        if opts.pixel_format:
            o["input_format" if fmt == "video4linux2" else "pixel_format"] = opts.pixel_format
        o.update({k: str(v) for k, v in opts.options.items()})
        # PyAV's wheels carry no capture devices on Linux: relay through the system ffmpeg then
        relay = opts.relay if opts.relay is not None else fmt not in av.formats_available
        live = True if opts.live is None else opts.live
        return Source(fmt if fmt != "video4linux2" else "v4l2", target, format=fmt, options=o, live=live,
                      relay=relay, relay_format="nut", **_timeouts(opts, live), **_base(opts))
    return factory


def system_ffmpeg() -> str | None:
    return shutil.which(os.environ.get("LIVECC_FFMPEG", "ffmpeg"))


v4l2 = _device("video4linux2")
avfoundation = _device("avfoundation")
dshow = _device("dshow")
