"""The one exception type capture raises: a one-line message a user can act on (secrets redacted)."""

from __future__ import annotations


class CaptureError(RuntimeError):
    """The source cannot be captured: dead URL, no video stream, unsupported codec, not video, ...

    ``transient`` is True for failures a retry may cure (refused, timed out, network reset);
    False for ones it will not (no such file, no video stream, not a media file).
    """

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(" ".join(str(message).split()))  # always one line
        self.transient = transient


class NoVideoYet(CaptureError):
    """A live source is up but has shown only audio: joined between keyframes (servers like
    nginx-rtmp hold the video back until the next one), or a stream without video. Transient."""

    def __init__(self, message: str):
        super().__init__(message, transient=True)
