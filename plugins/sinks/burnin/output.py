"""One open output of the burn-in/restream sinks: a PyAV container with an H.264 stream, maybe an
AAC stream, maybe CEA-608 captions in the H.264 SEI, maybe a system-ffmpeg relay (SRT).

Targets (``resolve``): ``rtmp://`` / ``rtmps://`` (FLV), ``srt://`` (MPEG-TS through the system
ffmpeg, found like the capture relay: ``LIVECC_FFMPEG`` or ``ffmpeg`` on PATH, since the PyAV
wheels lack libsrt), ``udp://`` / ``tcp://`` (MPEG-TS), HLS (a path ending in ``.m3u8`` or ``/``,
or an existing folder), or a file (``.mp4``/``.mov`` fragmented by default: every keyframe
closes a fragment that is flushed to the file, so a killed process or a full disk leaves a file
that plays up to the last complete fragment; ``.mkv``, ``.flv``, ``.ts``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import subprocess
from fractions import Fraction

import av

from pipeline.capture.sources import system_ffmpeg
from pipeline.redact import redact

from .cea608 import insert_sei, sei_nal

log = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtmp://", "rtmps://", "srt://", "udp://", "tcp://")


@functools.cache
def nvenc_available() -> bool:
    """Whether an h264_nvenc encoder actually opens here (needs an NVIDIA GPU and driver)."""
    try:
        ctx = av.CodecContext.create("h264_nvenc", "w")
        ctx.width, ctx.height, ctx.pix_fmt = 256, 144, "yuv420p"
        ctx.time_base = Fraction(1, 30)
        ctx.open()
        return True
    except Exception:
        return False


def parse_rate(v: str) -> int:
    """'2500k' -> 2_500_000 (bits/s); 'k' and 'm' suffixes."""
    v = v.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(v[-1:], 1)
    return int(float(v[:-1] if mult != 1 else v) * mult)


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk, or the user's quota, is full (ENOSPC, EDQUOT: from the OS, or from FFmpeg as
    PyAV's ``av.error.OSError``, which carries the errno)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def is_network(output: str) -> bool:
    return output.lower().startswith(NETWORK_SCHEMES)


def resolve(s) -> tuple[str, str | None, dict]:
    """(target, muxer or None for a guess from the name, muxer options) for settings ``s``;
    creates the folder of a file or HLS output."""
    out = s.output
    low = out.lower()
    if low.startswith(("rtmp://", "rtmps://")):
        return out, s.format or "flv", {}
    if is_network(out):
        return out, s.format or "mpegts", {}
    if low.endswith(".m3u8") or out.endswith("/") or os.path.isdir(out) or s.format == "hls":
        path = out if low.endswith(".m3u8") else os.path.join(out, "index.m3u8")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        opts = {"hls_time": str(s.hls_time), "hls_list_size": str(s.hls_list_size),
                "hls_flags": "delete_segments+independent_segments"}
        return path, "hls", opts
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    opts = {}
    if low.endswith((".mp4", ".mov")) and s.fragmented_mp4:
        opts["movflags"] = "frag_keyframe+empty_moov+default_base_moof"
        opts["flush_packets"] = "1"  # each fragment reaches the file, not just the IO buffer
    fmt = s.format or {".mkv": "matroska", ".ts": "mpegts", ".flv": "flv"}.get(os.path.splitext(low)[1])
    return out, fmt, opts


class SrtRelay:
    """The system ffmpeg copying MPEG-TS from its stdin to an ``srt://`` target."""

    def __init__(self, target: str) -> None:
        exe = system_ffmpeg()
        if exe is None:
            raise ConnectionError("srt:// output needs the system ffmpeg (the PyAV wheel lacks libsrt), "
                                  "which is not on PATH (or LIVECC_FFMPEG)")
        args = [exe, "-hide_banner", "-loglevel", "error", "-f", "mpegts", "-fflags", "nobuffer",
                "-probesize", "65536", "-analyzeduration", "200000", "-i", "pipe:0",
                "-c", "copy", "-f", "mpegts", target]  # an argv list: no shell
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.stdin = self.proc.stdin

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise ConnectionError(f"ffmpeg relay exited with {self.proc.returncode}")

    def close(self) -> None:
        try:
            self.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class CountedFile:
    """A file the HLS muxer writes (a segment, the playlist), opened through PyAV's ``io_open``. FFmpeg's HLS muxer
    ignores its files' write errors: on a full disk its segments came out empty or cut short and nobody heard of
    it. Here every failed write is kept in ``owner.write_errors`` (``owner.failing`` until a write succeeds again)
    and the rest of that file is dropped, as FFmpeg's own file IO does after an error; the muxer goes on, so the
    stream resumes with the next segment once space returns. A file that cannot be created (no space, a folder
    made read-only) is such a file too, with nothing in it: an error raised here would only be printed by PyAV
    as a traceback, and end the stream. Its folder gone (``ENOENT``) is not counted: the encoder sees the folder
    missing and starts the output again."""

    def __init__(self, path: str, owner: "Output") -> None:
        self.path, self.owner, self.failed = path, owner, False
        self.f = None
        try:
            self.f = open(path, "wb", buffering=0)  # unbuffered: an error belongs to the write that met it
        except OSError as e:
            if e.errno == errno.ENOENT:
                self.failed = True
            else:
                self._fail(e)

    def _fail(self, e: OSError) -> None:
        self.failed = True
        self.owner.write_errors.append(e)
        self.owner.failing = True

    def write(self, data) -> int:
        """Write all of ``data`` (short writes continued); a failure is recorded, not raised."""
        view = memoryview(data)
        try:
            while view and not self.failed:
                view = view[self.f.write(view):]
                self.owner.failing = False
        except OSError as e:
            self._fail(e)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        """As a file's ``seek`` (0 for a file that could not be created)."""
        return self.f.seek(offset, whence) if self.f is not None else 0

    def tell(self) -> int:
        """As a file's ``tell`` (0 for a file that could not be created)."""
        return self.f.tell() if self.f is not None else 0

    def flush(self) -> None:
        """Nothing to do: the file is unbuffered."""

    def close(self) -> None:
        """Close the file; an error is recorded, not raised."""
        if self.f is not None:
            try:
                self.f.close()
            except OSError as e:
                self._fail(e)


class Output:
    """One open output: a PyAV container with one H.264 stream (``width`` x ``height`` yuv420p at
    ``s.fps``), maybe an AAC stream (48 kHz stereo), maybe an SRT relay.

    Raises whatever PyAV raises when the target cannot be opened (OSError, av.FFmpegError)."""

    AUDIO_RATE = 48000
    # s: within this of its place, audio stays contiguous; beyond, it re-anchors (a gap) or drops chunks until it
    # is back in place. ITU-R BT.1359: sound 45 ms early is where viewers start to notice
    AUDIO_SYNC_S = 0.045

    def __init__(self, s, width: int, height: int, codec: str, audio: bool = False) -> None:
        self.s = s
        self.relay: SrtRelay | None = None
        target, fmt, options = resolve(s)
        self.kind = fmt
        self.is_network = is_network(target)
        self.path = None if self.is_network else target  # the file (HLS: the playlist) on this machine
        self.write_errors: list[OSError] = []  # HLS: its files' failed writes (CountedFile), oldest first
        self.failing = False  # HLS: the last write failed
        if target.lower().startswith("srt://"):
            self.relay = SrtRelay(target)
            self.container = av.open(self.relay.stdin, "w", format="mpegts")
        elif fmt == "hls" and "://" not in target:  # a local folder (a URL is left to FFmpeg)
            self.container = av.open(target, "w", format=fmt, options=options,
                                     io_open=lambda url, flags, opts: CountedFile(url, self))
        else:
            self.container = av.open(target, "w", format=fmt, options=options)
        rate = Fraction(s.fps).limit_denominator(1001)
        self.time_base = 1 / rate
        st = self.container.add_stream(codec, rate=rate)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.codec_context.time_base = self.time_base
        st.codec_context.gop_size = max(1, round(s.gop_s * s.fps))
        copts = {}
        if codec == "libx264":
            copts = {"preset": s.preset, "tune": "zerolatency"}
            if s.bitrate is None:
                copts["crf"] = str(s.crf)
        elif codec == "h264_nvenc":
            copts = {"preset": "p4", "tune": "ll", "zerolatency": "1"}
        if s.bitrate is not None:
            st.codec_context.bit_rate = parse_rate(s.bitrate)
        st.codec_context.options = copts
        st.codec_context.max_b_frames = 0
        self.stream = st
        self._cc: dict[int, bytes] = {}  # pts -> SEI NAL for the packet of that frame
        self.astream = None
        self.resampler = None
        self.a_in_next: int | None = None  # output sample where the next input chunk continues
        self.a_out = 0  # output sample of the next resampled frame
        self.a_catching_up = False  # dropping chunks until the write head is back where they belong
        if audio:
            ast = self.container.add_stream("aac", rate=self.AUDIO_RATE)
            ast.codec_context.layout = "stereo"
            ast.codec_context.format = "fltp"
            ast.codec_context.time_base = Fraction(1, self.AUDIO_RATE)
            ast.codec_context.bit_rate = parse_rate(s.audio_bitrate)
            self.astream = ast

    def _mux_video(self, packet) -> None:
        nal = self._cc.pop(packet.pts, None) if packet.pts is not None else None
        if nal is not None:
            # PyAV cannot attach A/53 side data to a frame (read-only), so the SEI goes into the
            # encoded access unit: a new packet with the same timing and flags
            new = av.Packet(insert_sei(bytes(packet), nal))
            new.pts, new.dts, new.time_base = packet.pts, packet.dts, packet.time_base
            new.is_keyframe = packet.is_keyframe
            new.stream = self.stream
            packet = new
        self.container.mux(packet)

    def write(self, vframe, pts: int, cc_pairs: list[int] | None = None) -> int:
        """Encode and mux one frame at ``pts`` (in 1/fps), with CEA-608 ``cc_pairs`` (16-bit byte
        pairs) in its SEI; the number of packets muxed (a network output connects at the first)."""
        vframe.pts = pts
        vframe.time_base = self.time_base
        if cc_pairs:
            self._cc[pts] = sei_nal(cc_pairs)
        n = 0
        for packet in self.stream.encode(vframe):
            self._mux_video(packet)
            n += 1
        if len(self._cc) > 256:  # an encoder that drops frames: forget what never came out
            for k in sorted(self._cc)[:-256]:
                del self._cc[k]
        if self.relay is not None:
            self.relay.check()
        return n

    def _new_resampler(self):
        return av.AudioResampler(format="fltp", layout="stereo", rate=self.AUDIO_RATE, frame_size=1024)

    def _encode_audio(self, frames) -> int:
        n = 0
        for f in frames:
            f.pts = self.a_out
            f.time_base = Fraction(1, self.AUDIO_RATE)
            self.a_out += f.samples
            for packet in self.astream.encode(f):
                self.container.mux(packet)
                n += 1
        return n

    def write_audio(self, aframe, start_s: float) -> str:
        """Encode one input audio frame whose first sample belongs at output time ``start_s``
        (seconds from the output's start). Returns what happened: 'ok' (contiguous), 'anchored'
        (a new start, or a gap: it belongs more than ``AUDIO_SYNC_S`` after the write head),
        'late' (dropped: before the output began, or the write head is more than ``AUDIO_SYNC_S``
        past where it belongs; chunks are dropped until the head is back within half a chunk).
        Raises what PyAV's resampler or encoder raise."""
        rate = self.AUDIO_RATE
        start = round(start_s * rate)
        length = round(aframe.samples * rate / aframe.sample_rate) if aframe.sample_rate else 0
        tol = round(self.AUDIO_SYNC_S * rate)
        what = "ok"
        if self.a_in_next is None or start - self.a_in_next > tol:
            if start + length <= 0:
                return "late"  # before the output began
            if self.resampler is not None and self.a_in_next is not None:
                self._encode_audio(self.resampler.resample(None))  # the rest before the gap
            self.resampler = self._new_resampler()
            self.a_in_next = self.a_out = max(0, start, self.a_out)
            self.a_catching_up = False
            what = "anchored"
        elif start < self.a_in_next - tol or (self.a_catching_up and start + length // 2 < self.a_in_next):
            self.a_catching_up = True  # the track is late (the picture's offset shrank): skip until back in place
            return "late"
        self.a_catching_up = False
        aframe.pts = None
        try:
            frames = self.resampler.resample(aframe)
        except ValueError:  # the input's format/rate/layout changed: a fresh resampler
            self._encode_audio(self.resampler.resample(None))
            self.resampler = self._new_resampler()
            frames = self.resampler.resample(aframe)
        self.a_in_next += length
        self._encode_audio(frames)
        return what

    def close(self, flush: bool = True) -> None:
        """Flush the encoders (when ``flush``), finalise the container, end the relay."""
        try:
            if flush:
                if self.astream is not None:
                    try:
                        if self.resampler is not None:
                            self._encode_audio(self.resampler.resample(None))
                        for packet in self.astream.encode(None):
                            self.container.mux(packet)
                    except Exception as e:  # the video still gets finalised
                        log.warning("burn-in audio flush: %s", redact(str(e)))
                for packet in self.stream.encode(None):
                    self._mux_video(packet)
        finally:
            try:
                self.container.close()
            finally:
                if self.relay is not None:
                    self.relay.close()
