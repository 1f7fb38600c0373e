"""The plugin registry: sources and sinks from entry points, LIVECC_PLUGINS, make_sink."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline import plugins
from pipeline.plugins import DIST, SINKS, SOURCES, Registry, make_sink, parse_spec
from pipeline.fanout.sink import Sink, SinkSettings

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = {"console", "jsonl", "subtitles", "srt", "vtt", "overlay", "twitch", "webhook", "burnin", "restream",
            "youtube", "obs"}
SOURCE_KINDS = {"rtmp", "rtmps", "rtsp", "srt", "udp", "http", "https", "file", "lavfi", "v4l2", "avfoundation",
                "dshow", "opencv"}


class EchoSink(Sink):
    name = "echo"
    target_field = "label"

    class Settings(SinkSettings):
        label: str = "x"
        loud: bool = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.got = []

    def on_caption(self, caption):
        self.got.append(caption.text)


@pytest.fixture
def echo_plugin():
    plugins.registry.register(SINKS, "echo", EchoSink)
    yield EchoSink
    plugins.registry.unregister(SINKS, "echo")


def test_builtins_are_entry_points_of_both_groups():
    """pyproject.toml lists the built-in sources and sinks once; the registry reads that list."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    reg = Registry(third_party=False)
    assert set(reg.names(SINKS)) == set(eps[SINKS]) == BUILTINS
    assert set(reg.names(SOURCES)) == set(eps[SOURCES]) >= SOURCE_KINDS
    reg.load_all()
    rep = reg.report()
    assert all(r["loaded"] and r["error"] is None and r["origin"] == DIST for r in rep), rep
    for name in BUILTINS:
        cls = reg.get(SINKS, name)
        assert issubclass(cls, Sink) and issubclass(cls.Settings, SinkSettings)
    assert all(callable(reg.get(SOURCES, name)) for name in SOURCE_KINDS)


def test_installed_metadata_is_read_without_a_source_tree():
    """An installed wheel has no pyproject.toml: the distribution's metadata gives the built-ins."""
    assert BUILTINS <= set(Registry(third_party=False, pyproject=None).names(SINKS))


def test_third_party_plugins_and_the_test_switch(tmp_path, monkeypatch):
    """A real distribution on sys.path: its entry points load unless LIVECC_PLUGINS leaves them
    out, as tests/conftest.py does; a third party cannot take a built-in's name."""
    info = tmp_path / "livecc_extra-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: livecc-extra\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[livecc.sources]\nextra = pipeline.capture.sources:lavfi\n"
                                           "rtmp = pipeline.capture.sources:lavfi\n"
                                           "[livecc.sinks]\nextra = plugins.sinks.console:ConsoleSink\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert os.environ.get("LIVECC_PLUGINS") == DIST  # set by tests/conftest.py
    reg = Registry()
    assert "extra" not in reg.names(SOURCES) + reg.names(SINKS) and "rtmp" in reg.names(SOURCES)
    monkeypatch.delenv("LIVECC_PLUGINS")
    reg = Registry()
    origins = {(r["group"], r["name"]): r["origin"] for r in reg.report()}
    assert origins[SOURCES, "extra"] == origins[SINKS, "extra"] == "livecc-extra"
    assert origins[SOURCES, "rtmp"] == DIST and reg.get(SOURCES, "rtmp").__name__ == "rtmp"


def test_report_lists_sources_and_sinks():
    out = subprocess.run([sys.executable, "-m", "pipeline.plugins"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()
    rows = {tuple(line.split()[:2]) for line in out}
    assert {("sources", k) for k in SOURCE_KINDS} | {("sinks", k) for k in BUILTINS} <= rows
    assert all(line.endswith(" ok") for line in out), out


def test_env_restricts_plugins(monkeypatch):
    monkeypatch.setenv("LIVECC_PLUGINS", "jsonl, sinks:srt, sources:rtmp")
    assert Registry().names(SINKS) == ["jsonl", "srt"] and Registry().names(SOURCES) == ["rtmp"]
    monkeypatch.setenv("LIVECC_PLUGINS", "")
    assert Registry().names(SINKS) == [] and Registry().names(SOURCES) == []


def test_test_plugin_registered_in_fixture(echo_plugin):
    s = make_sink("echo:hello", loud=True)
    assert isinstance(s, EchoSink) and s.settings.label == "hello" and s.settings.loud
    assert any(r["name"] == "echo" and r["origin"] == "manual" for r in plugins.report())


def test_unregistered_after_fixture():
    assert "echo" not in plugins.registry.names(SINKS)


def test_parse_spec_forms():
    assert parse_spec("burnin:rtmp://host/app/key") == ("burnin", "rtmp://host/app/key", {})
    assert parse_spec("overlay") == ("overlay", None, {})
    assert parse_spec("twitch:#channel") == ("twitch", "#channel", {})
    assert parse_spec({"kind": "srt", "path": "a.srt"}) == ("srt", None, {"path": "a.srt"})
    assert parse_spec({"jsonl": {"path": "e.jsonl"}}) == ("jsonl", None, {"path": "e.jsonl"})


def test_make_sink_targets_and_errors(tmp_path):
    s = make_sink(f"jsonl:{tmp_path}/e.jsonl")
    assert s.settings.path == f"{tmp_path}/e.jsonl"
    assert make_sink("twitch:#chan").settings.channel == "#chan"
    assert make_sink("burnin:rtmp://h/live/KEY").settings.output == "rtmp://h/live/KEY"
    assert make_sink({"kind": "srt", "path": "x.srt", "linger_s": 1}).settings.linger_s == 1
    with pytest.raises(ValueError, match=r"srt.*colour.*[Ee]xtra"):
        make_sink({"srt": {"path": "x.srt", "colour": "red"}})
    with pytest.raises(ValueError, match="linger_s"):
        make_sink("srt:x.srt", linger_s="long")
    with pytest.raises(LookupError, match="unknown sink 'nope'"):
        make_sink("nope:x")
    # secrets never appear in validation messages
    with pytest.raises(ValueError) as ei:
        make_sink("burnin:rtmp://h/live/SECRETKEY", fps="fast")
    assert "SECRETKEY" not in str(ei.value)


def test_every_builtin_sink_documents_its_settings():
    import sys
    from pathlib import Path

    docs = (Path(__file__).resolve().parent.parent / "docs" / "sinks.md").read_text()
    reg = Registry(third_party=False)
    for name in BUILTINS:
        cls = reg.get(SINKS, name)
        assert cls.__module__.startswith("plugins.sinks.") and sys.modules[cls.__module__].__doc__
        assert cls.Settings.model_config.get("extra") == "forbid", name
        for option in cls.Settings.model_fields:
            assert f"`{option}`" in docs, f"{name}.{option} missing from docs/sinks.md"
