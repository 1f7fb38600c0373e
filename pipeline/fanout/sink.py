"""The sink interface: where captions go.

A sink is a small object: ``start``, ``on_caption``, ``on_frame``, ``on_audio``, ``on_event``,
``stop`` (called in that order of life), ``stats`` and ``describe`` (read by the status display);
override what it needs. The dispatcher (``pipeline/fanout/dispatch.py``) calls
them from one worker thread per sink, so a sink never has to be thread-safe against its own
calls, and a slow or broken sink never stalls the engine or the other sinks.

    class MySink(Sink):
        name = "mine"
        target_field = "path"          # what ``--sink mine:TARGET`` fills in

        class Settings(CaptionText):   # one YAML block per sink; unknown keys are errors
            path: str                  # (CaptionText adds include_silence/include_answers/answer_prefix)
            verbose: bool = False

        def start(self): ...
        def on_caption(self, caption):
            text = self.text_of(caption)   # None: this sink's settings leave the caption out
            ...
        def stop(self): ...

Third-party sinks register the class under the ``livecc.sinks`` entry point group, exactly
as the built-ins in ``plugins/sinks/`` do (see ``pipeline/plugins.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..redact import redact
from ..types import AudioChunk, Caption, Frame, StreamEvent


class SinkSettings(BaseModel):
    """Base of every sink's settings block: unknown keys are rejected with a clear message."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CaptionText(SinkSettings):
    """The caption text policy, one set of settings for every sink that shows text
    (see :meth:`Sink.text_of`). A sink changes a default by redeclaring the field."""

    include_silence: bool = False  # the model's ' ...' (nothing new) turns
    include_answers: bool = True  # answers to viewers' questions
    answer_prefix: str = "A: "  # put before an answer's text


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
    #: The file the sink writes when its target is an existing folder (HLS: ``index.m3u8``), so that the
    #: checks before start accept the folder an earlier run made. None: a folder is not a valid target.
    folder_target: ClassVar[str | None] = None
    #: Set by the dispatcher before each call: the ``time.monotonic()`` by which the call must
    #: return (the start of the call + the dispatcher's ``call_timeout``, or its shutdown
    #: deadline when earlier), else the sink is reported hung. A sink that retries on its own
    #: keeps its retries inside it. None: not called by a dispatcher, no limit.
    deadline: float | None = None

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

    # --- helpers -------------------------------------------------------------------
    def text_of(self, caption: Caption) -> str | None:
        """The text to show for ``caption``, or None when this sink's :class:`CaptionText`
        settings leave it out (silence, answers). Whitespace runs (line breaks included) become
        one space; an answer gets ``answer_prefix``. Settings without the mixin get its defaults."""
        s = self.settings if isinstance(self.settings, CaptionText) else _DEFAULT_TEXT
        if caption.is_silence and not s.include_silence:
            return None
        if caption.kind == "answer" and not s.include_answers:
            return None
        text = " ".join(caption.text.split())
        return s.answer_prefix + text if caption.kind == "answer" else text

    def describe(self) -> str:
        """A one-line, secret-free description for logs and the status display."""
        tf = self.target_field
        target = getattr(self.settings, tf, None) if tf else None
        return f"{self.name}:{redact(target)}" if target else self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


_DEFAULT_TEXT = CaptionText()
