"""The ``livecc run`` config: presets validate, errors name the file and the key, overrides, safety."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path, text: str, name: str = "x.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(path, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(path, **kw)
    return str(e.value)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_validate(preset, monkeypatch):
    monkeypatch.setenv("LIVECC_RESTREAM_URL", "rtmp://127.0.0.1/live/secret-key")
    cfg = config.load(preset)
    cfg.engine_config()  # maps onto the engine's dataclass
    for block in cfg.sinks:
        assert "kind" in block


def test_expected_preset_set():
    names = {p.name for p in PRESETS}
    assert {"default.yaml", "sports.yaml", "esports.yaml", "webcam-narration.yaml", "obs-overlay.yaml",
            "restream.yaml"} <= names


def test_sports_preset_is_livecc_evaluation_setting():
    cfg = config.load(ROOT / "configs" / "sports.yaml")
    assert cfg.engine.repetition_penalty == 1.15
    assert cfg.engine.query.startswith("You are an expert video commentator providing real-time, insightful, "
                                       "and engaging commentary on visual content.")


def test_defaults_match_the_engine():
    from pipeline.engine import EngineConfig

    cfg = config.validate({})
    assert cfg.engine_config() == EngineConfig()
    assert cfg.server.host == "127.0.0.1" and cfg.server.token is None
    assert cfg.log.format == "text"


def test_unknown_key_names_file_and_path(tmp_path):
    p = write(tmp_path, "engine:\n  repetiton_penalty: 1.2\n")
    msg = error_of(p)
    assert f"{p}: engine.repetiton_penalty: unknown key" in msg
    assert "did you mean 'repetition_penalty'" in msg


def test_bad_value_names_key(tmp_path):
    p = write(tmp_path, "engine:\n  max_new_tokens: lots\nsampler:\n  turn_frames: 3\nserver:\n  port: 99999\n")
    msg = error_of(p)
    assert f"{p}: engine.max_new_tokens:" in msg and "'lots'" in msg
    assert f"{p}: sampler.turn_frames: must be even" in msg
    assert f"{p}: server.port:" in msg


def test_every_problem_reported_at_once(tmp_path):
    p = write(tmp_path, "engine:\n  nope: 1\nsinks:\n  - kind: srt\n    pth: a.srt\n  - kind: martian\n")
    msg = error_of(p)
    assert "engine.nope: unknown key" in msg
    assert "sinks[0](srt).pth: unknown key (did you mean 'path'?)" in msg
    assert "sinks[1].kind: unknown sink 'martian'" in msg


def test_sink_settings_are_checked_by_the_sink(tmp_path):
    p = write(tmp_path, "sinks:\n  - kind: burnin\n    output: out.mp4\n    fps: 500\n")
    assert f"{p}: sinks[0](burnin).fps: fps must be between 1 and 120" in error_of(p)


def test_cli_sink_errors_are_named_and_redacted():
    msg = error_of(None, sinks=["burnin:rtmp://127.0.0.1/live/sup3rsecret", "nosuch:x"])
    assert "--sink nosuch:x: unknown sink 'nosuch'" in msg  # the flag, not a key path glued to it
    assert "sup3rsecret" not in msg


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    p = write(tmp_path, f'engine: !!python/object/apply:os.system ["touch {marker}"]\n')
    msg = error_of(p)
    assert str(p) in msg and "not valid YAML" in msg
    assert not marker.exists()


def test_missing_file_and_bad_top_level(tmp_path):
    assert "no such config file" in error_of(tmp_path / "absent.yaml")
    assert "top level must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_overrides_and_cli_flags(tmp_path):
    p = write(tmp_path, "engine:\n  repetition_penalty: 1.05\nsinks:\n  - kind: srt\n    path: a.srt\n")
    cfg = config.load(p, overrides=["engine.repetition_penalty=1.15", "sinks[0].path=b.srt",
                                    "engine.greedy=true", "server.port=9000"],
                      sinks=["jsonl:events.jsonl"], engine={"model": "/models/x", "query": "Describe."},
                      source="rtmp://127.0.0.1/live/in")
    assert cfg.engine.repetition_penalty == 1.15 and cfg.engine.greedy is True
    assert cfg.engine.model == "/models/x" and cfg.engine.query == "Describe."
    assert cfg.sinks == [{"kind": "srt", "path": "b.srt"}, {"kind": "jsonl", "path": "events.jsonl"}]
    assert cfg.server.port == 9000 and cfg.capture.source == "rtmp://127.0.0.1/live/in"
    assert "expected KEY.PATH=VALUE" in error_of(None, overrides=["engine.query"])
    assert "unknown key" in error_of(None, overrides=["engine.temprature=0.5"])


def test_preset_by_name():
    assert config.load("sports").engine.repetition_penalty == 1.15


def test_env_expansion(tmp_path, monkeypatch):
    p = write(tmp_path, "sinks:\n  - kind: burnin\n    output: ${OUT_URL}\n")
    assert f"{p}: sinks[0].output: environment variable OUT_URL is not set" in error_of(p)
    monkeypatch.setenv("OUT_URL", "rtmp://127.0.0.1/live/k")
    assert config.load(p).sinks[0]["output"] == "rtmp://127.0.0.1/live/k"


def test_overlay_shares_the_server_address():
    from pipeline.plugins import make_sink
    from pipeline.server import HttpServer

    cfg = config.load(None, overrides=["server.port=9123"], sinks=["overlay", "overlay:9124", "overlay:9123"])
    assert cfg.sinks[0] == {"kind": "overlay"}  # no copy of the server's address: the sink mounts on it
    server = HttpServer(cfg.server.host, cfg.server.port)
    shared, own, same = (make_sink(b) for b in cfg.sinks)
    shared.mount(server), own.mount(server)
    assert shared.server is server and shared.url == "http://127.0.0.1:9123/overlay"
    assert own.server is None and own.url == "http://127.0.0.1:9124/overlay"  # its own server at start
    with pytest.raises(ValueError, match="mounted twice"):  # the server's own address: the same page
        same.mount(server)


def test_token_required_off_loopback(monkeypatch):
    monkeypatch.delenv(config.TOKEN_ENV, raising=False)
    for host in ("0.0.0.0", "127.0.0.2", "192.168.1.10", "::"):
        assert "server.host" in error_of(None, overrides=[f"server.host={host}"])
    assert "at least 16" in error_of(None, overrides=["server.token=short"])
    cfg = config.load(None, overrides=["server.host=0.0.0.0", "server.token=0123456789abcdef0123"])
    assert cfg.server.token
    monkeypatch.setenv(config.TOKEN_ENV, "from-the-environment-0123")
    assert config.load(None, overrides=["server.host=0.0.0.0"]).server.token == "from-the-environment-0123"
    assert config.load(None).server.loopback


def test_context_policy_keys():
    from pipeline.engine import EngineConfig

    assert config.validate({"engine": {"context": "none"}}).engine_config().__dict__.get("context", "none") == "none"
    if "context" not in EngineConfig.__dataclass_fields__:  # an engine without policies: only "none"
        with pytest.raises(ConfigError, match="engine.context"):
            config.validate({"engine": {"context": "rollover"}}).engine_config()
    else:
        with pytest.raises(ConfigError, match="engine: context must be"):
            config.validate({"engine": {"context": "forever"}}).engine_config()


def test_cli_reports_config_errors_in_one_line_per_problem(tmp_path):
    p = write(tmp_path, "engine:\n  repetiton_penalty: 1.2\n")
    r = subprocess.run([sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())",
                        "run", "lavfi:testsrc2", "-c", str(p)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    assert f"livecc: error: {p}: engine.repetiton_penalty: unknown key" in r.stderr
    assert "Traceback" not in r.stderr


def test_readme_config_reference_documents_every_key():
    text = (ROOT / "README.md").read_text()
    ref = text[text.index("## Config reference"):]
    missing = [f"{section}.{key}" for section, model in (
        ("engine", config.EngineSection), ("capture", config.CaptureSection), ("sampler", config.SamplerSection),
        ("server", config.ServerSection), ("status", config.StatusSection), ("log", config.LogSection),
        ("shutdown", config.ShutdownSection)) for key in model.model_fields if f"`{key}`" not in ref]
    assert not missing, f"README config reference lacks {missing}"


def test_two_sinks_of_one_run_never_write_one_file(tmp_path, monkeypatch):
    """`livecc run --sink jsonl:a.jsonl --sink srt:a.jsonl` (or the same file by another name) would interleave
    two formats in one file: refused before anything loads, naming both sinks. A bare `jsonl` writes
    events.jsonl, so `jsonl` + `jsonl:events.jsonl` clash too; so do two outputs to one RTMP stream key (the
    key redacted in the message); distinct files and URLs are fine."""
    monkeypatch.chdir(tmp_path)
    msg = error_of(None, sinks=["jsonl:a.jsonl", "srt:./sub/../a.jsonl"])
    assert "sinks[1] (srt) writes" in msg and "as sinks[0] (jsonl) does" in msg, msg
    assert "as sinks[0] (jsonl) does" in error_of(None, sinks=["jsonl", "jsonl:events.jsonl"])
    msg = error_of(None, sinks=["burnin:rtmp://127.0.0.1/live/s3cretkey", "restream:rtmp://127.0.0.1/live/s3cretkey"])
    assert "as sinks[0] (burnin) does: give each sink its own URL" in msg and "s3cretkey" not in msg, msg
    cfg = config.load(None, sinks=["jsonl:a.jsonl", "srt:a.srt", "webhook:http://127.0.0.1:9/x"])
    assert [s["kind"] for s in cfg.sinks] == ["jsonl", "srt", "webhook"]
