"""The ``livecc`` command line itself: start-up cost, help, version, the messages a new user meets first."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.commands.options import ENGINE_FLAGS

ROOT = Path(__file__).resolve().parent.parent
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


def test_run_help_names_every_built_in_sink():
    """`livecc run --help` lists the sink kinds as the README does (it left out restream, youtube and obs)."""
    from pipeline.cli import build_parser
    from pipeline.plugins import registry

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    help_text = next(a.help for a in run._actions if a.dest == "sink")
    listing = help_text.split(":", 1)[1].split(";")[0]  # "console, jsonl:FILE, ..., obs[:ws://HOST:PORT], ..."
    kinds = set(re.findall(r"(?:^ |, )([a-z]+)", listing))
    assert set(registry.names()) <= kinds, set(registry.names()) - kinds


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


def test_ask_takes_the_engine_flags_with_video_qa_defaults(capsys):
    """`livecc ask` has the engine flags of run and caption but --query (the questions are the prompt):
    greedy (--sample to sample) and 512 tokens per answer unless told otherwise."""
    from pipeline.cli import build_parser
    from pipeline.commands.options import engine_overrides

    def parse(*flags):
        return build_parser().parse_args(["ask", "v.mp4", "Q?", *flags])

    assert engine_overrides(parse()) == {"greedy": True, "max_new_tokens": 512}
    args = parse("--model", "m", "--device", "cpu", "--dtype", "float32", "--sample", "--max-new-tokens", "64",
                 "--repetition-penalty", "1.1", "--positions", "exact", "--seed", "3", "--quantize", "int8",
                 "--threads", "2")
    assert engine_overrides(args) == {"model": "m", "device": "cpu", "dtype": "float32", "greedy": False,
                                      "max_new_tokens": 64, "repetition_penalty": 1.1, "positions": "exact",
                                      "seed": 3, "quantize": "int8"}
    assert args.threads == 2 and args.questions == ["Q?"]
    for bad in (["--query", "x"], ["--greedy", "--sample"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    assert "--query" in capsys.readouterr().err


def test_ask_questions_may_follow_options(capsys):
    """`livecc ask match.mp4 --model M "Q1" "Q2"`: questions after (or between) options are questions, in
    order, as they are before the options (argparse alone leaves them "unrecognized")."""
    from pipeline.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["ask", "v.mp4", "Q1?", "--model", "m", "Q2?", "--jsonl", "a.jsonl", "Q3?"])
    assert args.questions == ["Q1?", "Q2?", "Q3?"] and args.model == "m" and args.jsonl == "a.jsonl"
    assert parse_args(build_parser(), ["ask", "v.mp4", "--quantize", "int8"]).questions == []
    for argv in (["ask", "v.mp4", "--nope", "Q?"], ["caption", "v.mp4", "extra"]):
        with pytest.raises(SystemExit):
            parse_args(build_parser(), argv)
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3") or not glob.glob("/usr/lib/python3*/EXTERNALLY-MANAGED"),
                    reason="no distribution python3 with PEP 668 here")
def test_install_works_with_the_distributions_python(tmp_path):
    """PEP 668: pip refuses to install into Debian's /usr/bin/python3; install.sh makes and uses a venv.
    (PIP_NO_DEPS=1 keeps it to the package itself: seconds, not 6 GiB of torch and CUDA.)"""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PYTHON="/usr/bin/python3", LIVECC_VENV=str(venv), PIP_NO_DEPS="1")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"installed in {venv}" in r.stdout
    v = subprocess.run([str(venv / "bin" / "livecc"), "--version"], capture_output=True, text=True, env=env)
    assert v.returncode == 0 and v.stdout.startswith("livecc "), v.stderr
    base = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True).stdout.strip()
    assert base == "/usr"


def _imports(root: Path) -> dict[str, set[str]]:
    """pipeline's modules -> the pipeline modules each imports (anywhere in it, functions included)."""
    import ast

    mods = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges[m].update(n for n in names if n in mods and n != m)
    return edges


def test_no_import_cycle():
    edges = _imports(ROOT / "pipeline")
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_a_caption_with_newlines_stays_on_one_status_line():
    """The model may emit newlines: the status table row and the plain status log line stay one line."""
    from pipeline.status import one_line, summary

    snap = {"state": "running", "last_caption": {"text": "a goal!\nwhat a shot\r\n  replay"}}
    assert summary(snap)["last caption"] == "a goal! what a shot replay"
    assert "\n" not in one_line(snap) and "\r" not in one_line(snap)


def test_drain_sends_the_token_the_server_reads(monkeypatch):
    """The server takes its token from $LIVECC_API_TOKEN (README, Security): `livecc drain` must send that
    one by default (it read $LIVECC_TOKEN, so a drain against a server with a token got 401); --token wins.
    A real HTTP server on loopback records the Authorization header of each request."""
    import http.server
    import json
    import threading

    from pipeline.cli import main
    from pipeline.config import TOKEN_ENV

    seen = []

    class Head(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"moved": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Head)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        monkeypatch.delenv("LIVECC_TOKEN", raising=False)
        monkeypatch.setenv(TOKEN_ENV, "s3cret-token-0123456789")
        assert main(["drain", "node1", "--url", url]) == 0
        assert main(["drain", "node1", "--url", url, "--token", "other"]) == 0
    finally:
        srv.shutdown()
    assert seen == [("/api/nodes/node1/drain", "Bearer s3cret-token-0123456789"),
                    ("/api/nodes/node1/drain", "Bearer other")]


