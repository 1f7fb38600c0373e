"""Burn-in sink: the live video re-encoded with the current caption drawn on it.

Output: ``rtmp://`` / ``rtmps://`` (FLV), ``srt://`` (MPEG-TS through a system ``ffmpeg``
relay, since the PyAV wheels lack libsrt), ``udp://`` / ``tcp://`` (MPEG-TS), HLS (a path ending
in ``.m3u8`` or ``/``, or an existing folder) or a file (``.mp4``, ``.mkv``, ``.flv``, ``.ts``;
finalised on stop, the MP4's moov written).

Timing: an encoder thread runs a monotonic clock at ``fps``. On every tick it takes the newest
input frame (or, with ``delay_s``, the newest one that arrived at least ``delay_s`` ago) and
encodes it; when the input stops, the last frame repeats, so viewers keep the stream (before
the first frame, black frames are sent when ``width``/``height`` are set). If encoding falls
behind by more than a second, ticks are skipped (counted) so the output stays in real time.

Captions: a caption shows from when it is produced (with ``delay_s``: from when the frames it
describes are shown) until a newer one replaces it or ``ttl_s`` passes. Silence (empty text or
the model's ' ...') changes nothing: the previous caption stays until it expires.

Audio (``audio: true``, the default): when the input has audio, the capture thread decodes it
and the dispatcher hands it over in order (``on_audio``). It is resampled to 48 kHz stereo and
encoded as AAC next to the video, each chunk placed at its stream time + the same
stream-time -> wall-clock offset as the video frames (the median ``arrival - pts`` of recent
frames, + half a frame: a frame shows at the tick after it arrives) + ``delay_s``, so it lines up
with the frames it came with; within 0.25 s of that position it is written contiguously, beyond
that it re-anchors (a gap) or drops the chunk (a step back: counted ``audio_late``).
The output's streams are fixed when it opens: the first open waits up to ``audio_wait_s`` after
the first tick for audio (the frames of that wait are kept and written, nothing is lost); an
input whose audio starts later gets audio only after a reconnect of a network output. While
the input is gone, video repeats its last frame and the audio track simply has a gap (no
silence is inserted). Audio failures are counted (``audio_errors``) and never stop the video.

Network outputs reconnect with backoff when the server goes away; the clock keeps running.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import threading
import time
from fractions import Fraction
from typing import Literal

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont
from pydantic import field_validator

from pipeline.fanout.sink import DeliveryError, Sink, SinkSettings, redact

log = logging.getLogger(__name__)

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/local/share/fonts")
DEFAULT_FONT = "DejaVuSans.ttf"


def find_font(path: str | None) -> str | None:
    """The configured font file, or DejaVu Sans from fonts-dejavu-core; None: Pillow's default."""
    if path:
        if os.path.isfile(path):
            return path
        for d in FONT_DIRS:
            p = os.path.join(d, path)
            if os.path.isfile(p):
                return p
        raise FileNotFoundError(f"font not found: {path}")
    for d in FONT_DIRS:
        p = os.path.join(d, DEFAULT_FONT)
        if os.path.isfile(p):
            return p
    return None


class BurninSettings(SinkSettings):
    output: str = "burnin.mp4"
    format: str | None = None  # muxer override (flv, mpegts, mp4, matroska, hls)
    fps: float = 30.0
    width: int | None = None  # None: the first input frame's size
    height: int | None = None
    codec: Literal["auto", "libx264", "h264_nvenc"] = "auto"  # auto: NVENC when it opens, else x264
    preset: str = "veryfast"
    bitrate: str | None = "2500k"  # None: constant quality (crf)
    crf: int = 23
    gop_s: float = 2.0
    fragmented_mp4: bool = False  # MP4 playable even without a clean stop
    hls_time: float = 2.0
    hls_list_size: int = 6
    # caption look
    font: str | None = None  # TTF/OTF path or a file name in the system font folders
    font_size: int | None = None  # px; None: frame height / 18
    text_color: str = "#FFFFFF"
    box_color: str = "#000000B4"  # RGBA: the last byte is the box opacity
    outline_color: str = "#000000"
    outline: int = 0  # text outline width in px
    box_padding: int | None = None  # px; None: font size / 2
    position: Literal["bottom", "top", "middle"] = "bottom"
    align: Literal["center", "left", "right"] = "center"
    margin: float = 0.05  # fraction of the frame height from the edge
    max_width: float = 0.9  # fraction of the frame width
    max_lines: int = 3  # longer captions keep their last lines
    answer_prefix: str = "A: "
    # timing
    ttl_s: float = 5.0  # a caption disappears this long after it appeared, unless replaced
    delay_s: float = 0.0  # fixed output delay, to line captions up with their frames
    # audio passthrough (when the input has audio)
    audio: bool = True
    audio_bitrate: str = "128k"
    audio_wait_s: float = 0.5  # the first open waits this long after the first tick for audio
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 10.0
    stop_timeout_s: float = 10.0

    @field_validator("text_color", "box_color", "outline_color")
    @classmethod
    def _colour(cls, v: str) -> str:
        try:
            ImageColor.getcolor(v, "RGBA")
        except ValueError:
            raise ValueError(f"not a colour: {v!r} (use a name, #RRGGBB or #RRGGBBAA)") from None
        return v

    @field_validator("fps")
    @classmethod
    def _fps(cls, v: float) -> float:
        if not 1 <= v <= 120:
            raise ValueError("fps must be between 1 and 120")
        return v

    @field_validator("audio_wait_s")
    @classmethod
    def _audio_wait(cls, v: float) -> float:
        if not 0 <= v <= 2:
            raise ValueError("audio_wait_s must be between 0 and 2")
        return v

    @field_validator("width", "height")
    @classmethod
    def _even(cls, v: int | None) -> int | None:
        if v is not None and (v < 16 or v % 2):
            raise ValueError("must be an even number of pixels >= 16")
        return v


class CaptionRenderer:
    """Draws caption text into a semi-transparent box; returns what to blend onto a frame."""

    def __init__(self, s: BurninSettings) -> None:
        self.s = s
        self.font_path = find_font(s.font)
        self._cache: dict = {}

    def _font(self, size: int):
        if self.font_path is None:
            return ImageFont.load_default(size)
        return ImageFont.truetype(self.font_path, size)

    @staticmethod
    def wrap(text: str, font, max_w: float) -> list[str]:
        lines: list[str] = []
        cur = ""
        for word in text.split():
            while font.getlength(word) > max_w and len(word) > 1:  # break very long words
                cut = len(word)
                while cut > 1 and font.getlength(word[:cut]) > max_w:
                    cut -= 1
                if cur:
                    lines.append(cur)
                    cur = ""
                lines.append(word[:cut])
                word = word[cut:]
            trial = f"{cur} {word}" if cur else word
            if font.getlength(trial) <= max_w:
                cur = trial
            else:
                lines.append(cur)
                cur = word
        if cur:
            lines.append(cur)
        return lines

    def render(self, text: str, width: int, height: int):
        """(y0, x0, premultiplied rgb float32, 1 - alpha float32) or None for no caption."""
        key = (text, width, height)
        if key in self._cache:
            return self._cache[key]
        s = self.s
        size = s.font_size or max(12, round(height / 18))
        font = self._font(size)
        pad = s.box_padding if s.box_padding is not None else max(2, size // 2)
        max_w = max(size, width * s.max_width - 2 * pad)
        lines = self.wrap(" ".join(text.split()), font, max_w)[-s.max_lines :]
        if not lines:
            return None
        ascent, descent = font.getmetrics()
        line_h = ascent + descent + max(1, size // 6)
        text_w = int(max(font.getlength(line) for line in lines)) + 2 * s.outline
        text_h = line_h * len(lines) - max(1, size // 6) + 2 * s.outline
        box_w = min(width, text_w + 2 * pad)
        box_h = min(height, text_h + 2 * pad)
        img = Image.new("RGBA", (box_w, box_h), (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        draw.rounded_rectangle((0, 0, box_w - 1, box_h - 1), radius=max(2, pad // 2), fill=ImageColor.getcolor(s.box_color, "RGBA"))
        colour = ImageColor.getcolor(s.text_color, "RGBA")
        stroke = ImageColor.getcolor(s.outline_color, "RGBA")
        for i, line in enumerate(lines):
            lw = font.getlength(line)
            x = {"center": (box_w - lw) / 2, "left": pad, "right": box_w - pad - lw}[s.align]
            # text drawn on its own layer and composited, so a translucent box stays translucent
            layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
            ImageDraw.Draw(layer).text(
                (x, pad + s.outline + i * line_h), line, font=font, fill=colour,
                stroke_width=s.outline, stroke_fill=stroke,
            )
            img = Image.alpha_composite(img, layer)
        rgba = np.asarray(img, dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        premul = rgba[..., :3] * alpha * 255.0
        margin = round(s.margin * height)
        y0 = {"bottom": height - margin - box_h, "top": margin, "middle": (height - box_h) // 2}[s.position]
        x0 = {"center": (width - box_w) // 2, "left": round((1 - s.max_width) / 2 * width), "right": width - box_w - round((1 - s.max_width) / 2 * width)}[s.align]
        out = (max(0, y0), max(0, x0), premul, 1.0 - alpha)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = out
        return out

    @staticmethod
    def blend(image: np.ndarray, overlay) -> np.ndarray:
        y0, x0, premul, inv = overlay
        h = min(premul.shape[0], image.shape[0] - y0)
        w = min(premul.shape[1], image.shape[1] - x0)
        out = image.copy()
        region = out[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        out[y0 : y0 + h, x0 : x0 + w] = (region * inv[:h, :w] + premul[:h, :w] + 0.5).astype(np.uint8)
        return out


_NVENC_OK: bool | None = None


def nvenc_available() -> bool:
    """Whether an h264_nvenc encoder actually opens here (needs an NVIDIA GPU and driver)."""
    global _NVENC_OK
    if _NVENC_OK is None:
        try:
            import av

            ctx = av.CodecContext.create("h264_nvenc", "w")
            ctx.width, ctx.height, ctx.pix_fmt = 256, 144, "yuv420p"
            ctx.time_base = Fraction(1, 30)
            ctx.open()
            _NVENC_OK = True
        except Exception:
            _NVENC_OK = False
    return _NVENC_OK


class _Output:
    """One open output: a PyAV container with one H.264 stream, maybe an AAC stream (and maybe
    an ffmpeg relay)."""

    AUDIO_RATE = 48000
    AUDIO_TOLERANCE = 0.25  # s: within this, audio stays contiguous; beyond, re-anchor or drop

    def __init__(self, s: BurninSettings, width: int, height: int, codec: str, audio: bool = False) -> None:
        import av

        self.s = s
        self.relay: subprocess.Popen | None = None
        target, fmt, options = self.resolve(s)
        self.kind = fmt
        if target.startswith("srt://"):
            # PyAV's FFmpeg has no libsrt: hand MPEG-TS to the system ffmpeg, which has it
            self.relay = subprocess.Popen(
                ["ffmpeg", "-hide_banner", "-loglevel", "error", "-fflags", "nobuffer", "-probesize", "65536",
                 "-analyzeduration", "200000", "-f", "mpegts", "-i", "pipe:0",
                 "-c", "copy", "-f", "mpegts", target],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            )
            self.container = av.open(self.relay.stdin, "w", format="mpegts")
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
            st.codec_context.bit_rate = _parse_rate(s.bitrate)
        st.codec_context.options = copts
        st.codec_context.max_b_frames = 0
        self.stream = st
        self.astream = None
        self.resampler = None
        self.a_in_next: int | None = None  # output sample where the next input chunk continues
        self.a_out = 0  # output sample of the next resampled frame
        if audio:
            ast = self.container.add_stream("aac", rate=self.AUDIO_RATE)
            ast.codec_context.layout = "stereo"
            ast.codec_context.format = "fltp"
            ast.codec_context.time_base = Fraction(1, self.AUDIO_RATE)
            ast.codec_context.bit_rate = _parse_rate(s.audio_bitrate)
            self.astream = ast

    @staticmethod
    def resolve(s: BurninSettings) -> tuple[str, str | None, dict]:
        out = s.output
        low = out.lower()
        if low.startswith(("rtmp://", "rtmps://")):
            return out, s.format or "flv", {}
        if low.startswith(("srt://", "udp://", "tcp://")):
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

    @property
    def is_network(self) -> bool:
        return self.s.output.lower().startswith(("rtmp://", "rtmps://", "srt://", "udp://", "tcp://"))

    def write(self, vframe, pts: int) -> int:
        """Encode and mux one frame; the number of packets muxed (a network output connects at the first)."""
        vframe.pts = pts
        vframe.time_base = self.time_base
        n = 0
        for packet in self.stream.encode(vframe):
            self.container.mux(packet)
            n += 1
        if self.relay is not None and self.relay.poll() is not None:
            raise ConnectionError(f"ffmpeg relay exited with {self.relay.returncode}")
        return n

    def _new_resampler(self):
        import av

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
        """Encode one input audio frame whose first sample belongs at output time ``start_s``.
        Returns what happened: 'ok', 'anchored' (a new start or a gap), 'late' (dropped: before
        the output began, or a step back in time)."""
        rate = self.AUDIO_RATE
        start = round(start_s * rate)
        length = round(aframe.samples * rate / aframe.sample_rate) if aframe.sample_rate else 0
        tol = round(self.AUDIO_TOLERANCE * rate)
        what = "ok"
        if self.a_in_next is None or start - self.a_in_next > tol:
            if start + length <= 0:
                return "late"  # before the output began
            if self.resampler is not None and self.a_in_next is not None:
                self._encode_audio(self.resampler.resample(None))  # the rest before the gap
            self.resampler = self._new_resampler()
            self.a_in_next = self.a_out = max(0, start, self.a_out)
            what = "anchored"
        elif start < self.a_in_next - tol:
            return "late"  # a step back in time (re-anchored input): keep the track monotonic
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
        try:
            if flush:
                if self.astream is not None:
                    try:
                        if self.resampler is not None:
                            self._encode_audio(self.resampler.resample(None))
                        for packet in self.astream.encode(None):
                            self.container.mux(packet)
                    except Exception as e:  # the video still gets finalised
                        log.warning("burn-in audio flush: %s", redact(e))
                for packet in self.stream.encode(None):
                    self.container.mux(packet)
        finally:
            try:
                self.container.close()
            finally:
                if self.relay is not None:
                    try:
                        self.relay.stdin.close()
                    except Exception:
                        pass
                    try:
                        self.relay.wait(5)
                    except subprocess.TimeoutExpired:
                        self.relay.kill()
                        self.relay.wait(5)


def _parse_rate(v: str) -> int:
    v = v.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(v[-1:], 1)
    return int(float(v[:-1] if mult != 1 else v) * mult)


class BurninSink(Sink):
    name = "burnin"
    wants_frames = True
    target_field = "output"
    Settings = BurninSettings

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._lock = threading.Lock()
        self._latest = None
        self._delayed: collections.deque = collections.deque(maxlen=4096)
        self._pending: list = []  # (caption text, caption start, produced monotonic)
        self._active: tuple[str, float] | None = None  # (text, shown since)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.counters = collections.Counter()
        self.codec: str | None = None
        self.size: tuple[int, int] | None = None
        self.t0: float | None = None  # monotonic time of output pts 0
        self.renderer = CaptionRenderer(self.settings)
        self.wants_audio = self.settings.audio  # the dispatcher reads it when the sink is added
        # AudioChunks in order; bounded: the oldest go first
        self._audio: collections.deque = collections.deque()
        self._audio_max = int(100 * (self.settings.delay_s + 5))  # ~45 chunks a second
        self._offsets: collections.deque = collections.deque(maxlen=90)  # recent frames' arrival - pts
        self._audio_seen = False
        self.has_audio = False  # the current output has an audio stream

    # --- sink API (called from the dispatcher's worker thread) -------------------------
    def start(self) -> None:
        self.renderer.font_path  # fail fast on a missing font (raised in __init__ already)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="burnin-encoder", daemon=True)
        self._thread.start()

    def _check(self) -> None:
        """Report a dead encoder on every caption/event (sticky: it does not restart by itself,
        a file output would be overwritten); frames are not checked, to keep the log quiet."""
        if self.error is not None:
            raise DeliveryError(redact(f"burn-in encoder failed: {type(self.error).__name__}: {self.error}"))

    def on_frame(self, frame) -> None:
        with self._lock:
            self._latest = frame
            self._offsets.append(frame.arrival - frame.pts)
            if self.settings.delay_s > 0:
                self._delayed.append(frame)

    def on_audio(self, chunk) -> None:
        if not self.settings.audio:
            return
        with self._lock:
            self._audio.append(chunk)
            if len(self._audio) > self._audio_max:
                self._audio.popleft()
                self.counters["audio_dropped"] += 1
            self._audio_seen = True

    def on_caption(self, caption) -> None:
        if caption.is_silence:
            return  # the previous caption stays until it expires
        text = " ".join(caption.text.split())
        if caption.kind == "answer":
            text = self.settings.answer_prefix + text
        with self._lock:
            self._pending.append((text, caption.start, time.monotonic()))
        self._check()

    def on_event(self, event) -> None:
        self._check()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(self.settings.stop_timeout_s)
            if t.is_alive():
                log.error("burn-in encoder did not finish within %.1f s", self.settings.stop_timeout_s)
        self._check()

    def describe(self) -> str:
        return f"burnin:{redact(self.settings.output)}"

    def stats(self) -> dict:
        return {**self.counters, "codec": self.codec, "size": self.size, "audio": self.has_audio,
                "encoder_alive": bool(self._thread and self._thread.is_alive())}

    # --- encoder thread ----------------------------------------------------------------
    def _pick_frame(self, now: float):
        with self._lock:
            if self.settings.delay_s <= 0:
                return self._latest
            cutoff = now - self.settings.delay_s
            chosen = None
            while self._delayed and self._delayed[0].arrival <= cutoff:
                chosen = self._delayed.popleft()
            if chosen is not None:
                self._shown = chosen
            return getattr(self, "_shown", None)

    def _update_caption(self, now: float, shown_pts: float | None) -> str | None:
        s = self.settings
        with self._lock:
            keep = []
            for text, start, produced in self._pending:
                due = s.delay_s <= 0 or now >= produced + s.delay_s or (shown_pts is not None and shown_pts >= start)
                if due:
                    self._active = (text, now)
                else:
                    keep.append((text, start, produced))
            self._pending = keep
            if self._active is not None and now - self._active[1] >= s.ttl_s:
                self._active = None
            return self._active[0] if self._active else None

    def _codec(self) -> str:
        if self.settings.codec == "auto":
            return "h264_nvenc" if nvenc_available() else "libx264"
        return self.settings.codec

    def _size_for(self, frame) -> tuple[int, int] | None:
        s = self.settings
        if s.width and s.height:
            return s.width, s.height
        if frame is None:
            return None
        h, w = frame.image.shape[:2]
        if s.width:  # keep the aspect ratio
            return s.width, max(16, round(h * s.width / w / 2) * 2)
        if s.height:
            return max(16, round(w * s.height / h / 2) * 2), s.height
        return w - w % 2, h - h % 2

    def _run(self) -> None:
        s = self.settings
        out: _Output | None = None
        period = 1.0 / s.fps
        n = 0  # output tick (pts in 1/fps)
        pts_base = 0
        backoff = s.reconnect_initial_s
        next_open = 0.0
        fresh = False  # opened, no packet muxed yet: not connected yet (RTMP connects at the first packet)
        connected_once = False
        cache_key = None
        vframe = None
        hold: list = []  # (frame, tick) composed while the first open waits for audio
        hold_until: float | None = None
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                frame = self._pick_frame(now)
                if self.size is None:
                    self.size = self._size_for(frame)
                    if self.size is None:
                        self._stop.wait(0.01)
                        continue
                    self.codec = self._codec()
                    self.t0 = now
                    n = 0
                    hold_until = now + s.audio_wait_s
                # the clock: tick n is due at t0 + n / fps
                due = self.t0 + n * period
                if now < due:
                    self._stop.wait(due - now)
                    continue
                behind = int((now - due) / period)
                if behind > s.fps:  # more than a second behind: skip ahead, stay real-time
                    self.counters["ticks_skipped"] += behind
                    n += behind
                if out is None and s.audio and not self._audio_seen and not self.counters["opens"] \
                        and hold_until is not None and now < hold_until:
                    # the first open waits a little for audio, so the output can get an audio
                    # stream; the frames of the wait are kept and written when it opens
                    frame_text = self._update_caption(now, frame.pts if frame is not None else None)
                    key = (id(frame), frame_text)
                    if key != cache_key or vframe is None:
                        vframe = self._compose(frame, frame_text)
                        cache_key = key
                    hold.append((vframe, n))
                    self.counters["ticks_waiting_audio"] += 1
                    n += 1
                    continue
                if out is None:
                    if now < next_open:
                        n += 1
                        self.counters["ticks_offline"] += 1
                        continue
                    try:
                        with_audio = s.audio and self._audio_seen
                        out = _Output(s, *self.size, self.codec, audio=with_audio)
                        self.has_audio = with_audio
                        pts_base = hold[0][1] if hold else n
                        fresh = True
                        self.counters["opens"] += 1
                        cache_key = None
                    except Exception as e:
                        hold.clear()
                        if not _Output.resolve(s)[0].lower().startswith(("rtmp", "srt", "udp", "tcp")):
                            raise
                        log.warning("burn-in output %s: %s; retry in %.1f s", redact(s.output), redact(e), backoff)
                        next_open = time.monotonic() + backoff
                        backoff = min(s.reconnect_max_s, backoff * 2)
                        n += 1
                        continue
                shown_pts = frame.pts if frame is not None else None
                text = self._update_caption(now, shown_pts)
                key = (id(frame), text)
                if key != cache_key or vframe is None:
                    vframe = self._compose(frame, text)
                    cache_key = key
                else:
                    self.counters["repeated"] += 1
                try:
                    muxed = 0
                    held, hold = hold, []
                    for hframe, tick in held:
                        muxed += out.write(hframe, tick - pts_base)
                        self.counters["frames_out"] += 1
                    muxed += out.write(vframe, n - pts_base)
                    self.counters["frames_out"] += 1
                    if text:
                        self.counters["frames_captioned"] += 1
                    if fresh and muxed:  # connected: only now is it a reconnect, and the backoff reset
                        fresh = False
                        backoff = s.reconnect_initial_s
                        if connected_once:
                            self.counters["reconnects"] += 1
                            log.info("burn-in output %s reconnected", redact(s.output))
                        connected_once = True
                except Exception as e:
                    if not out.is_network:
                        raise
                    if fresh:  # the server is still not there
                        log.warning("burn-in output %s: %s; retry in %.1f s", redact(s.output), redact(e), backoff)
                    else:
                        log.warning("burn-in output %s lost: %s; reconnecting", redact(s.output), redact(e))
                    try:
                        out.close(flush=False)
                    except Exception:
                        pass
                    out = None
                    next_open = time.monotonic() + backoff
                    backoff = min(s.reconnect_max_s, backoff * 2)
                self._pump_audio(out, now, self.t0 + pts_base * period)
                n += 1
        except BaseException as e:  # reported on the next sink call
            log.error("burn-in encoder: %s", redact(e))
            self.error = e
        finally:
            if out is not None:
                try:
                    out.close(flush=True)
                except Exception as e:
                    if self.error is None and not out.is_network:
                        self.error = e
                    log.warning("burn-in output close: %s", redact(e))

    def _pump_audio(self, out: "_Output | None", now: float, out_t0: float) -> None:
        """Encode the audio that is due (up to 0.1 s ahead of the video); never raises."""
        with self._lock:
            # where a chunk belongs in wall-clock time: its stream time + the offset of the video
            # frames (the median arrival - pts of the recent ones; a frame is shown at the tick
            # after it arrives, half a period later on average) + delay_s. Taken when the chunk is
            # written, so the first anchor already sees the frames of the first open's wait
            if self._offsets:
                off = sorted(self._offsets)[len(self._offsets) // 2] + 0.5 / self.settings.fps
            else:
                off = None
            due = []
            while self._audio:
                chunk = self._audio[0]
                at = chunk.pts + (chunk.arrival - chunk.pts if off is None else off) + self.settings.delay_s
                if at > now + 0.1:
                    break
                due.append((at, self._audio.popleft()))
        if out is None or out.astream is None:
            if due:
                self.counters["audio_discarded"] += len(due)  # no output, or one without audio
            return
        for i, (at, chunk) in enumerate(due):
            try:
                what = out.write_audio(chunk.frame, at - out_t0)
                self.counters["audio_" + what] += 1
            except Exception as e:
                self.counters["audio_errors"] += 1
                if self.counters["audio_errors"] <= 3:
                    log.warning("burn-in audio: %s", redact(e))
                if out.is_network:  # probably the connection: the video write will tell
                    self.counters["audio_discarded"] += len(due) - i - 1
                    return

    def _compose(self, frame, text: str | None):
        import av

        w, h = self.size
        if frame is None:
            img = np.zeros((h, w, 3), np.uint8)
        else:
            img = frame.image
            if img.shape[0] != h or img.shape[1] != w:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                img = vf.reformat(width=w, height=h, format="rgb24").to_ndarray()
        if text:
            overlay = self.renderer.render(text, w, h)
            if overlay is not None:
                img = self.renderer.blend(img, overlay)
        # converted once here, so a repeated frame costs only the encode
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24").reformat(format="yuv420p")
