"""The one exception type capture raises (defined with the other user-facing errors in ``pipeline.errors``)."""

from ..errors import CaptureError  # noqa: F401  (re-exported)
