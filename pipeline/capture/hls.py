"""What an HLS playlist says about the stream: has the encoder ended it, how long are its segments.

FFmpeg's HLS demuxer plays the segments; this reads the playlist itself (with the ``m3u8`` parser)
for the two things the demuxer does not tell its caller (RFC 8216):

- ``#EXT-X-ENDLIST`` (4.3.3.4): no segment will be added. A live stream that gets it has ended:
  the end of its segments is the end of the source, not a lost connection.
- ``#EXT-X-TARGETDURATION`` (4.3.3.1): the longest segment, in seconds. A live playlist gains a
  segment about every target duration, so packets arrive in bursts up to that far apart: the read
  timeout that tells a stalled playlist from a slow one must be longer (:func:`stall_timeout`).

A master playlist is followed to its first variant, the one FFmpeg's first video stream comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import m3u8

from pipeline.capture.errors import CaptureError
from pipeline.redact import redact

STALL_TARGETS = 3  # a live playlist with no new segment for this many target durations has stalled


@dataclass(frozen=True)
class Playlist:
    ended: bool  # #EXT-X-ENDLIST: the encoder will add no segment
    target_duration: float  # seconds
    media_sequence: int  # the first segment's sequence number
    segments: tuple[str, ...]  # absolute segment URIs, oldest first


def fetch(url: str, timeout: float) -> Playlist:
    """The media playlist at ``url`` (a master playlist: its first variant's).

    Raises :class:`CaptureError` (``transient``: a retry may cure it) with a redacted message.
    """
    try:
        pl = m3u8.load(url, timeout=timeout)
        if pl.is_variant and pl.playlists:
            pl = m3u8.load(pl.playlists[0].absolute_uri, timeout=timeout)
    except Exception as e:  # urllib's HTTPError / URLError / timeouts, or a body that is no playlist
        raise CaptureError(redact(f"{url}: playlist: {e}"), transient=True) from None
    return Playlist(bool(pl.is_endlist), float(pl.target_duration or 0), int(pl.media_sequence or 0),
                    tuple(s.absolute_uri for s in pl.segments))


def stall_timeout(playlist: Playlist, read_timeout: float) -> float:
    """Seconds without a packet before a live playlist counts as stalled: ``STALL_TARGETS`` target
    durations, and never less than ``read_timeout``."""
    return max(read_timeout, STALL_TARGETS * playlist.target_duration)
