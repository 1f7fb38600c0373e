"""Real media servers and clients for tests: nginx-rtmp, an ffmpeg publisher, a GStreamer RTSP
server, HLS over a local HTTP server, and ffprobe read-back. Plain helpers and context managers;
``tests/conftest.py`` wraps the common ones as fixtures.

Everything binds 127.0.0.1 on free ports, lives in a temp folder, and is killed on exit.
Readiness is awaited on what the server exposes (a listening socket in /proc/net, a first
line on stdout, a playlist file), never with a fixed sleep.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
FFPROBE = shutil.which("ffprobe") or "ffprobe"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"
SYSTEM_PYTHON = "/usr/bin/python3"  # PyGObject (GStreamer) comes from Debian, not pip
HERE = Path(__file__).resolve().parent


def have(*exes: str) -> bool:
    return all(shutil.which(e) or os.path.exists(e) for e in exes)


def free_port(kind: str = "tcp") -> int:
    """A port the kernel had free a moment ago (tcp or udp, 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int, kind: str = "tcp") -> bool:
    """True if some socket listens on (tcp) / is bound to (udp) ``port``: read from /proc/net,
    so no connection is made (a probe would use up a listen-mode input's one accept)."""
    files = ["/proc/net/tcp", "/proc/net/tcp6"] if kind == "tcp" else ["/proc/net/udp", "/proc/net/udp6"]
    want = f"{port:04X}"
    for name in files:
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[1].rsplit(":", 1)[1] == want and (kind == "udp" or cols[3] == "0A"):
                return True
    return False


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    """Poll ``pred`` (for things with no event to wait on: another process's socket or file)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def kill(proc: subprocess.Popen | None, sig: int = signal.SIGKILL, timeout: float = 5.0) -> None:
    """Signal a process we started and reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


# -- media files --------------------------------------------------------------------------
def make_video(path: str | os.PathLike, *, size: str = "640x360", fps: int = 30, seconds: float = 5,
               codec: str = "libx264", audio: bool = False, gop: int | None = None,
               pattern: str = "testsrc2", extra: list[str] | None = None) -> Path:
    """A test-pattern file made by ffmpeg (container from the extension)."""
    path = Path(path)
    args = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"{pattern}=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}"]
    args += ["-c:v", codec]
    if codec == "libx264":
        args += ["-preset", "ultrafast", "-pix_fmt", "yuv420p", "-bf", "0", "-g", str(gop or fps)]
    if audio:
        args += ["-c:a", "aac"]
    args += (extra or []) + [str(path)]
    subprocess.run(args, check=True, timeout=120)
    return path


def make_audio(path: str | os.PathLike, seconds: float = 2) -> Path:
    subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={seconds}", "-c:a", "aac", str(path)], check=True, timeout=60)
    return Path(path)


def ffprobe(target: str, timeout: float = 20) -> dict:
    """ffprobe's JSON (format + streams) for a file or URL."""
    out = subprocess.run([FFPROBE, "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
                          "-rw_timeout", str(int(timeout * 1e6)), target] if "://" in target else
                         [FFPROBE, "-v", "error", "-print_format", "json", "-show_format", "-show_streams", target],
                         capture_output=True, text=True, timeout=timeout + 10, check=True)
    return json.loads(out.stdout)


def probe_video(target: str, timeout: float = 20) -> dict:
    """The first video stream's ffprobe fields (codec_name, width, height, r_frame_rate, ...)."""
    streams = [s for s in ffprobe(target, timeout)["streams"] if s["codec_type"] == "video"]
    if not streams:
        raise AssertionError(f"no video stream in {target}")
    return streams[0]


def count_frames(target: str, timeout: float = 60) -> int:
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
                          "stream=nb_read_frames", "-of", "csv=p=0", target],
                         capture_output=True, text=True, timeout=timeout, check=True)
    return int(out.stdout.strip().split(",")[0])


# -- publisher ---------------------------------------------------------------------------
_FORMATS = {"rtmp": "flv", "rtmps": "flv", "rtsp": "rtsp", "srt": "mpegts", "udp": "mpegts", "rtp": "rtp_mpegts"}


class Publisher:
    """``ffmpeg -re`` sending a lavfi test pattern (or a file, looped, stream-copied) to a URL.

    ``size``/``fps``: the pattern; ``audio``: add a sine track (AAC); ``input_file``: publish
    that file in a loop with ``-c copy`` (near zero CPU: use for long or 1080p feeds);
    ``fmt``: the output muxer (default by scheme: flv, rtsp, mpegts).
    """

    def __init__(self, url: str, *, size: str = "640x360", fps: int = 30, audio: bool = False,
                 fmt: str | None = None, duration: float | None = None, input_file: str | None = None,
                 pattern: str = "testsrc2", extra_out: list[str] | None = None, log_path: str | None = None):
        self.url = url
        scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
        fmt = fmt or _FORMATS.get(scheme)
        args = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error"]
        if input_file:
            args += ["-re", "-stream_loop", "-1", "-i", str(input_file), "-c", "copy"]
            if not audio:
                args += ["-an"]
        else:
            dur = f":duration={duration}" if duration else ""
            args += ["-re", "-f", "lavfi", "-i", f"{pattern}=size={size}:rate={fps}{dur}"]
            if audio:
                args += ["-re", "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100{dur}"]
            args += ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
                     "-g", str(fps), "-bf", "0"]
            if audio:
                args += ["-c:a", "aac", "-b:a", "64k"]
        if duration and input_file:
            args += ["-t", str(duration)]
        if fmt == "rtsp":
            args += ["-rtsp_transport", "tcp"]
        args += (extra_out or []) + (["-f", fmt] if fmt else []) + [url]
        self.args = args
        self._log = open(log_path, "wb") if log_path else tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Publisher":
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log)
        return self

    def stop(self) -> None:
        """SIGKILL: the publisher vanishes as a crashed encoder or a dropped network would."""
        kill(self.proc)

    def restart(self) -> "Publisher":
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> "Publisher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- nginx-rtmp --------------------------------------------------------------------------
NGINX_CONF = """\
load_module {module};
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        chunk_size 4096;
        application live {{
            live on;
            record off;
            wait_key on;
        }}
    }}
}}
"""


class NginxRtmp:
    """nginx with the RTMP module on a free loopback port; ``url(key)`` -> rtmp://.../live/key."""

    def __init__(self, workdir: str | None = None):
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="nginx-rtmp-")
        self.dir = Path(workdir or self._tmp.name)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def url(self, key: str = "test", app: str = "live") -> str:
        return f"rtmp://127.0.0.1:{self.port}/{app}/{key}"

    def start(self) -> "NginxRtmp":
        for _ in range(3):  # a free port can be taken between the check and nginx's bind
            self.port = free_port()
            conf = self.dir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(module=RTMP_MODULE, dir=self.dir, port=self.port))
            (self.dir / "logs").mkdir(exist_ok=True)
            self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: is_listening(self.port) or self.proc.poll() is not None, 10, "nginx-rtmp")
            except TimeoutError:
                kill(self.proc)
                raise
            if self.proc.poll() is None:
                return self
        raise RuntimeError(f"nginx-rtmp did not start: {(self.dir / 'error.log').read_text()[-500:]}")

    def stop(self) -> None:
        kill(self.proc, signal.SIGTERM)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "NginxRtmp":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- GStreamer RTSP server ---------------------------------------------------------------
class GstRtspServer:
    """GStreamer's RTSP server (videotestsrc -> x264 -> RTP) as a /usr/bin/python3 subprocess.

    ``url`` is rtsp://127.0.0.1:PORT/test; it serves both TCP and UDP transports.
    """

    def __init__(self, size: str = "640x360", fps: int = 30):
        self.size, self.fps = size, fps
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/test"

    def start(self, timeout: float = 20) -> "GstRtspServer":
        w, h = self.size.split("x")
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(HERE / "gst_rtsp_server.py"), w, h, str(self.fps)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].strip().isdigit():
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            kill(self.proc)
            raise RuntimeError(f"GStreamer RTSP server did not start: {err[-500:]}")
        self.port = int(line[0])
        return self

    def stop(self) -> None:
        kill(self.proc)

    def __enter__(self) -> "GstRtspServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- HLS over local HTTP -----------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class HttpDir:
    """A folder served over HTTP on 127.0.0.1 (a ThreadingHTTPServer in a daemon thread)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = str(directory)
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=self.directory))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="test-http", daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> "HttpDir":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class LoopbackApp:
    """An aiohttp application on 127.0.0.1 (a free port), served by its own event loop in a daemon thread: a real
    HTTP server for a sink under test. ``routes``: (method, path, coroutine handler) as aiohttp takes them."""

    def __init__(self, routes: list[tuple[str, str, object]]):
        import asyncio

        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def boot() -> None:
            app = web.Application()
            for method, path, handler in routes:
                app.router.add_route(method, path, handler)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(boot())
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=run, name="test-aiohttp", daemon=True)
        self.thread.start()
        assert ready.wait(10), "the loopback aiohttp server did not start"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class HlsServer:
    """ffmpeg writes a live HLS playlist (1 s segments) into a temp folder served over HTTP."""

    def __init__(self, size: str = "640x360", fps: int = 30):
        self._tmp = tempfile.TemporaryDirectory(prefix="hls-")
        self.dir = Path(self._tmp.name)
        self.publisher = Publisher(str(self.dir / "live.m3u8"), size=size, fps=fps, fmt="hls",
                                   extra_out=["-hls_time", "1", "-hls_list_size", "6",
                                              "-hls_flags", "delete_segments+omit_endlist"])
        self.http = HttpDir(self.dir)

    @property
    def url(self) -> str:
        return self.http.url("live.m3u8")

    def __enter__(self) -> "HlsServer":
        self.http.__enter__()
        self.publisher.start()
        wait_until(lambda: (self.dir / "live.m3u8").exists() and
                   (self.dir / "live.m3u8").read_text().count("#EXTINF") >= 2, 30, "an HLS playlist")
        return self

    def __exit__(self, *exc) -> None:
        self.publisher.close()
        self.http.__exit__()
        self._tmp.cleanup()


# -- process health ----------------------------------------------------------------------
def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def child_pids() -> set[int]:
    """Our live child processes (from /proc), to check relays are reaped."""
    me = os.getpid()
    kids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                kids.add(int(d))
    return kids


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


if __name__ == "__main__":  # manual check: python3 tests/servers.py
    with NginxRtmp() as ngx, Publisher(ngx.url("x")):
        print(wait_until(lambda: _try(lambda: probe_video(ngx.url("x"), 5)), 20, "the stream"))


def http_get(url: str, timeout: float = 10, token: str | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET; (0, b"") when nothing answers. ``token`` goes as a Bearer header."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a file another process is still writing (a partial last line is skipped)."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out
