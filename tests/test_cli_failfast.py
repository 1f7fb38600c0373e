"""What must fail in seconds, as one ``livecc: error:`` line with exit status 2, before any model loads:
hostile or broken configs, unusable sink targets, a port in use, a model that is not there. Real files,
real sockets, the real command in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

import servers
from pipeline import config
from pipeline.errors import ConfigError

LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def error_line(*args, timeout=60, env=None, cwd=None) -> tuple[str, float]:
    """Run livecc; assert exit 2 and exactly one stderr line, which it returns (with the seconds it took)."""
    t0 = time.monotonic()
    r = subprocess.run([*LIVECC, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    took = time.monotonic() - t0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("livecc: error: "), (r.returncode, r.stderr)
    return lines[0], took


BOMB = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

HOSTILE = {  # file content -> text of the error
    "alias_bomb": (("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + BOMB).encode(), "alias"),
    "deep": (b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested too deeply"),
    "latin1": ("engine:\n  query: \"caf\u00e9\"\n".encode("latin-1"), "line 2: not UTF-8 text (byte 0xe9)"),
    "huge_int": (b"engine:\n  seed: " + b"9" * 5000 + b"\n", "digits"),
    "huge_query": (b"engine:\n  query: \"" + b"x" * 3_000_000 + b"\"\n", "too big for a config"),
    "long_query": (b"engine:\n  query: \"" + b"x" * 5000 + b"\"\n", "engine.query: 5000 characters: at most 2000"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_configs_are_one_line_and_exit_2(tmp_path, name):
    content, expected = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    line, took = error_line("run", "lavfi:testsrc2", "-c", str(path))
    assert expected in line and str(path) in line, line
    assert took < 30, took


@pytest.mark.parametrize("target, expected", [
    ("{tmp}", "is a directory"),
    ("{tmp}/a_file/captions.srt", "is a file, not a folder"),
    # permission bits pass (as root they always do) but nothing can be created there: once a traceback (caption)
    # or a run that captioned the whole video and then failed with "sink lost data" (run)
    ("/proc/livecc-test/captions.srt", "cannot write a file in /proc"),
])
def test_a_sink_target_that_cannot_be_a_file_exits_2_before_the_model_loads(tmp_path, target, expected):
    (tmp_path / "a_file").write_text("in the way")
    spec = "srt:" + target.format(tmp=tmp_path)
    line, _ = error_line("run", "lavfi:testsrc2", "--sink", spec)  # once: retried forever, exit 0
    assert f"--sink {spec}" in line and expected in line, line


def test_sink_messages():
    line, _ = error_line("run", "lavfi:testsrc2", "--sink", "str:x.srt")
    assert "--sink str:x.srt: unknown sink 'str' (did you mean 'srt'?" in line, line
    line, _ = error_line("run", "lavfi:testsrc2", "--sink", "srt:")
    assert "--sink srt:: empty target" in line, line


def test_a_config_name_that_is_no_preset_suggests_one_and_lists_them():
    line, _ = error_line("run", "lavfi:testsrc2", "-c", "sprots")
    assert "did you mean 'sports'?" in line and "presets: " in line and "webcam-narration" in line, line


def test_a_model_path_that_does_not_exist(tmp_path):
    line, _ = error_line("caption", "x.mp4", "--model", "./no-such-model", cwd=tmp_path)
    assert "x.mp4" in line  # the video is checked first
    from pipeline.fixtures.testvideo import test_video

    line, _ = error_line("caption", str(test_video(seconds=4)), "--model", "./no-such-model", cwd=tmp_path)
    assert "--model ./no-such-model: does not exist" in line, line


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_an_offline_hub_model_is_one_line_in_seconds(tmp_path, how):
    import os

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    env.pop("HF_HUB_OFFLINE", None)
    if how == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{servers.free_port()}"  # nothing listens: refused at once
    line, took = error_line("run", "lavfi:testsrc2", "--model", "chenjoya/LiveCC-7B-Instruct", "--port", "0",
                            env=env)
    assert "is not on this machine and cannot be downloaded" in line and "hf download" in line, line
    assert took < 30, took  # once: 55-63 s of retries and 44 warning lines


def test_a_port_in_use_fails_before_the_model_loads_and_names_the_flag(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model folder exists but holds no checkpoint: loading it first would be a different error
        line, _ = error_line("run", "lavfi:testsrc2", "--model", str(tmp_path), "--port", str(port))
    assert f"127.0.0.1:{port}" in line and "--port" in line, line


def test_twitch_without_a_token_is_refused_plain_irc_is_not(monkeypatch):
    monkeypatch.delenv("TWITCH_OAUTH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="no OAuth token: Twitch drops"):
        config.load(sinks=["twitch:#chan"])
    config.load(sinks=["twitch:#chan"], overrides=["sinks[0].host=127.0.0.1", "sinks[0].tls=false"])
    monkeypatch.setenv("TWITCH_OAUTH_TOKEN", "oauth:abc")
    config.load(sinks=["twitch:#chan"])


def test_youtube_without_its_key_is_refused_before_the_model_loads(monkeypatch):
    """The key lives only in the environment: without it the sink can send nothing. It was found at the
    sink's start, after the model loaded, and the run went on to exit 1 with every caption lost."""
    monkeypatch.delenv("YOUTUBE_CAPTION_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\(youtube\): no caption ingestion key: set \$YOUTUBE_CAPTION_KEY"):
        config.load(sinks=["youtube"])
    with pytest.raises(ConfigError, match=r"set \$MY_KEY"):
        config.load(sinks=["youtube"], overrides=["sinks[0].key_env=MY_KEY"])
    monkeypatch.setenv("YOUTUBE_CAPTION_KEY", "abcd-efgh")
    config.load(sinks=["youtube"])


def test_a_disconnected_sink_is_never_reported_ok():
    from pipeline.fanout.dispatch import Dispatcher
    from pipeline.plugins import make_sink
    from pipeline.types import Caption

    sink = make_sink("twitch:#x", host="127.0.0.1", port=servers.free_port(), tls=False, token="oauth:abc",
                     reconnect_initial_s=0.05)
    d = Dispatcher([sink], call_timeout=5)
    d.start()
    try:
        d.caption(Caption(0, 1, "hello"))
        servers.wait_until(lambda: d.status()["twitch"]["captions"] >= 1, 10, "the caption handed over")
        st = d.status()["twitch"]
        assert st["detail"]["connected"] is False and st["state"] == "disconnected", st
    finally:
        d.stop(timeout=10)


@pytest.mark.parametrize("target", ["hls/", "hls"])
def test_an_hls_folder_of_an_earlier_run_is_accepted(tmp_path, target):
    """burnin/restream to an HLS folder (``out/``, or any existing folder: docs/sinks.md) is not 'a directory':
    the first run creates it, so the same command run again must not be refused with exit 2."""
    (tmp_path / "hls").mkdir()
    (tmp_path / "hls" / "index.m3u8").write_text("#EXTM3U\n")  # what the first run left
    for kind in ("burnin", "restream"):
        block = config.validate_sink(f"{kind}:{tmp_path / target}")
        assert block["kind"] == kind
    with pytest.raises(ConfigError, match="is a directory"):
        config.validate_sink(f"srt:{tmp_path / 'hls'}")  # a file sink still may not write a folder


@pytest.mark.parametrize("link, expected", [("loop", "a symlink loop"), ("dangling", "does not exist")])
def test_a_sink_target_that_is_a_broken_symlink_exits_2_before_the_model_loads(tmp_path, link, expected):
    """A JSONL target that is a symlink loop, or a dangling symlink into a folder that does not exist, was let
    through: the model loaded, the sink's start failed (ELOOP, ENOENT) for the whole run, every caption was lost and
    the run ended with exit 1. It is caught with the other targets that cannot be a file (README: exit 2)."""
    target = tmp_path / "c.jsonl"
    if link == "loop":
        os.symlink(tmp_path / "other.jsonl", target)
        os.symlink(target, tmp_path / "other.jsonl")
    else:
        os.symlink(tmp_path / "no" / "such" / "c.jsonl", target)
    spec = f"jsonl:{target}"
    line, _ = error_line("run", "lavfi:testsrc2", "--sink", spec)
    assert f"--sink {spec}" in line and expected in line, line
    if link == "dangling":  # a dangling symlink whose folder is there is fine: the file is created where it points
        (tmp_path / "no" / "such").mkdir(parents=True)
        assert config.validate_sink(spec)["kind"] == "jsonl"
