"""The sink interface: where captions go.

A sink is a small object with five methods. The dispatcher (``pipeline/fanout/dispatch.py``) calls
them from one worker thread per sink, so a sink never has to be thread-safe against its own
calls, and a slow or broken sink never stalls the engine or the other sinks.

    class MySink(Sink):
        name = "mine"
        target_field = "path"          # what ``--sink mine:TARGET`` fills in

        class Settings(SinkSettings):  # one YAML block per sink; unknown keys are errors
            path: str
            verbose: bool = False

        def start(self): ...
        def on_caption(self, caption): ...
        def stop(self): ...

Third-party sinks register the class under the ``livecc.sinks`` entry point group, exactly
as the built-ins in ``plugins/sinks/`` do (see ``pipeline/plugins.py``).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..types import AudioChunk, Caption, Frame, StreamEvent

try:  # the shared redaction helper, when present
    from ..redact import redact as _shared_redact
except Exception:  # pragma: no cover - fallback until pipeline/redact.py exists
    _shared_redact = None

_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?i)(?P<key>[?&;](?:key|token|password|passwd|pass|secret|auth|sig|signature|access_token|streamkey|passphrase)=)[^&\s]+"
)
_OAUTH = re.compile(r"(?i)oauth:[a-z0-9]+")
_RTMP_KEY = re.compile(r"(?i)(?P<pre>rtmps?://[^/\s]+/[^/\s]+/)[^\s?/]+")


def redact(text: Any) -> str:
    """Hide stream keys, tokens and URL passwords in ``text`` before it is logged or shown."""
    s = str(text)
    if _shared_redact is not None:
        return _OAUTH.sub("oauth:***", _shared_redact(s))
    s = _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", s)
    s = _QUERY_SECRET.sub(lambda m: m.group("key") + "***", s)
    s = _OAUTH.sub("oauth:***", s)
    s = _RTMP_KEY.sub(lambda m: m.group("pre") + "***", s)
    return s


class SinkSettings(BaseModel):
    """Base of every sink's settings block: unknown keys are rejected with a clear message."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DeliveryError(RuntimeError):
    """Raised by a sink that already retried on its own: the dispatcher counts it, no retry."""


class Sink:
    """Base class of all sinks. Override what you need; the defaults do nothing."""

    name: ClassVar[str] = "sink"
    #: True when the sink needs video frames (burn-in); others never see ``on_frame``.
    wants_frames: ClassVar[bool] = False
    #: True when the sink wants the input's decoded audio (burn-in passthrough); others never
    #: see ``on_audio``. May be overridden per instance (from a setting) before the dispatcher adds it.
    wants_audio: ClassVar[bool] = False
    #: Which setting the ``kind:TARGET`` command-line shorthand fills (None: no target).
    target_field: ClassVar[str | None] = None

    class Settings(SinkSettings):
        pass

    def __init__(self, settings: SinkSettings | dict | None = None, **overrides: Any) -> None:
        if isinstance(settings, SinkSettings):
            data = settings.model_dump()
        else:
            data = dict(settings or {})
        data.update(overrides)
        self.settings = self.Settings.model_validate(data)

    # --- lifecycle -------------------------------------------------------------------
    def mount(self, server) -> None:
        """The process's HTTP server (``pipeline.server.HttpServer``), offered once before it and
        this sink start; not called when ``server.enabled`` is false. A sink that serves pages
        adds them with ``server.mount([Route(...), ...])`` (the server checks Host, Origin, token
        and size for them) and may keep ``server`` to reach its event loop. Raise ``ValueError``
        for a route that cannot be mounted. Default: nothing."""

    def start(self) -> None:
        """Open files, connections, servers. May raise; the dispatcher retries with backoff."""

    def on_caption(self, caption: Caption) -> None:
        """A caption (or an answer). ``caption.is_silence`` marks the model's ' ...'."""

    def on_frame(self, frame: Frame) -> None:
        """A video frame (only when ``wants_frames``); frames are delivered latest-wins."""

    def on_audio(self, chunk: AudioChunk) -> None:
        """Decoded input audio (only when ``wants_audio``), in order; a full queue drops the oldest."""

    def on_event(self, event: StreamEvent) -> None:
        """Something happened to the stream (source_lost, source_back, ...)."""

    def stop(self) -> None:
        """Flush and close everything. Called once, after the last delivery."""

    # --- reporting -------------------------------------------------------------------
    def stats(self) -> dict:
        """Sink-specific figures for the status display (counters, connection state). Cheap,
        read from another thread: return plain values, no locks held for long."""
        return {}

    def describe(self) -> str:
        """A one-line, secret-free description for logs and the status display."""
        tf = self.target_field
        target = getattr(self.settings, tf, None) if tf else None
        return f"{self.name}:{redact(target)}" if target else self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
