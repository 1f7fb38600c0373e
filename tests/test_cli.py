"""The ``livecc`` command line itself: start-up cost, help, version, the messages a new user meets first."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.commands.options import ENGINE_FLAGS

LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def livecc(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*LIVECC, *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_importing_the_cli_loads_no_torch():
    r = subprocess.run([sys.executable, "-c", "import pipeline.cli, sys; assert 'torch' not in sys.modules"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_help_is_fast_and_lists_the_commands():
    t0 = time.monotonic()
    r = livecc("--help")
    took = time.monotonic() - t0
    assert r.returncode == 0
    for cmd in ("caption", "run", "demo"):
        assert cmd in r.stdout
    assert took < 5, took  # no torch, no model code (about 0.2 s idle; 2-3 s more with torch)


def test_bare_livecc_shows_the_commands_not_an_argparse_complaint():
    r = livecc()
    assert r.returncode == 2
    assert "required" not in r.stderr and "caption" in r.stderr and "livecc demo" in r.stderr


def test_version():
    from pipeline import __version__

    r = livecc("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"livecc {__version__}", (r.stdout, r.stderr)


def test_caption_help_has_a_description():
    r = livecc("caption", "--help")
    assert r.returncode == 0 and "as fast as the hardware allows" in r.stdout and "examples:" in r.stdout


def test_run_help_example_keeps_stream_keys_off_the_command_line():
    r = livecc("run", "--help")
    assert r.returncode == 0
    assert "live2/KEY" not in r.stdout and "LIVECC_RESTREAM_URL" in r.stdout


@pytest.mark.parametrize("flag", ENGINE_FLAGS)
def test_engine_flags_are_engine_config_fields_with_the_defaults_their_help_names(flag):
    """The flags are defined once (commands/options.py) and map onto EngineConfig's fields."""
    from pipeline.cli import build_parser
    from pipeline.engine import EngineConfig

    default = getattr(EngineConfig(), flag)
    for cmd in ("caption", "run"):
        sub = build_parser()._subparsers._group_actions[0].choices[cmd]
        action = next(a for a in sub._actions if a.dest == flag)
        assert action.default is None  # a flag not given leaves the config alone
        if flag in ("model", "query", "max_new_tokens", "repetition_penalty"):
            assert str(default) in action.help, (flag, default, action.help)
