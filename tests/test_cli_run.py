"""``livecc run`` / ``livecc demo`` as a user sees them, with the tiny model: signals, the status table's
last frame, the demo's first-run notice. Real processes, real signals (GNU ``timeout``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def tiny():
    from pipeline.fixtures.tiny import tiny_checkpoint

    return str(tiny_checkpoint("small"))


def start_capturing(cmd: list[str], log) -> subprocess.Popen:
    """Start ``cmd`` (a ``livecc run``) in its own process group (as under timeout/systemd), its output in the
    file ``log``, and wait until it says it is capturing; the process is still running then."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        servers.wait_until(lambda: b"capturing" in log.read_bytes() or proc.poll() is not None, 180,
                           "livecc run capturing")
        assert proc.poll() is None, log.read_text()
    except BaseException:
        proc.kill()
        raise
    return proc


def stopped(proc, log, stop) -> tuple[int, str]:
    """Run ``stop()`` (it signals ``proc``), wait up to 60 s for the exit; (exit status, the log). The process is
    killed if it is still there (a failed assertion in ``stop`` or a hang)."""
    try:
        stop()
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, log.read_text()


def test_sigterm_to_the_process_group_twice_is_one_stop_request(tmp_path, tiny):
    """GNU timeout sends its SIGTERM to the child and then to the process group (systemd and Docker signal
    every process of the unit / container too): the child gets it twice, merged into one by the kernel
    when the second comes before the first is handled, else two. Two once exited 130 (taken for a second
    Ctrl-C) with the sinks unfinalised; here the second comes 0.3 s later so it is always two."""
    log = tmp_path / "livecc.log"
    out = tmp_path / "c.srt"
    cmd = [*LIVECC, "run", "lavfi:testsrc2=size=320x240:rate=10", "--model", tiny, "--device", "cpu",
           "--port", "0", "--status", "off", "--sink", f"srt:{out}"]
    proc = start_capturing(cmd, log)

    def twice():
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)
    code, text = stopped(proc, log, twice)
    assert code == 0, (code, text[-2000:])
    assert "stopping now" not in text and "SIGTERM: stopping" in text, text[-2000:]


def test_sighup_is_a_clean_stop_that_finalises_the_files(tmp_path, tiny):
    """The terminal closed (an ssh session dropped): the kernel sends SIGHUP. It once killed the run (status
    129, no 'done' line) and left a plain (unfragmented) MP4 with no moov atom, unreadable; it is a stop
    request like SIGTERM: the turn finishes, every sink is closed and finalised, exit status 0."""
    log = tmp_path / "livecc.log"
    mp4 = tmp_path / "b.mp4"
    cmd = [*LIVECC, "run", "lavfi:testsrc2=size=320x240:rate=10", "--model", tiny, "--device", "cpu",
           "--port", "0", "--status", "off", "--sink", f"burnin:{mp4}", "--sink", f"srt:{tmp_path / 'c.srt'}",
           "--set", "sinks[0].fragmented_mp4=false", "--set", "sinks[0].fps=10", "--set", "sinks[0].audio=false"]
    proc = start_capturing(cmd, log)

    def hang_up():
        servers.wait_until(lambda: mp4.exists() and mp4.stat().st_size > 0 or proc.poll() is not None, 60,
                           "the MP4 written")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGHUP)
    code, text = stopped(proc, log, hang_up)
    assert code == 0, (code, text[-2000:])
    assert "SIGHUP: stopping" in text and "done:" in text, text[-2000:]
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0",
                            str(mp4)], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.strip() == "h264", probe.stderr


def test_the_status_table_ends_on_stopped_not_running(tmp_path, tiny):
    from pipeline.fixtures.testvideo import test_video

    video = test_video(seconds=4)
    r = subprocess.run([*LIVECC, "run", str(video), "--model", tiny, "--device", "cpu", "--port", "0",
                        "--status", "rich", "--sink", f"jsonl:{tmp_path / 'c.jsonl'}"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    states = [line.split()[-1] for line in r.stderr.splitlines() if line.strip().startswith("state")]
    assert states and states[-1] == "stopped", (states, r.stderr[-2000:])


def test_first_run_only_is_said_on_the_first_run_only(tmp_path):
    env = {**os.environ, "LIVECC_CACHE": str(tmp_path / "cache")}

    def demo() -> str:
        r = subprocess.run([*LIVECC, "demo", "--seconds", "4", "--vocab", "small", "--port", "0",
                            "--status", "off", "--out", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stderr

    assert "(first run only)" in demo()
    assert "(first run only)" not in demo()
