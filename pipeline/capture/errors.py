"""The one exception type capture raises (defined with the other user-facing errors in ``pipeline.errors``)."""

from __future__ import annotations

from ..errors import CaptureError  # noqa: F401  (re-exported)


class NoVideoYet(CaptureError):
    """A live source is up but has shown only audio: joined between keyframes (servers like
    nginx-rtmp hold the video back until the next one), or a stream without video. Transient."""

    def __init__(self, message: str):
        super().__init__(message, transient=True)
