"""Output files that are never destroyed by a later run and never hold a partial record.

Two rules every file sink follows:

* ``open_output(path, policy)`` (or ``claim_output_path``): what a run does with a file that is already there. The
  policy is the sink's ``existing`` setting: ``"append"`` (continue the file: JSONL),
  ``"new"`` (leave it alone and write ``name.1.ext``, ``name.2.ext``, ...: subtitles and
  video, whose timestamps restart with every run) or ``"overwrite"`` (the operator asked for
  it). Nothing is ever truncated unless the policy says ``"overwrite"``, and a file that another
  run still writes (it holds an ``flock`` on it) is never chosen, whatever the policy.
* ``append_record(fd, data, offset)``: a record is written whole or not at all. A full disk
  gives a short write or ``ENOSPC`` part-way through a record; the file is then cut back to
  where the record began, so a retry of the same record does not leave a fragment or a copy.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

#: The ``existing`` setting of a file sink: what to do when its output file is already there.
Existing = Literal["append", "new", "overwrite"]


def claim_output_path(path: str | os.PathLike, policy: Existing) -> Path:
    """The file a run writes for the configured ``path``, given what is already on disk.

    ``"append"`` and ``"overwrite"`` return ``path`` itself (the caller opens it for appending,
    or truncates it). ``"new"`` returns ``path`` when it is absent or empty, else the first free
    ``stem.N.suffix`` (``N`` = 1, 2, ...), created empty with ``O_EXCL`` so that two writers
    never claim the same name; the choice is logged. Parent folders are created. A file that
    another process holds open with :func:`open_output` (a run still writing it) is never
    chosen: the next free numbered name is, whatever the policy.

    Raises ``IsADirectoryError`` when ``path`` is a folder, ``OSError`` when the parent
    cannot be created (a path under a regular file: ``NotADirectoryError``), ``ValueError``
    for an unknown policy. Prefer :func:`open_output`, which keeps the claim until the file is closed.
    """
    p, fd = _claim(path, policy)
    os.close(fd)
    return p


def open_output(path: str | os.PathLike, policy: Existing) -> tuple[Path, int]:
    """Claim and open the file a run writes for ``path`` (see :func:`claim_output_path`); returns
    ``(path claimed, fd)``, the fd open for writing (not appending: see :func:`append_record`) with an
    exclusive ``flock`` held until it is closed (or the process dies: a SIGKILL frees it).

    Two runs started with the same output file therefore never write one file: while the first holds
    it, the second gets ``stem.N.suffix`` and a warning says so, whatever ``policy`` (even
    ``"overwrite"`` leaves a file in use alone). ``"overwrite"`` truncates a file nobody holds. A path
    that is not a regular file (a FIFO, ``/dev/stdout``) is opened as it is, with no lock. Raises as
    :func:`claim_output_path`.
    """
    p, fd = _claim(path, policy)
    if policy == "overwrite" and p == Path(path):
        try:
            os.ftruncate(fd, 0)
        except OSError:
            os.close(fd)
            raise
    return p, fd


def _lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting. False: another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks (ENOLCK, EINVAL): nothing to go by
        pass
    return True


def _claim(path: str | os.PathLike, policy: Existing) -> tuple[Path, int]:
    if policy not in ("append", "new", "overwrite"):
        raise ValueError(f"unknown existing-file policy {policy!r} (append, new, overwrite)")
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(p))
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a regular file where a folder should be
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of its folder", str(p.parent)) from None
    if policy != "new":
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode) or _lock(fd):
            return p, fd  # a pipe or a device: written as it is
        os.close(fd)
        log.warning("%s is being written by another process: leaving it to that one", p)
    for n in range(0 if policy == "new" else 1, 100_000):
        cand = p if n == 0 else p.with_name(f"{p.stem}.{n}{p.suffix}")
        try:
            fd = os.open(cand, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                fd = os.open(cand, os.O_WRONLY | os.O_NONBLOCK)  # a FIFO with no reader: ENXIO, not a wait
            except OSError:
                continue
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size or not _lock(fd) or os.fstat(fd).st_size:
                os.close(fd)  # an earlier run's output, or a file another run holds
                continue
            os.set_blocking(fd, True)
            return cand, fd  # an earlier run that wrote nothing: nothing to keep
        if not _lock(fd):  # another run took the empty file between our create and our lock
            os.close(fd)
            continue
        if n:
            log.warning("%s exists: leaving it as it is and writing %s", p, cand)
        return cand, fd
    raise FileExistsError(errno.EEXIST, "no free numbered name next to it", str(p))


def deleted(fd: int | None) -> bool:
    """Whether the file open as ``fd`` no longer has a name (deleted, or replaced, under the running sink):
    what is written to it is lost when it is closed. None (a file that could not be opened again) counts
    as deleted."""
    return fd is None or os.fstat(fd).st_nlink == 0


def append_record(fd: int, data: bytes, offset: int | None, *, fsync: bool = False) -> int | None:
    """Write ``data`` at ``offset`` of the open file ``fd`` whole, or leave the file as it was.

    ``offset`` must be the file's current end (the caller keeps it). Short writes are
    continued; any ``OSError`` (``ENOSPC``, ``EDQUOT``, ``EIO``, or from the ``fsync`` when
    asked for) truncates the file back to ``offset`` and is raised again, with ``ENOSPC``
    for a write that made no progress. Returns the new end, ``offset + len(data)``.
    ``offset=None`` is for a pipe or a device (``os.fstat`` not a regular file): written in
    order, with nothing to cut back; returns None.
    """
    done = 0
    try:
        while done < len(data):
            rest = data[done:]
            n = os.write(fd, rest) if offset is None else os.pwrite(fd, rest, offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n
        if fsync and offset is not None:
            os.fsync(fd)
    except OSError:
        if offset is not None:
            os.ftruncate(fd, offset)
        raise
    return None if offset is None else offset + done
