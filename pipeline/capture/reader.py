"""The capture thread: PyAV decodes one source in its own named daemon thread into a RingBuffer.

- Stream time (``Frame.pts``) starts at 0 at the first frame and keeps counting across
  reconnects: after a gap the next session continues at the last pts + the wall-clock gap,
  so a 10 s outage shows as 10 s of stream time, as a viewer experienced it.
- Live sources reconnect with backoff (forever by default); files and lavfi end at EOF.
- A live source that is not up yet is retried with backoff (``wait_for_source``, default: for
  live sources, not for files); one that is up but shows only audio (joined between keyframes)
  is probed again until its video comes, as long as it is up.
- HLS: a playlist that ends (``#EXT-X-ENDLIST``) ends the source like a file (``wait_after_end``:
  wait for a new stream at the URL instead); one that stops updating is a lost source; video
  packets already captured (a reconnect re-reads the newest segment) are decoded, not captured again.
- ``state`` / ``state_reason`` (also in ``stats``) say what the thread is doing: ``opening``,
  ``waiting_for_source`` (the first open failed; retrying), ``waiting_for_video`` (connected, no
  video frame yet), ``running``, ``lost`` (reconnecting), ``ended``, ``failed``, ``stopped``.
- Events (``StreamEvent``) go to ``on_event`` from the capture thread: ``waiting_for_source``,
  ``waiting_for_video`` (once each, with the reason), ``source_lost``, ``source_back`` (at the
  first new frame after a loss), ``source_error`` (fatal: the thread ends, ``error`` holds a
  CaptureError), ``source_ended`` (EOF of a finite source, an ended playlist), ``format_changed``
  (resolution, pixel format, display rotation).
- Audio: with ``on_audio`` set and an audio stream in the input, that stream is demuxed and
  decoded too, and each decoded chunk goes to ``on_audio`` as an ``AudioChunk`` whose ``pts`` is
  on the video's stream time (the same offset as the current session's video frames; audio
  before a session's first video frame is dropped). The callback must not block (the
  dispatcher only queues); an audio decode error or a failing callback is counted, never
  fatal. Without ``on_audio`` (or without an audio stream) only the video stream is demuxed.
- ``stop()`` sets a stop event, kills a relay, and joins; a blocked FFmpeg read returns within
  the source's read timeout (3 s live) or open timeout (5 s), which bounds ``stop()``.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import threading
import time
from typing import Callable

import av

from pipeline.backoff import Backoff, LogLimit
import pipeline.capture.hls as hls
from pipeline.capture.errors import CaptureError, NoVideoYet
from pipeline.capture.inputs import VIDEO_WAIT_US, Input, Picture, describe, open_input
from pipeline.capture.ringbuffer import RingBuffer
from pipeline.capture.sources import Source, resolve
from pipeline.types import AudioChunk, Frame, StreamEvent

log = logging.getLogger(__name__)

JUMP_S = 10.0  # a pts jump larger than this inside one session is a discontinuity, not a gap
# a relay server (nginx-rtmp) can hide an outage inside one session, rewriting the new publisher's
# timestamps to continue the old ones: when the wall-clock gap between two frames exceeds their pts
# gap by more than this, stream time counts the wall-clock gap (not for HLS, which arrives in bursts)
HIDDEN_GAP_S = 1.0
SEEN_PACKETS = 4096  # HLS: video packets remembered to skip re-read ones (over 2 min at 30 fps)
_ids = itertools.count(1)


class _Stopped(Exception):
    pass


class CaptureThread:
    """Decode ``source`` into ``ring`` until EOF (finite sources), a fatal error, or ``stop()``."""

    def __init__(self, source: Source | str, ring: RingBuffer | None = None, *,
                 on_event: Callable[[StreamEvent], None] | None = None,
                 on_audio: Callable[[AudioChunk], None] | None = None,
                 backoff: Backoff = Backoff(), wait_for_source: bool | None = None, wait_after_end: bool = False,
                 name: str | None = None):
        self.source = resolve(source) if isinstance(source, str) else source
        self.ring = ring if ring is not None else RingBuffer()
        self.on_event = on_event
        self.on_audio = on_audio
        self.backoff = backoff
        # False: a first open that fails is an error; None: wait for live sources, not for files
        self.wait_for_source = self.source.live if wait_for_source is None else wait_for_source
        self.wait_after_end = wait_after_end  # an ended HLS playlist: wait for a new stream (else: the end)
        self.error: CaptureError | None = None
        self.ready = threading.Event()  # set at the first frame (or when the thread ends)
        self.done = threading.Event()
        self._stop = threading.Event()
        self._input: Input | None = None
        self._relay = None  # the running relay, if any: stop() kills it to unblock a read
        self._index = 0
        self._last_pts: float | None = None
        self._last_arrival = 0.0
        self._last_format: tuple | None = None
        self.first_arrival: float | None = None  # monotonic time of the first frame (stream time 0)
        self._read_timeout = 0.0  # the open input's (an HLS playlist's stall timeout can be longer)
        self._connected = False  # a frame has come: later failures are losses, retried
        self._attempt = 0  # failed attempts since the last session that brought frames
        self._retry_log = LogLimit()  # a source down for hours: the first attempts each warn, then one a minute
        self._seen: collections.OrderedDict = collections.OrderedDict()  # HLS: (pts, digest) of packets
        self.stats = {"frames": 0, "sessions": 0, "attempts": 0, "lost": 0, "decode_errors": 0,
                      "format_changes": 0, "audio_chunks": 0, "audio_errors": 0, "replayed_packets": 0,
                      "state": "opening", "state_reason": ""}
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=name or f"livecc-capture-{self.source.kind}-{next(_ids)}")

    # -- control -------------------------------------------------------------------------
    def start(self) -> "CaptureThread":
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once a frame is decoded; raise the CaptureError if the capture failed first."""
        self.ready.wait(timeout)
        if self.error is not None and self.stats["frames"] == 0:
            raise self.error
        return self.stats["frames"] > 0

    def stop(self, timeout: float | None = None) -> bool:
        """Stop and join; True if the thread ended within ``timeout`` (default: the bound)."""
        self._stop.set()
        relay = self._relay
        if relay is not None:
            relay.proc.kill()  # unblocks a pipe read (or an open waiting on it); the thread reaps it
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.stop_bound if timeout is None else timeout)
        return not self._thread.is_alive()

    @property
    def stop_bound(self) -> float:
        """How long stop() may take: FFmpeg's blocking calls return within these timeouts (an open
        that waits for a live input's video probes ``VIDEO_WAIT_US`` longer)."""
        probe = VIDEO_WAIT_US / 1e6 if self.source.live and not self.source.relay else 0.0
        return max(self.source.open_timeout + probe, self.source.read_timeout, self._read_timeout) + 2.0

    @property
    def state(self) -> str:
        """What the thread is doing (see the module docstring); ``state_reason`` says why."""
        return self.stats["state"]

    @property
    def state_reason(self) -> str:
        """One redacted line: the last error while waiting or lost, empty while running."""
        return self.stats["state_reason"]

    def _set_state(self, state: str, reason: str = "") -> None:
        self.stats["state_reason"] = reason
        self.stats["state"] = state

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def stream_time(self) -> float:
        return self._last_pts or 0.0

    def __enter__(self) -> "CaptureThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the thread ----------------------------------------------------------------------
    def _emit(self, kind: str, detail: str = "") -> None:
        ev = StreamEvent(kind, round(self.stream_time, 3), detail)
        (log.warning if kind in ("source_lost", "source_error") else log.info)(
            "%s %s at %.2fs: %s", self.source.display, kind, ev.stream_time, detail)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a listener's bug must not kill the capture
                log.exception("stream event listener failed on %s", kind)

    def _run(self) -> None:
        src = self.source
        long_probe = False  # the source showed only audio: probe long enough for a keyframe
        log.info("opening %s", src.display)
        try:
            while not self._stop.is_set():
                try:
                    inp = src.opener(src) if src.opener else open_input(
                        src, on_relay=self._set_relay, probe_us=VIDEO_WAIT_US if long_probe else None)
                    if self._stop.is_set() and inp.relay is not None:
                        inp.close()
                        break
                except NoVideoYet as e:
                    self._relay = None
                    if self._stop.is_set():
                        break
                    if not (self.wait_for_source or self._connected):
                        self._fail(e)
                        return
                    if self.state != "waiting_for_video":
                        self._emit("waiting_for_video", str(e))
                    self._set_state("waiting_for_video", f"{e}: waiting for the first video frame")
                    long_probe = True
                    continue  # the source is up: probe again at once (the probe itself took seconds)
                except CaptureError as e:
                    self._relay = None
                    if self._stop.is_set():
                        break
                    listen_wait = src.listen and e.transient and "timed out" in str(e)
                    if listen_wait:  # nobody pushed to us within the listen window: listen again
                        log.debug("%s: waiting for a publisher", src.display)
                        continue
                    retry = src.live and (self._connected or self.wait_for_source) and \
                        (e.transient or self._connected)
                    if not retry:
                        self._fail(e)
                        return
                    if not self._retry(str(e)):
                        return
                    continue
                long_probe = False
                self.stats["sessions"] += 1
                self._input = inp
                self._read_timeout = inp.read_timeout
                frames_before = self.stats["frames"]
                try:
                    reason = self._session(inp)
                except _Stopped:
                    break
                finally:
                    self._input = self._relay = None
                    inp.close()
                if self._stop.is_set():
                    break
                if inp.playlist is not None and (reason == "end of stream" or "timed out" in reason):
                    # no more segments: a playlist ends only with #EXT-X-ENDLIST; without it, it has stalled
                    try:
                        ended = hls.fetch(src.url, src.open_timeout).ended
                    except CaptureError as e:
                        ended, reason = False, str(e)
                    else:
                        reason = f"{src.display}: the playlist stopped updating (no new segment, no #EXT-X-ENDLIST)"
                    if ended:
                        if not self.wait_after_end:
                            self._end("the playlist ended (#EXT-X-ENDLIST)")
                            return
                        if not self._wait_new_playlist():
                            break
                        continue
                if not src.live:
                    if self.stats["frames"] == 0:  # a file whose every packet is damaged: say so, not "ended"
                        self._fail(CaptureError(f"{src.display}: no frame could be decoded "
                                                f"({self.stats['decode_errors']} damaged packets)"))
                        return
                    self._end(reason)
                    return
                if self.stats["frames"] > frames_before:
                    self.stats["lost"] += 1
                    self._emit("source_lost", reason)
                    self._set_state("lost", reason)
                elif not self._retry(reason):  # nothing new came (a stalled playlist): a failed attempt
                    return
        except Exception as e:  # a bug or an unexpected PyAV error: report, don't hang readers
            log.exception("capture of %s failed", src.display)
            self._fail(CaptureError(describe(src, e)))
        finally:
            if self.state not in ("ended", "failed"):
                self._set_state("stopped")
            self.ring.close()
            self.ready.set()
            self.done.set()

    def _retry(self, reason: str) -> bool:
        """Count a failed attempt, say so, and wait the backoff; False if stopped or given up."""
        self._attempt += 1
        self.stats["attempts"] += 1
        if self.backoff.max_attempts is not None and self._attempt >= self.backoff.max_attempts:
            self._fail(CaptureError(f"gave up after {self._attempt} attempts: {reason}"))
            return False
        if not self._connected:
            if self.state != "waiting_for_source":
                self._emit("waiting_for_source", reason)
            self._set_state("waiting_for_source", reason)
        else:
            self._set_state("lost", reason)
        delay = self.backoff.delay(self._attempt)
        note = self._retry_log.check(self._attempt)
        (log.debug if note is None else log.warning)("%s: attempt %d failed (%s); retrying in %.1fs%s",
                                                     self.source.display, self._attempt, reason, delay, note or "")
        return not self._stop.wait(delay)

    def _wait_new_playlist(self) -> bool:
        """Poll an ended playlist (with backoff) until it is live again; False if stopped."""
        reason = "the playlist ended (#EXT-X-ENDLIST); waiting for a new stream"
        self._emit("source_lost", reason)
        self._set_state("lost", reason)
        attempt = 0
        while True:
            attempt += 1
            if self.backoff.wait(self._stop, attempt):
                return False
            try:
                if not hls.fetch(self.source.url, self.source.open_timeout).ended:
                    return True
            except CaptureError as e:
                log.debug("%s", e)

    def _end(self, reason: str) -> None:
        self._set_state("ended", reason)
        self._emit("source_ended", reason)

    def _set_relay(self, relay) -> None:
        self._relay = relay
        if self._stop.is_set():  # stop() came before the relay existed
            relay.proc.kill()

    def _fail(self, err: CaptureError) -> None:
        self.error = err
        self._set_state("failed", str(err))
        self._emit("source_error", str(err))

    def _session(self, inp: Input) -> str:
        """Decode until EOF or a read error; return why it ended. Raises _Stopped."""
        interval = inp.interval
        raw0 = base = None
        pace0: tuple[float, float] | None = None
        stop = self._stop
        hidden_gaps = self.source.live and self.source.kind != "hls" and not self.source.pace
        wall = False  # the video has no timestamps (wall clock): the audio cannot be placed
        fresh = False  # a new frame came in this session
        if not self._connected:
            self._set_state("waiting_for_video", "connected; waiting for the first decodable video frame")
        try:
            for item in inp.read(audio=self.on_audio is not None, seen=self._seen_before):
                if stop.is_set():
                    raise _Stopped
                if isinstance(item, Exception):
                    self.stats["decode_errors"] += 1  # a damaged packet: skip it, keep the session
                    log.debug("%s: decode error %s", self.source.display, item)
                    continue
                if not isinstance(item, Picture):  # audio
                    if raw0 is not None and not wall:  # stream time is anchored by the video
                        self._audio(item, base - raw0)
                    continue
                if not fresh:
                    fresh = True
                    if self._connected:
                        self._emit("source_back", f"after {self._attempt} attempt(s)")
                    self._connected, self._attempt = True, 0
                    self._set_state("running")
                now = time.monotonic()
                raw = item.time
                if raw is None:  # no timestamps: use the wall clock
                    raw = now
                    wall = True
                if raw0 is None or (self._last_pts is not None and not
                                    (self._last_pts < base + (raw - raw0) <= self._last_pts + JUMP_S)):
                    raw0, base = raw, self._continue_at(now, interval)
                elif hidden_gaps and now - self._last_arrival - (base + raw - raw0 - self._last_pts) > HIDDEN_GAP_S:
                    raw0, base = raw, self._continue_at(now, interval)
                pts = base + (raw - raw0)
                if self.source.pace:
                    if pace0 is None:
                        pace0 = (now, pts)
                    wait = pace0[0] + (pts - pace0[1]) - time.monotonic()
                    if wait > 0 and stop.wait(wait):
                        raise _Stopped
                    if wait < -1.0:  # fell behind by over a second: don't burst to catch up
                        pace0 = (time.monotonic(), pts)
                self._put(item, pts)
        except _Stopped:
            raise
        except (av.error.FFmpegError, OSError, EOFError) as e:
            if stop.is_set():
                raise _Stopped
            return describe(self.source, e)
        return "end of stream"

    def _seen_before(self, packet) -> bool:
        """True if this video packet (pts and bytes) was captured before (counted); else remember it."""
        key = (packet.pts, hashlib.blake2b(memoryview(packet), digest_size=8).digest())
        if key in self._seen:
            self.stats["replayed_packets"] += 1
            return True
        self._seen[key] = None
        if len(self._seen) > SEEN_PACKETS:
            self._seen.popitem(last=False)
        return False

    def _audio(self, packet, offset: float) -> None:
        """Decode one audio packet and hand its chunks on; never raises (video must go on)."""
        try:
            for af in packet.decode():
                if af.time is None:
                    continue
                self.stats["audio_chunks"] += 1
                self.on_audio(AudioChunk(af, af.time + offset, time.monotonic()))
        except Exception as e:
            self.stats["audio_errors"] += 1
            if self.stats["audio_errors"] <= 3:
                log.warning("%s: audio dropped: %s", self.source.display, e)

    def _continue_at(self, now: float, interval: float) -> float:
        """Stream time for the first frame of a session (or after a discontinuity)."""
        if self._last_pts is None:
            return 0.0
        gap = now - self._last_arrival if self.source.live else 0.0
        return self._last_pts + max(interval, gap)

    def _put(self, frame: Picture, pts: float) -> None:
        fmt = frame.format  # as shown: a rotation counts as a change
        if fmt != self._last_format:
            if self._last_format is not None:
                self.stats["format_changes"] += 1
                old = self._last_format
                self._last_pts = pts
                self._emit("format_changed", f"{old[0]}x{old[1]} {old[2]} -> {fmt[0]}x{fmt[1]} {fmt[2]}")
            self._last_format = fmt
        image = frame.rgb()
        arrival = time.monotonic()
        self.ring.put(Frame(image, pts, arrival, self._index))
        self._index += 1
        self._last_pts, self._last_arrival = pts, arrival
        self.stats["frames"] += 1
        if self.first_arrival is None:
            self.first_arrival = arrival
            self.ready.set()
