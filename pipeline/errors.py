"""Every error a user may see: one line, no traceback (``livecc: error: ...``, exit status 2).

A leaf module: it imports nothing from the project, so the command line, the config and every layer
below can raise and catch these without importing each other (or torch). The modules that raise
them re-export the names (``from pipeline.engine import ContextFullError`` keeps working).
"""

from __future__ import annotations


class UserError(RuntimeError):
    """An expected failure: printed as one line, exit status 2, no traceback."""


class ConfigError(UserError):
    """A configuration that can't be used; the message names the file and the key."""


class PipelineError(RuntimeError):
    """The pipeline cannot run (a source that won't open, an engine that keeps failing)."""


class PluginError(LookupError):
    """An unknown plugin name, or one that failed to import."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class ContextFullError(RuntimeError):
    """The turn does not fit in what is left of the context window."""


class VideoFileError(RuntimeError):
    """The file cannot be captioned; the message says why."""


class CaptureError(RuntimeError):
    """The source cannot be captured: dead URL, no video stream, unsupported codec, not video, ...

    ``transient`` is True for failures a retry may cure (refused, timed out, network reset);
    False for ones it will not (no such file, no video stream, not a media file).
    """

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(" ".join(str(message).split()))  # always one line
        self.transient = transient


#: What ``livecc`` prints as one line with exit status 2.
USER_ERRORS = (UserError, ModelLoadError, VideoFileError, ContextFullError, PluginError)


def first_line(err: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (at most ``limit`` characters of it), for a one-line log of why a
    faster path (a compiled kernel, a CUDA graph, cuDNN) was given up for a slower one."""
    text = str(err).splitlines()[0][:limit] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
