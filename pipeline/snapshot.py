"""The snapshot of one stream that the status display, ``/api/status`` and ``/metrics`` all read.

A ``TypedDict`` (it goes out as JSON as it is): the keys are the contract between ``app.Pipeline.snapshot``
and its readers (``status.py``, ``metrics.py``, ``control.py``, ``serve.py``).
"""

from __future__ import annotations

from typing import Any, TypedDict


class Snapshot(TypedDict):
    stream: str  # the stream's id ("main" for livecc run)
    state: str  # new | loading | starting | running | stopping | stopped
    ready: bool  # model loaded and frames flowing
    live: bool  # the engine thread is alive (or still starting)
    error: str | None  # the fatal error, secrets redacted
    source: str  # the source as displayed (secrets redacted)
    model: str
    device: str | None
    uptime_s: float
    paused: bool
    query: str  # the commentary instruction in force
    turns: int  # turns served for this stream, across context rollovers
    context_tokens: int  # tokens in the stream's KV-cache row
    busy_s: float  # seconds the engine has been on this stream's turn in progress (0 when idle)
    input_fps: float  # decoded frames per second
    sampled_fps: float  # frames per second taken for the model
    turns_per_s: float
    latency_p50_s: float | None  # clip ready -> caption out, seconds
    latency_p95_s: float | None
    queue: dict[str, int]  # maxsize, waiting, put, dropped
    capture: dict[str, Any]  # the capture thread's counters (frames, sessions, lost, ...)
    sampler: dict[str, Any]
    gpu: dict[str, int]  # allocated, reserved (bytes; empty on CPU)
    quantize: str  # the language model's weights: none | int8 | int4 | fp8 (engine.quantize)
    weight_bytes: int  # device memory held by the model's weights (0 before the model is loaded)
    last_caption: dict | None  # Caption.to_json(tokens=False)
    recent: list[dict]
    sinks: dict[str, dict]  # per sink: state, captions, dropped, errors, ...
