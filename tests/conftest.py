"""Shared fixtures: real media servers from tests/servers.py (nginx-rtmp, ffmpeg publisher, ...)."""

from __future__ import annotations

import errno
import itertools
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

# torch's CPU kernels at the AVX2 level on every machine (set before torch loads; subprocesses inherit it): the
# golden token ids of tests/test_parity.py came from the reference run with them, and the AVX-512 kernels sum in
# another order: on an AVX-512 machine one greedy choice (turn 20 of the small vocabulary) came out differently
# (2026-12-01; with ATEN_CPU_CAPABILITY=avx2 it matched again), at the old code as at the new
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
# and inductor's compiled CPU kernels in a cache of their own: its cache key does not hold that setting, and kernels
# built earlier for AVX-512 in the default cache gave NaN under it (torch 2.14.1)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor-{os.environ['ATEN_CPU_CAPABILITY']}-{os.getuid()}"))

import servers  # noqa: E402 - tests/servers.py (pytest puts tests/ on sys.path)

try:  # the tiny engine on CPU: torch's default thread count made a turn ~9x slower on a loaded 2-core machine
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

# only this package's own plugins under test (datasette's practice): an installed third-party source or
# sink must not change a test's outcome; subprocesses (livecc run) inherit it
os.environ.setdefault("LIVECC_PLUGINS", "livecc-pipeline")
# state the sinks keep between runs (the YouTube sink's seq) goes to a folder of this test session, not $HOME
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="livecc-test-state-")

_keys = itertools.count(1)


def _need(*exes: str) -> None:
    missing = [e for e in exes if not servers.have(e)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (see .ci/run)")


@pytest.fixture(scope="session")
def nginx_rtmp():
    """One nginx-rtmp for the session: ``nginx_rtmp.url(key)`` -> rtmp://127.0.0.1:PORT/live/key."""
    _need(servers.NGINX, servers.RTMP_MODULE, servers.FFMPEG)
    with servers.NginxRtmp() as ngx:
        yield ngx


@pytest.fixture
def stream_key(request) -> str:
    """A stream key unique to the test (so tests sharing one nginx never see each other)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40] + f"-{next(_keys)}"


@pytest.fixture
def publisher():
    """Factory: ``publisher(url, size=..., fps=..., audio=..., input_file=...)`` -> a started
    :class:`servers.Publisher` (ffmpeg -re); all are killed at teardown."""
    _need(servers.FFMPEG)
    started: list[servers.Publisher] = []

    def start(url: str, **kw) -> servers.Publisher:
        p = servers.Publisher(url, **kw).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


@pytest.fixture
def rtsp_server():
    """Factory: ``rtsp_server(size=..., fps=...)`` -> a started GStreamer RTSP server (``.url``)."""
    if not servers.have(servers.SYSTEM_PYTHON):
        pytest.skip("needs /usr/bin/python3 with GStreamer's RTSP server")
    started: list[servers.GstRtspServer] = []

    def start(**kw) -> servers.GstRtspServer:
        s = servers.GstRtspServer(**kw).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """A session-wide folder for generated media files."""
    return tmp_path_factory.mktemp("media")


class SmallDisk:
    """A mounted 2 MiB tmpfs (``.path``) that ``fill()`` fills up for real and ``free()`` empties again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ballast = path / ".ballast"

    def fill(self) -> None:
        """Write a ballast file until the disk refuses (ENOSPC): no free page is left."""
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)

    def free(self) -> None:
        self.ballast.unlink()


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs mounted for this test (disk-full tests: ``fill()`` / ``free()``); unmounted after."""
    d = tmp_path / "small-disk"
    d.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True)
        why = r.stderr.strip() if r.returncode else ""
    except FileNotFoundError:
        why = "no mount command"
    if why:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {why}")
    try:
        yield SmallDisk(d)
    finally:
        subprocess.run(["umount", "--lazy", str(d)], check=False)
