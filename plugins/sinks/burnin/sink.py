"""The burn-in and restream sinks: the live video re-encoded to an output (``output.py``), with
the current caption drawn on it (``burnin``) and/or carried as CEA-608 closed captions in the
H.264 SEI (``cc: 608``; ``restream`` draws nothing).

Timing: an encoder thread runs a monotonic clock at ``fps``. On every tick it takes the newest
input frame (or, with ``delay_s``, the newest one that arrived at least ``delay_s`` ago) and
encodes it; when the input stops, the last frame repeats, so viewers keep the stream (before
the first frame, black frames are sent when ``width``/``height`` are set). If encoding falls
behind by more than a second, ticks are skipped (counted) so the output stays in real time.

Size: the output keeps the size it opened with (from ``width``/``height`` or the first frame);
an input that changes shape is scaled to fit with its aspect ratio kept, centred on black
(letterbox or pillarbox).

Captions: a caption shows from when it is produced (with ``delay_s``: from the frame of its
start time) until a newer one replaces it or ``ttl_s`` passes, both on the ticks' clock (tick n is due at
t0 + n / fps: a tick processed late does not move a caption in the output). Silence (empty text or
the model's ' ...') changes nothing: the previous caption stays until it expires. CEA-608 follows
the same times on the frame it changes (pop-on captions known ``delay_s`` ahead are preloaded;
otherwise characters take about 1/30 s per two).

Audio (``audio: true``, the default): when the input has audio, the capture thread decodes it
and the dispatcher hands it over in order (``on_audio``). It is resampled to 48 kHz stereo and
encoded as AAC next to the video, each chunk placed at its stream time + the offset the picture
really got: the median of ``tick time - pts`` over the last 90 frames at the tick each first showed
(so a slow start, a tick processed late or ``delay_s`` move sound and picture alike); within 45 ms of that
position it is written contiguously, beyond that it re-anchors (a gap) or drops chunks until it is back in
place (counted ``audio_late``). Before any frame has shown, a chunk goes at its arrival + ``delay_s``.
The output's streams are fixed when it opens: the first open waits up to ``audio_wait_s`` after
the first tick for audio (the frames of that wait are kept and written, nothing is lost); an
input whose audio starts later gets audio only after a reconnect of a network output. While
the input is gone, video repeats its last frame and the audio track simply has a gap (no
silence is inserted). Audio failures are counted (``audio_errors``) and never stop the video.

Network outputs reconnect with ``pipeline.backoff.Backoff`` when the server goes away; the clock
keeps running. A file output that fails (disk full) stops the sink with the error; a fragmented
MP4 keeps every fragment written before the failure.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Literal

import av
import numpy as np
from PIL import ImageColor
from pydantic import field_validator

from pipeline.backoff import Backoff, LogLimit
from pipeline.fanout.outputs import Existing, deleted, open_output
from pipeline.fanout.sink import DeliveryError, Sink, SinkSettings, redact

from .cea608 import Cea608Track, cut_columns, encode_text
from .output import Output, disk_full, is_network, nvenc_available, resolve
from .render import CaptionRenderer, fit_into

log = logging.getLogger(__name__)


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
    fragmented_mp4: bool = True  # MP4 playable up to the last keyframe after a crash or a full disk
    existing: Existing = "new"  # an earlier run's file: new (name.1.mp4, the old one left alone), overwrite
    hls_time: float = 2.0
    hls_list_size: int = 6
    # caption look (drawn)
    draw: bool = True  # draw the caption into the picture
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
    # closed captions (CEA-608 in the H.264 SEI)
    cc: Literal["off", "608"] = "off"
    cc_mode: Literal["rollup", "popon"] = "rollup"
    cc_rows: int = 2  # roll-up depth (RU2-RU4) or the most pop-on rows, 2-4
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

    @field_validator("cc_rows")
    @classmethod
    def _cc_rows(cls, v: int) -> int:
        if not 2 <= v <= 4:
            raise ValueError("cc_rows must be 2, 3 or 4")
        return v

    @field_validator("width", "height")
    @classmethod
    def _even(cls, v: int | None) -> int | None:
        if v is not None and (v < 16 or v % 2):
            raise ValueError("must be an even number of pixels >= 16")
        return v


class RestreamSettings(BurninSettings):
    output: str = "restream.mp4"
    draw: bool = False
    cc: Literal["off", "608"] = "608"


class _Encoder:
    """The encoder thread's state: the output clock, the open output and its reconnect schedule.

    Tick ``n`` is due at ``t0 + n / fps`` (monotonic seconds); output pts = ``n - pts_base``."""

    def __init__(self, sink: "BurninSink") -> None:
        s = sink.settings
        self.sink, self.s = sink, s
        self.period = 1.0 / s.fps
        self.backoff = Backoff(initial=s.reconnect_initial_s, max_delay=s.reconnect_max_s)
        self.out: Output | None = None
        self.errors_seen = 0  # of self.out.write_errors, already counted
        self.cc: Cea608Track | None = None
        self.n = 0
        self.pts_base = 0
        self.failures = 0  # failed opens/connections in a row
        self.retry_log = LogLimit()  # an output down for hours: the first failed attempts each warn, then one a minute
        self.next_open = 0.0
        self.fresh = False  # opened, no packet muxed yet (RTMP connects at the first packet)
        self.connected_once = False
        self.cache_key = None
        self.vframe = None
        self.hold: list = []  # (frame, tick, text) composed while the first open waits for audio
        self.last_frame = None  # the input frame of the last tick written or held
        self.hold_until: float | None = None
        self.reclaim = False  # a file output stopped by a full disk: the next open claims a new file (claim_next)

    def wait_first_frame(self, now: float, frame) -> bool:
        """Fix the output size, codec and clock at the first frame (or at once with width+height)."""
        sink = self.sink
        if sink.size is None:
            sink.size = sink._size_for(frame)
            if sink.size is None:
                return False
            sink.codec = sink._codec()
            sink.t0 = now
            self.n = 0
            self.hold_until = now + self.s.audio_wait_s
        return True

    def _vframe(self, frame, text):
        key = (id(frame), text)
        if key != self.cache_key or self.vframe is None:
            self.vframe = self.sink._compose(frame, text)
            self.cache_key = key
        else:
            self.sink.counters["repeated"] += 1
        return self.vframe

    def note_shown(self, frame) -> None:
        """Record where the picture of this tick sits in the output clock (tick time - pts) when the
        frame shows for the first time: the audio is placed by the same offset."""
        if frame is not None and frame is not self.last_frame:
            self.sink._picture_offsets.append(self.tick_time - frame.pts)
        self.last_frame = frame

    def hold_for_audio(self, now: float, frame) -> bool:
        """The first open waits a little for audio, so the output can get an audio stream; the
        frames of the wait are kept and written when it opens. True: this tick was held."""
        sink = self.sink
        if self.out is not None or not self.s.audio or sink._audio_seen or sink.counters["opens"] \
                or self.hold_until is None or now >= self.hold_until:
            return False
        text = sink._update_caption(self.tick_time, frame.pts if frame is not None else None)
        self.hold.append((self._vframe(frame, text), self.n, text))
        self.note_shown(frame)
        sink.counters["ticks_waiting_audio"] += 1
        return True

    def _retry_later(self, what: str, e: BaseException) -> None:
        self.failures += 1
        delay = self.backoff.delay(self.failures + 1)
        now = time.monotonic()
        note = self.retry_log.check(self.failures, now)
        (log.debug if note is None else log.warning)("%s output %s %s: %s; retry in %.1f s (attempt %d)%s",
                                                     self.sink.name, redact(self.s.output), what, redact(str(e)),
                                                     delay, self.failures, note or "")
        self.next_open = now + delay

    def ensure_open(self, now: float) -> bool:
        """Open the output when it is closed and its retry time has come. False: offline tick."""
        if self.out is not None:
            return True
        sink = self.sink
        if now < self.next_open:
            sink.counters["ticks_offline"] += 1
            return False
        try:
            if self.reclaim:  # after a full disk: a new file next to the one that stopped (name.1.mp4 ...)
                self.claim_next()
            with_audio = self.s.audio and sink._audio_seen
            self.out = Output(self.s, *sink.size, sink.codec, audio=with_audio)
        except Exception as e:
            self.hold.clear()
            if is_network(self.s.output):
                self._retry_later("cannot open", e)
            elif disk_full(e):  # still full: the ticks until the next try are lost (ticks_offline)
                self.reclaim = self.reclaim or self.sink._claimed is not None
                sink._failing = True
                sink._note_loss(1, e)
                self._retry_later("cannot open", e)
            else:
                raise
            return False
        self.reclaim = False
        sink.has_audio = with_audio
        self.errors_seen = 0
        self.pts_base = self.hold[0][1] if self.hold else self.n
        self.fresh = True
        sink.counters["opens"] += 1
        self.cache_key = None
        if self.s.cc == "608":  # a new viewer's decoder starts empty: start the caption channel again
            self.cc = Cea608Track(self.s.cc_mode, self.s.cc_rows, self.s.fps)
            sink._take_prepared()  # shown while offline: only the captions still to come are loaded
            for text in sink._pending_texts():
                self.cc.prepare(text)
        return True

    def _pairs(self, text):
        if self.cc is None:
            return None
        for t in self.sink._take_prepared():
            self.cc.prepare(t)
        return self.cc.frame(text)

    def write_tick(self, now: float, frame) -> None:
        """Compose and encode this tick's frame (after any held ones); a lost network output is
        closed and retried later, a failing file output raises."""
        sink, out = self.sink, self.out
        text = sink._update_caption(self.tick_time, frame.pts if frame is not None else None)
        vframe = self._vframe(frame, text)
        try:
            muxed = 0
            held, self.hold = self.hold, []
            for hframe, tick, htext in held:
                muxed += out.write(hframe, tick - self.pts_base, self._pairs(htext))
                sink.counters["frames_out"] += 1
            muxed += out.write(vframe, self.n - self.pts_base, self._pairs(text))
            sink.counters["frames_out"] += 1
            self.note_shown(frame)
            if text:
                sink.counters["frames_captioned"] += 1
            if self.fresh and muxed:  # connected: only now is it a reconnect, and the backoff reset
                self.fresh = False
                sink.output_starts.append(self.pts_base * self.period)
                self.failures = 0
                if self.connected_once:
                    sink.counters["reconnects"] += 1
                    log.info("%s output %s reconnected", sink.name, redact(self.s.output))
                self.connected_once = True
        except Exception as e:
            if not out.is_network:
                if self.output_gone():
                    self.restart_deleted()  # an HLS folder removed just before a segment was opened in it
                elif disk_full(e):
                    self.stop_full(e)
                else:
                    raise
                return
            self._retry_later("not reachable" if self.fresh else "lost", e)
            try:
                out.close(flush=False)
            except Exception:
                pass
            self.out = None

    def output_gone(self) -> bool:
        """Whether the open file output lost its name under the running sink: the file or its folder deleted (or
        replaced); what is written to it then is lost. An HLS output: its folder gone. Network outputs: False."""
        out = self.out
        if out is None or out.path is None:
            return False
        if out.kind == "hls":
            return not os.path.isdir(os.path.dirname(os.path.abspath(out.path)))
        lock = self.sink._lock_fd  # the claimed file: the inode the muxer writes
        return deleted(lock) if lock is not None else not os.path.exists(out.path)

    def restart_deleted(self) -> None:
        """The output was deleted under the sink (see :meth:`output_gone`): say so once, drop the lost output and
        claim the path again (its folder made again); the next tick opens a new output there, as a reconnect of a
        network output does. Raises when the path cannot be claimed (a folder now in the way): the encoder stops
        with that error, reported as the sink's."""
        sink, out = self.sink, self.out
        sink.counters["outputs_deleted"] += 1
        log.warning("%s: %s was deleted while being written: writing a new %s", sink.name, out.path, out.path)
        self.out = None
        try:
            out.close(flush=False)  # into the deleted file (HLS: its playlist cannot be written): nothing to keep
        except Exception:
            pass
        if sink._lock_fd is not None:
            os.close(sink._lock_fd)
            sink._lock_fd = None
            claimed, sink._lock_fd = open_output(sink._claimed, "new")
            if str(claimed) != sink._claimed:  # something else took the name meanwhile
                sink._claimed = str(claimed)
                sink.settings = sink.settings.model_copy(update={"output": sink._claimed})
                self.s = sink.settings

    def stop_full(self, e: OSError) -> None:
        """A file output whose disk is full (or over quota): it is closed as it is (a fragmented MP4 plays up to its
        last complete fragment, a TS/MKV up to its last whole packet), the write counted lost and the sink
        ``failed``; the encoder goes on offline and tries, with the reconnect backoff, to open a new file next to it
        (``claim_next``), so the stream resumes once space returns. (Before, the encoder stopped for good.)"""
        sink, out = self.sink, self.out
        self.out = None
        sink._failing = True
        sink._note_loss(1, e)
        try:
            out.close(flush=False)
        except Exception:
            pass
        self.reclaim = sink._claimed is not None
        self._retry_later("cannot write", e)

    def claim_next(self) -> None:
        """The file the output goes on in after a full disk: the one claimed if it is still empty (an attempt that
        could not write even the header), else the next free ``name.N.ext`` of the path asked for (outputs.
        open_output, ``existing: new``). Raises OSError as ``open_output`` (on a full disk, maybe)."""
        sink = self.sink
        if sink._lock_fd is not None and not deleted(sink._lock_fd) and os.fstat(sink._lock_fd).st_size == 0:
            return
        if sink._lock_fd is not None:
            os.close(sink._lock_fd)
            sink._lock_fd = None
        claimed, sink._lock_fd = open_output(sink._asked, "new")
        log.warning("%s: %s could not be written (disk full): going on in %s", sink.name, sink._claimed, claimed)
        sink._claimed = str(claimed)
        sink.counters["outputs_started_after_full_disk"] += 1
        sink.settings = sink.settings.model_copy(update={"output": sink._claimed})
        self.s = sink.settings

    @property
    def tick_time(self) -> float:
        """Monotonic seconds at which this tick is due (t0 + n / fps): captions appear and expire on this clock,
        not on when the tick is processed, so a late tick (a loaded machine) does not move them in the output's
        time (a 608 cue ended 2 frames early under load when they followed the processing time)."""
        return self.sink.t0 + self.n * self.period

    def run(self) -> None:
        sink, s = self.sink, self.s
        while not sink._stop.is_set():
            now = time.monotonic()
            frame = sink._pick_frame(now)
            if not self.wait_first_frame(now, frame):
                sink._stop.wait(0.01)
                continue
            due = sink.t0 + self.n * self.period  # the clock: tick n is due at t0 + n / fps
            if now < due:
                sink._stop.wait(due - now)
                continue
            behind = int((now - due) / self.period)
            if behind > s.fps:  # more than a second behind: skip ahead, stay real-time
                sink.counters["ticks_skipped"] += behind
                self.n += behind
            if self.output_gone():
                self.restart_deleted()
            if not self.hold_for_audio(now, frame) and self.ensure_open(now):
                self.write_tick(now, frame)
                sink._pump_audio(self.out, now, sink.t0 + self.pts_base * self.period)
                self.note_write_errors()
            self.n += 1

    def note_write_errors(self) -> None:
        """Count the output's new failed writes (HLS on a full disk: its muxer goes on without them)."""
        out = self.out
        if out is None:
            return
        self.sink._failing = out.failing
        if len(out.write_errors) > self.errors_seen:
            new, self.errors_seen = len(out.write_errors) - self.errors_seen, len(out.write_errors)
            self.sink._note_loss(new, out.write_errors[-1])

    def close(self) -> None:
        """Finalise the output; a file that cannot be finalised is the sink's error."""
        if self.out is None:
            return
        try:
            self.out.close(flush=True)
        except Exception as e:
            if self.sink.error is None and not self.out.is_network:
                self.sink.error = e
            log.warning("%s output close: %s", self.sink.name, redact(str(e)))
        self.note_write_errors()  # the last segment and the final playlist
        self.out = None


class BurninSink(Sink):
    name = "burnin"
    wants_frames = True
    target_field = "output"
    folder_target = "index.m3u8"  # an existing folder is an HLS output (output.resolve)
    Settings = BurninSettings

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._lock = threading.Lock()
        self._latest = None
        self._shown = None
        self._delayed: collections.deque = collections.deque(maxlen=4096)
        self._pending: list = []  # (caption text, caption start, produced monotonic)
        self._prepared: list[str] = []  # captions for the 608 track to preload
        self._active: tuple[str, float] | None = None  # (text, shown since)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.counters = collections.Counter()
        self.codec: str | None = None
        self.size: tuple[int, int] | None = None
        self.t0: float | None = None  # monotonic time of output pts 0
        # seconds after t0 of each connected output's first frame (pts 0 of that connection), newest last
        self.output_starts: collections.deque[float] = collections.deque(maxlen=16)
        self.renderer = CaptionRenderer(self.settings) if self.settings.draw else None
        self.wants_audio = self.settings.audio  # the dispatcher reads it when the sink is added
        # AudioChunks in order; bounded: the oldest go first
        self._audio: collections.deque = collections.deque()
        self._audio_max = int(100 * (self.settings.delay_s + 5))  # ~45 chunks a second
        self._picture_offsets: collections.deque = collections.deque(maxlen=90)  # tick time - pts, each frame's first tick
        self._audio_seen = False
        self.has_audio = False  # the current output has an audio stream
        self._claimed: str | None = None  # the file name start() took (kept across retried starts)
        self._asked: str | None = None  # the file name asked for (the numbered names go next to it)
        self._lock_fd: int | None = None  # holds the claim (outputs.open_output) until stop
        self._lost_reported = 0  # counters["write_errors"] when the last call reported them
        self._lost_error: str | None = None  # the newest failed write
        self._failing = False  # the output's last write failed (and no write has succeeded since)
        self._lost_log = LogLimit(first=1)  # failed writes: a warning for the first, then at most one a minute

    # --- sink API (called from the dispatcher's worker thread) -------------------------
    def start(self) -> None:
        out = self.settings.output
        # a file (any container: .ts and .flv use the muxers of network outputs too): an earlier run's is never
        # overwritten silently; HLS is a live window that the muxer rotates
        if self._claimed is None and not is_network(out) and resolve(self.settings)[1] != "hls":
            # the lock (an fd kept until stop) keeps a second run from claiming the file before a frame is in it
            claimed, self._lock_fd = open_output(out, self.settings.existing)
            self._claimed, self._asked = str(claimed), out
            if self._claimed != out:
                self.settings = self.settings.model_copy(update={"output": self._claimed})
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-encoder", daemon=True)
        self._thread.start()

    def _check(self, final: bool = False) -> None:
        """Report a dead encoder on every caption/event (sticky: it does not restart by itself,
        a file output would be overwritten); frames are not checked, to keep the log quiet. Failed writes the
        encoder went on after (HLS on a full disk) are reported on every call while its writes fail, once after
        they stop, and at ``stop`` (``final``) when the run had any: the sink lost video."""
        if self.error is not None:
            raise DeliveryError(redact(f"{self.name} encoder failed: {type(self.error).__name__}: {self.error}"))
        lost = self.counters["write_errors"]
        if lost > (0 if final else self._lost_reported) or (self._failing and not final):
            new, self._lost_reported = lost - self._lost_reported, lost
            what = (f"{lost} writes failed in this run" if final else f"{new} writes failed" if new
                    else "its writes still fail")
            raise DeliveryError(redact(f"{self.name} output {self.settings.output}: {what}, video lost: "
                                       f"{self._lost_error}"))

    def _note_loss(self, n: int, error: OSError) -> None:
        """``n`` more failed writes of the output (encoder thread): counted, reported by the next call (see
        :meth:`_check`); a warning for the first, then at most one a minute."""
        self._lost_error = str(error)
        self.counters["write_errors"] += n
        note = self._lost_log.check(self.counters["write_errors"])
        if note is not None:
            log.warning("%s output %s: a write failed (%s): video lost until it can write again "
                        "(counted in write_errors)%s", self.name, redact(self.settings.output), error, note)

    def on_frame(self, frame) -> None:
        with self._lock:
            self._latest = frame
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
            if self.settings.cc == "608":
                # once a caption, for the run (the 608 track starts again at every output open)
                self.counters["cc_dropped_chars"] += encode_text(text, None)[1]
                if self.settings.cc_mode == "popon":  # pop-on shows a caption's last cc_rows rows
                    self.counters["cc_cut_chars"] += cut_columns(text, self.settings.cc_rows)
                if self.settings.delay_s > 0:
                    self._prepared.append(text)
        self._check()

    def on_event(self, event) -> None:
        self._check()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(self.settings.stop_timeout_s)
            if t.is_alive():
                log.error("%s encoder did not finish within %.1f s", self.name, self.settings.stop_timeout_s)
            else:
                if self._claimed is not None and os.path.isfile(self._claimed) and os.path.getsize(self._claimed) == 0:
                    os.unlink(self._claimed)  # stopped before the first frame: no empty file that no player opens
                lock, self._lock_fd = self._lock_fd, None
                if lock is not None:
                    os.close(lock)
        self._check(final=True)

    def describe(self) -> str:
        return f"{self.name}:{redact(self.settings.output)}"

    def stats(self) -> dict:
        return {**self.counters, "codec": self.codec, "size": self.size, "audio": self.has_audio,
                "cc": self.settings.cc, "encoder_alive": bool(self._thread and self._thread.is_alive())}

    # --- encoder thread ----------------------------------------------------------------
    def _run(self) -> None:
        enc = _Encoder(self)
        try:
            enc.run()
        except BaseException as e:  # reported on the next sink call
            log.error("%s encoder: %s", self.name, redact(str(e)))
            self.error = e
        finally:
            enc.close()

    def _pending_texts(self) -> list[str]:
        with self._lock:
            return [text for text, _, _ in self._pending]

    def _take_prepared(self) -> list[str]:
        with self._lock:
            out, self._prepared = self._prepared, []
        return out

    def _pick_frame(self, now: float):
        with self._lock:
            if self.settings.delay_s <= 0:
                return self._latest
            cutoff = now - self.settings.delay_s
            while self._delayed and self._delayed[0].arrival <= cutoff:
                self._shown = self._delayed.popleft()
            return self._shown

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
            # the two due times' difference rounds either side of a ttl of whole frames (1.5e-14 s short at a clock of
            # 1000 s): without the microsecond a caption stayed one frame longer; ticks are >= 1 ms apart
            if self._active is not None and now - self._active[1] >= s.ttl_s - 1e-6:
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

    def _pump_audio(self, out: Output | None, now: float, out_t0: float) -> None:
        """Encode the audio that is due (up to 0.1 s ahead of the video); never raises."""
        # where a chunk belongs in wall-clock time: its stream time + the offset its picture got
        # (``_picture_offsets``, kept by the encoder thread: this one)
        off = sorted(self._picture_offsets)[len(self._picture_offsets) // 2] if self._picture_offsets else None
        with self._lock:
            due = []
            while self._audio:
                chunk = self._audio[0]
                at = chunk.arrival + self.settings.delay_s if off is None else chunk.pts + off
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
                    log.warning("%s audio: %s", self.name, redact(str(e)))
                if out.is_network:  # probably the connection: the video write will tell
                    self.counters["audio_discarded"] += len(due) - i - 1
                    return

    def _compose(self, frame, text: str | None):
        """The output picture for ``frame`` (letterboxed to the output size) with ``text`` drawn
        on it when ``draw``; an ``av.VideoFrame`` in yuv420p."""
        w, h = self.size
        img = np.zeros((h, w, 3), np.uint8) if frame is None else fit_into(frame.image, w, h)
        if text and self.renderer is not None:
            overlay = self.renderer.render(text, w, h)
            if overlay is not None:
                img = self.renderer.blend(img, overlay)
        # converted once here, so a repeated frame costs only the encode
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24").reformat(format="yuv420p")


class RestreamSink(BurninSink):
    """The input re-encoded without drawing, with the captions as CEA-608 closed captions (viewers
    switch them on in the player); every other setting as ``burnin``."""

    name = "restream"
    Settings = RestreamSettings
