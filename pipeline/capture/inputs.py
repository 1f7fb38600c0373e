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
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Protocol

import av
import numpy as np

import pipeline.capture.hls as hls
from pipeline.capture.errors import CaptureError, NoVideoYet
from pipeline.capture.relay import Relay
from pipeline.capture.sources import LOW_LATENCY_OPTIONS, Source
from pipeline.capture.frames import MAX_RATIO, TEXT_DEMUXERS, Upright
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
    playlist: "hls.Playlist | None"  # an HLS source's playlist at the open (None for anything else)
    read_timeout: float  # seconds without a packet before a read fails (0: the source's own)

    def read(self, audio: bool, seen: Callable[[av.Packet], bool] | None = None
             ) -> Iterator[Picture | av.Packet | Exception]: ...

    def close(self) -> None: ...


@dataclass
class PyAVInput:
    """An open PyAV container with its video stream; ``close()`` frees the container and any relay.
    ``playlist``: an HLS source's playlist as it was at the open."""

    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    relay: Relay | None = None
    playlist: hls.Playlist | None = None
    read_timeout: float = 0.0  # seconds without a packet before a read fails (an HLS playlist's stall timeout)
    upright: Upright = field(default_factory=Upright)  # the display rotation: per open (a new publisher may differ)
    # a finite input (a file): a frame without a timestamp (a raw .h264 elementary stream) is timed at
    # the previous frame's end (durations: the stream's frame rate), not left to the wall clock of decoding
    finite: bool = False

    @property
    def interval(self) -> float:
        rate = self.stream.average_rate
        return 1.0 / float(rate) if rate else 1.0 / 30

    def read(self, audio: bool, seen: Callable[[av.Packet], bool] | None = None
             ) -> Iterator[Picture | av.Packet | Exception]:
        """See :class:`Input`. Pictures are turned upright (``Upright``). With ``seen`` and an HLS playlist,
        video packets ``seen`` reports as captured before (a re-read segment) are decoded, since later frames
        refer to them, but their frames are not yielded again. A ``finite`` input's frames without a
        timestamp get the previous frame's end time (0 for the first)."""
        vs = self.stream
        clock = None  # a finite input: where the last frame ended, seconds
        try:
            aus = self.container.streams.audio[0] if audio and self.container.streams.audio else None
        except Exception:  # noqa: BLE001 - an audio stream PyAV cannot describe: captions need only the video
            aus = None
        dedupe = seen is not None and self.playlist is not None
        replayed_to = None  # the newest pts of a video packet captured before
        for packet in self.container.demux(*((vs, aus) if aus is not None else (vs,))):
            if aus is not None and packet.stream_index == aus.index:
                yield packet
                continue
            if dedupe and packet.pts is not None and packet.size and seen(packet):
                replayed_to = packet.pts if replayed_to is None else max(replayed_to, packet.pts)
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, av.error.PatchWelcomeError) as e:
                yield e
                continue
            for f in frames:
                if replayed_to is not None and f.pts is not None and f.pts <= replayed_to:
                    continue
                t = f.time
                if self.finite:
                    if t is None:
                        t = clock if clock is not None else 0.0
                    dur = f.duration * f.time_base if f.duration and f.time_base else None
                    clock = t + (float(dur) if dur else self.interval)
                turn = self.upright.turn(f)
                w, h = (f.height, f.width) if turn in (90, 270) else (f.width, f.height)
                yield Picture(t, (w, h, f.format.name), partial(self.upright.image, f, turn))

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


REPROBE_US = 3_000_000  # the probe of a live input that showed only audio (finds a keyframe up to 3 s away)
# the probe while waiting for the video of such an input, repeated back to back while the input is up (a
# keyframe 8-10 s away, OBS "auto" and phones, comes within the second or third); it bounds stop() meanwhile
VIDEO_WAIT_US = 5_000_000


def open_input(source: Source, *, relay: bool | None = None, on_relay: Callable[[Relay], None] | None = None,
               probe_us: int | None = None) -> PyAVInput:
    """Open ``source`` and find its video stream; raise :class:`CaptureError` on any failure.

    ``on_relay`` gets the relay as soon as it runs, so another thread can kill it to abort an
    open that waits on it (an SRT listener waits for its caller without any timeout).
    A live input that shows only audio within the short low-latency probe is probed once more for
    ``REPROBE_US``, then raises :class:`NoVideoYet`; ``probe_us`` probes that long at once (the open
    timeout grows by as much: FFmpeg's probe runs inside the open). A live HTTP source
    that answers 404 raises a transient error (a playlist the encoder has not written yet). An HLS
    source's playlist is read first (``Input.playlist``), and its read timeout is
    :func:`hls.stall_timeout` (a playlist of 6 s segments has packets 6 s apart).
    """
    if probe_us is not None:
        # without fflags=nobuffer: the packets the probe read (the keyframe it waited for) are kept
        opts = {k: v for k, v in source.options.items() if not (k == "fflags" and v == "nobuffer")}
        source = dataclasses.replace(source, options={**opts, "analyzeduration": str(probe_us)},
                                     open_timeout=source.open_timeout + probe_us / 1e6)
    playlist = None
    if source.kind == "hls":
        playlist = hls.fetch(source.url, source.open_timeout)
        if source.live:
            source = dataclasses.replace(source, read_timeout=hls.stall_timeout(playlist, source.read_timeout))
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
        # a live stream's URL that is not there yet (an HLS playlist before the encoder's first segment)
        raise CaptureError(msg, transient=source.live and isinstance(e, av.error.HTTPNotFoundError)) from None
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
        only_audio = (isinstance(e, CaptureError) and rel is None and source.live
                      and bool(container.streams.audio))
        container.close()
        if rel is not None:
            rel.close()
        if only_audio and probe_us is None:
            # a live stream joined between keyframes (nginx-rtmp & co. hold the video back until
            # the next one, the audio flows at once): the short low-latency probe saw only audio.
            # Probe once more, long enough for a keyframe a few seconds away
            log.info("%s: only audio within the short probe; probing %g s for the video",
                     source.display, REPROBE_US / 1e6)
            return open_input(source, relay=relay, on_relay=on_relay, probe_us=REPROBE_US)
        if only_audio:
            raise NoVideoYet(str(e)) from None
        raise
    return PyAVInput(container, stream, rel, playlist, source.read_timeout, finite=not source.live)


def _video_stream(source: Source, container) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        raise CaptureError(f"{source.display}: no video stream (has {kinds})")
    if container.format.name in TEXT_DEMUXERS:
        raise CaptureError(f"{source.display}: a text file, not a video")
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
