"""Relay through the system ffmpeg, for protocols and devices the PyAV wheel lacks (SRT, v4l2).

``ffmpeg [input options] -i SOURCE -map 0:v:0 -c copy -f mpegts pipe:1`` (an argv list: no
shell, so nothing in SOURCE is interpreted) is started; PyAV then demuxes its stdout. The process is killed (SIGKILL: nothing to finalise in a copy to a pipe, and
an ffmpeg waiting in an SRT listener ignores SIGTERM for > 5 s) and reaped on close.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile

from pipeline.capture.errors import CaptureError
from pipeline.capture.sources import Source, system_ffmpeg
from pipeline.redact import redact

log = logging.getLogger(__name__)


class Relay:
    """One system-ffmpeg process copying ``source`` into a pipe; ``stdout`` is what PyAV reads."""

    def __init__(self, source: Source):
        exe = system_ffmpeg()
        if exe is None:
            raise CaptureError(f"{source.display}: needs the system ffmpeg (PyAV lacks {source.kind}), "
                               "which is not on PATH")
        in_opts = dict(source.options)
        if source.format:
            in_opts["f"] = source.format
        # raw webcam video cannot go into MPEG-TS; NUT carries anything with -c copy
        args = [exe, "-nostdin", "-hide_banner", "-loglevel", "error",
                *(a for k, v in in_opts.items() for a in (f"-{k}", str(v))), "-i", source.url,
                "-map", "0:v:0", "-c", "copy", "-f", source.relay_format, "pipe:1"]
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: nobody has to drain it
        self.source = source
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, bufsize=0)
        self.stdout = self.proc.stdout
        log.info("relaying %s through %s (pid %d)", source.display, exe, self.proc.pid)

    def error_tail(self, limit: int = 300) -> str:
        """The last line(s) ffmpeg wrote to stderr, redacted, one line."""
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return redact(lines[-1][-limit:]) if lines else ""

    def close(self) -> None:
        """Kill and reap the process; close the pipe and the stderr file. Idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            log.error("relay ffmpeg pid %d did not exit after SIGKILL", self.proc.pid)
        for f in (self.stdout, self._stderr):
            try:
                f.close()
            except OSError:
                pass
