"""Metrics of a running pipeline: Prometheus families in their own registry, plus the rolling
figures (rates, latency percentiles) the status display and ``/api/status`` show.

Counters and histograms are updated where things happen (the engine loop, stream events);
figures that live in other components (frames decoded, clips dropped by the queue, reconnects,
sink queues, GPU memory) are read at scrape time from a snapshot callable, so nothing polls.
Labels are fixed vocabularies (turn kind, phase, event kind, sink name): never URLs or tokens.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
RATE_WINDOW_S = 5.0  # rates (fps, turns/s) are averaged over this many seconds
LATENCY_WINDOW = 120  # percentiles over the last this many captions
EVENT_KINDS = ("source_lost", "source_back", "source_error", "source_ended", "format_changed",
               "sampling_paused", "sampling_resumed", "context_reset", "context_rollover", "captioning_paused", "captioning_resumed",
               "stream_moved")


class WindowRate:
    """Events per second over the last ``window`` seconds (thread-safe, O(1) to mark)."""

    def __init__(self, window: float = RATE_WINDOW_S, maxlen: int = 4096):
        self.window = window
        self._t: collections.deque[float] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._start = time.monotonic()

    def mark(self, t: float | None = None) -> None:
        with self._lock:
            self._t.append(time.monotonic() if t is None else t)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._t and self._t[0] < now - self.window:
                self._t.popleft()
            n = len(self._t)
        span = min(self.window, max(now - self._start, 1e-3))
        return n / span


class LatencyWindow:
    """The last N latencies, for p50/p95 on the status line."""

    def __init__(self, n: int = LATENCY_WINDOW):
        self._v: collections.deque[float] = collections.deque(maxlen=n)
        self._lock = threading.Lock()

    def add(self, v: float) -> None:
        with self._lock:
            self._v.append(v)

    def percentile(self, p: float) -> float | None:
        with self._lock:
            vals = sorted(self._v)
        if not vals:
            return None
        k = min(len(vals) - 1, max(0, round(p / 100 * (len(vals) - 1))))
        return vals[k]


class Metrics:
    """The pipeline's metric families, in a registry of their own (not prometheus_client's global)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.turns = Counter("livecc_turns", "Engine turns completed", ["kind"], registry=r)
        self.silent_turns = Counter("livecc_silent_turns", "Turns where the model said nothing new (' ...')",
                                    registry=r)
        self.turn_errors = Counter("livecc_turn_errors", "Turns that failed", registry=r)
        self.latency = Histogram("livecc_caption_latency_seconds",
                                 "Clip complete (last frame sampled) to caption out", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.answer_latency = Histogram("livecc_answer_latency_seconds", "Question received to answer out",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.phase = Histogram("livecc_turn_phase_seconds", "Time per engine phase of a turn", ["phase"],
                               buckets=PHASE_BUCKETS, registry=r)
        self.new_tokens = Counter("livecc_generated_tokens", "Tokens generated", registry=r)
        self.context_tokens = Gauge("livecc_context_tokens", "Tokens in the engine's context (KV cache)",
                                    registry=r)
        self.paused = Gauge("livecc_paused", "1 while captioning is paused from the control API", registry=r)
        self.events = Counter("livecc_stream_events", "Stream events by kind", ["kind"], registry=r)
        self.query_changes = Counter("livecc_query_changes", "Commentary query changes", registry=r)
        for k in EVENT_KINDS:
            self.events.labels(k)
        for k in ("caption", "answer"):
            self.turns.labels(k)
        for ph in ("vision", "prefill", "decode"):
            self.phase.labels(ph)
        # rolling figures for the status display
        self.input_rate = WindowRate()
        self.sample_rate = WindowRate()
        self.turn_rate = WindowRate()
        self.latencies = LatencyWindow()
        self._live: _LiveCollector | None = None

    # -- updates from the engine loop -------------------------------------------------------------
    def turn(self, caption, stats) -> None:
        """One caption (or answer) is out; ``stats`` is the engine's TurnStats."""
        self.turns.labels(caption.kind).inc()
        if caption.kind == "caption":
            self.turn_rate.mark()
            self.latency.observe(caption.latency_s)
            self.latencies.add(caption.latency_s)
            if caption.is_silence:
                self.silent_turns.inc()
        else:
            self.answer_latency.observe(caption.latency_s)
        if stats is not None:
            self.phase.labels("vision").observe(stats.vision_s)
            self.phase.labels("prefill").observe(stats.prefill_s)
            self.phase.labels("decode").observe(stats.decode_s)
            self.new_tokens.inc(stats.new_tokens)
            self.context_tokens.set(stats.context)

    def event(self, kind: str) -> None:
        if kind in EVENT_KINDS:  # a fixed label set: unknown kinds are not turned into labels
            self.events.labels(kind).inc()

    def bind(self, snapshot: Callable[[], dict]) -> None:
        """Read figures owned by other components at scrape time through ``snapshot()``."""
        if self._live is None:
            self._live = _LiveCollector(snapshot)
            self.registry.register(self._live)
        else:
            self._live.snapshot = snapshot

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Families computed from a pipeline snapshot when Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        s = self.snapshot()
        c = s.get("capture", {})
        q = s.get("queue", {})
        g = s.get("gpu", {})

        def gauge(name, doc, value):
            m = GaugeMetricFamily(name, doc)
            m.add_metric([], float(value or 0))
            return m

        def counter(name, doc, value):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], float(value or 0))
            return m

        yield counter("livecc_frames_decoded", "Frames decoded from the source", c.get("frames"))
        yield gauge("livecc_input_fps", f"Decoded frames per second (last {RATE_WINDOW_S:g} s)", s.get("input_fps"))
        yield gauge("livecc_sampled_fps", f"Frames sampled for the model per second (last {RATE_WINDOW_S:g} s)",
                    s.get("sampled_fps"))
        yield gauge("livecc_turns_per_second", f"Caption turns per second (last {RATE_WINDOW_S:g} s)",
                    s.get("turns_per_s"))
        yield counter("livecc_clips", "Clips made by the sampler", q.get("put"))
        yield counter("livecc_clips_dropped", "Clips dropped because the engine was behind", q.get("dropped"))
        yield gauge("livecc_queue_depth", "Clips waiting for the engine", q.get("waiting"))
        yield counter("livecc_reconnects", "Source reconnections", c.get("reconnects"))
        yield counter("livecc_source_lost", "Times the source was lost", c.get("lost"))
        yield counter("livecc_decode_errors", "Damaged packets skipped", c.get("decode_errors"))
        yield counter("livecc_late_samples", "Samples that took the newest frame because the due one was late",
                      s.get("sampler", {}).get("late"))
        yield gauge("livecc_gpu_memory_bytes", "GPU memory allocated by the engine (0 on CPU)", g.get("allocated"))
        yield gauge("livecc_gpu_memory_reserved_bytes", "GPU memory reserved by the engine (0 on CPU)",
                    g.get("reserved"))
        yield gauge("livecc_weight_bytes", "Device memory held by the model's weights", s.get("weight_bytes"))
        mode = GaugeMetricFamily("livecc_quantize", "1 for the weight mode in use (engine.quantize)", labels=["mode"])
        mode.add_metric([s.get("quantize") or "none"], 1.0)
        yield mode
        yield gauge("livecc_ready", "1 once the model is loaded and the source delivers frames", s.get("ready"))
        sinks = s.get("sinks", {})
        fam = {k: CounterMetricFamily(f"livecc_sink_{k}", doc, labels=["sink"]) for k, doc in (
            ("captions", "Captions delivered to a sink"), ("dropped", "Items a sink's queue dropped"),
            ("frames_dropped", "Frames a frame sink skipped (latest wins)"), ("errors", "Sink call errors"),
            ("hangs", "Sink calls that ran past the timeout"))}
        up = GaugeMetricFamily("livecc_sink_ok", "1 while a sink is healthy", labels=["sink"])
        for name, st in sinks.items():
            for k, m in fam.items():
                m.add_metric([name], float(st.get(k, 0)))
            up.add_metric([name], 1.0 if st.get("state") in ("ok", "starting") else 0.0)
        yield from fam.values()
        yield up
