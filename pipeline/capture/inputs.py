"""An open source as the capture thread reads it (:class:`Input`), and PyAV's: open a
:class:`Source` with PyAV (directly or through a relay) and pick its video stream.

Every open failure becomes a :class:`CaptureError` with a one-line, redacted message, marked
``transient`` when a retry may cure it. Sources that PyAV does not open (OpenCV) bring their own
``Source.opener`` returning an :class:`Input`.
"""

from __future__ import annotations

import errno
import logging
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Protocol

import av
import numpy as np

from pipeline.capture.errors import CaptureError
from pipeline.capture.relay import Relay
from pipeline.capture.sources import LOW_LATENCY_OPTIONS, Source
from pipeline.capture.frames import MAX_RATIO
from pipeline.redact import redact

log = logging.getLogger(__name__)

# errors no retry will cure
_PERMANENT = (av.error.FileNotFoundError, av.error.InvalidDataError, av.error.DecoderNotFoundError,
              av.error.ProtocolNotFoundError, av.error.DemuxerNotFoundError, av.error.PermissionError,
              av.error.PatchWelcomeError, av.error.OptionNotFoundError, av.error.HTTPNotFoundError)


@dataclass(frozen=True)
class Picture:
    """One decoded video frame, before the capture thread gives it a stream time."""

    time: float | None  # seconds on the input's own clock; None: no timestamp (the wall clock is used)
    format: tuple[int, int, str]  # width, height, pixel format: a change is a format_changed event
    rgb: Callable[[], np.ndarray]  # the image, H x W x 3 uint8 RGB


class Input(Protocol):
    """An open source. ``read`` yields, in decode order: :class:`Picture` (video), ``av.Packet``
    (audio, only when ``audio`` is true; the capture thread decodes it) and ``Exception``
    instances (a damaged packet, skipped and counted). It returns at the end of the input and
    raises ``av.error.FFmpegError``, ``OSError`` or ``EOFError`` when the input is lost."""

    relay: Relay | None  # a relay process the capture thread kills to unblock a read, or None
    interval: float  # nominal seconds between frames (1/30 when unknown)

    def read(self, audio: bool) -> Iterator[Picture | av.Packet | Exception]: ...

    def close(self) -> None: ...


@dataclass
class PyAVInput:
    """An open PyAV container with its video stream; ``close()`` frees the container and any relay."""

    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    relay: Relay | None = None

    @property
    def interval(self) -> float:
        rate = self.stream.average_rate
        return 1.0 / float(rate) if rate else 1.0 / 30

    def read(self, audio: bool) -> Iterator[Picture | av.Packet | Exception]:
        vs = self.stream
        aus = self.container.streams.audio[0] if audio and self.container.streams.audio else None
        for packet in self.container.demux(*((vs, aus) if aus is not None else (vs,))):
            if aus is not None and packet.stream_index == aus.index:
                yield packet
                continue
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, av.error.PatchWelcomeError) as e:
                yield e
                continue
            for f in frames:
                yield Picture(f.time, (f.width, f.height, f.format.name), partial(f.to_ndarray, format="rgb24"))

    def close(self) -> None:
        try:
            self.container.close()
        finally:
            if self.relay is not None:
                self.relay.close()


def describe(source: Source, err: BaseException) -> str:
    """One line: what failed, on which (redacted) source."""
    if isinstance(err, av.error.FFmpegError):
        msg = err.strerror or str(err)
        if getattr(err, "errno", None) in (errno.ETIMEDOUT,) or "Immediate exit" in str(msg):
            msg = "timed out"
    else:
        msg = str(err) or type(err).__name__
    return redact(f"{source.display}: {msg}")


REPROBE_US = 3_000_000  # the second probe of a live input that showed only audio (a GOP of up to ~3 s)


def open_input(source: Source, *, relay: bool | None = None,
               on_relay: Callable[[Relay], None] | None = None) -> PyAVInput:
    """Open ``source`` and find its video stream; raise :class:`CaptureError` on any failure.

    ``on_relay`` gets the relay as soon as it runs, so another thread can kill it to abort an
    open that waits on it (an SRT listener waits for its caller without any timeout).
    """
    use_relay = source.relay if relay is None else relay
    rel = Relay(source) if use_relay else None
    if rel is not None and on_relay is not None:
        on_relay(rel)
    try:
        if rel is not None:
            opts = {k: v for k, v in LOW_LATENCY_OPTIONS.items() if k != "fflags"}
            container = av.open(rel.stdout, format=source.relay_format, options=opts,
                                timeout=(source.open_timeout, source.read_timeout))
        else:
            container = av.open(source.url, format=source.format, options=dict(source.options),
                                timeout=(source.open_timeout, source.read_timeout))
    except av.error.ProtocolNotFoundError as e:
        if rel is None and relay is None:
            log.info("%s: PyAV lacks the protocol, relaying through the system ffmpeg", source.display)
            return open_input(source, relay=True, on_relay=on_relay)
        raise CaptureError(describe(source, e)) from None
    except _PERMANENT as e:
        if rel is not None:
            tail = rel.error_tail()
            rel.close()
            if tail:  # the relay saw why (refused, timed out, no such device, ...)
                raise CaptureError(f"{source.display}: {tail}", transient=True) from None
            raise CaptureError(f"{source.display}: the relay produced no stream", transient=True) from None
        msg = describe(source, e)
        if isinstance(e, av.error.InvalidDataError):
            msg += " (not a media stream FFmpeg can read)"
        raise CaptureError(msg) from None
    except (av.error.FFmpegError, OSError, EOFError) as e:
        tail = rel.error_tail() if rel is not None else ""
        if rel is not None:
            rel.close()
        msg = describe(source, e) + (f" ({tail})" if tail else "")
        if source.kind.startswith("rtmp") and not source.listen and getattr(e, "errno", None) == errno.EIO:
            # nginx-rtmp & co. accept a play of any key and send nothing until someone publishes it
            msg += f" (no stream within {source.open_timeout:g} s: wrong stream key, or nothing published yet)"
        raise CaptureError(msg, transient=True) from None
    except BaseException:
        if rel is not None:
            rel.close()
        raise
    try:
        stream = _video_stream(source, container)
    except BaseException as e:
        joined_mid_gop = (isinstance(e, CaptureError) and rel is None and source.live
                          and bool(container.streams.audio)
                          and int(source.options.get("analyzeduration", 5_000_000)) < REPROBE_US)
        container.close()
        if rel is not None:
            rel.close()
        if joined_mid_gop:
            # a live stream joined between keyframes (nginx-rtmp & co. hold the video back until
            # the next one, the audio flows at once): the short low-latency probe saw only audio.
            # Probe once more, long enough for a keyframe; a stream that really has no video
            # still fails, a few seconds later
            log.info("%s: only audio within the short probe; probing %g s for the video",
                     source.display, REPROBE_US / 1e6)
            opts = {**source.options, "analyzeduration": str(REPROBE_US)}
            return open_input(dataclasses.replace(source, options=opts), relay=relay, on_relay=on_relay)
        raise
    return PyAVInput(container, stream, rel)


def _video_stream(source: Source, container) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        raise CaptureError(f"{source.display}: no video stream (has {kinds})")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None or stream.codec_context.codec is None:
        raise CaptureError(f"{source.display}: unsupported video codec")
    name = ctx.codec.name
    if name not in av.codecs_available:
        raise CaptureError(f"{source.display}: unsupported video codec {name!r}")
    w, h = ctx.width or 0, ctx.height or 0
    if w > 0 and h > 0 and max(w, h) / min(w, h) > MAX_RATIO:
        raise CaptureError(f"{source.display}: frames of {w}x{h} (aspect ratio {max(w, h) / min(w, h):.0f}) "
                           f"are beyond the model's limit of {MAX_RATIO}")
    stream.thread_type = source.thread_type
    if source.decoder_threads:
        ctx.thread_count = source.decoder_threads
    return stream
