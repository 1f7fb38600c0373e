"""The plugin registry: entry points, the source-tree fallback, LIVECC_PLUGINS, make_sink."""

from __future__ import annotations

import pytest

from pipeline import plugins
from pipeline.plugins import SINKS, Registry, make_sink, parse_spec
from pipeline.fanout.sink import Sink, SinkSettings

BUILTINS = {"console", "jsonl", "subtitles", "srt", "vtt", "overlay", "twitch", "webhook", "burnin", "restream", "youtube", "obs"}


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


def test_builtins_found_through_entry_points():
    reg = Registry()
    names = set(reg.names(SINKS))
    assert BUILTINS <= names
    origins = {r["name"]: r["origin"] for r in reg.report() if r["group"] == SINKS}
    # installed (pip install -e): the built-ins come from the package's own entry points
    assert {origins[n] for n in BUILTINS} == {"livecc-pipeline"}


def test_fallback_without_metadata_loads_every_builtin():
    reg = Registry(use_entry_points=False)
    assert set(reg.names(SINKS)) == BUILTINS
    reg.load_all()
    rep = {r["name"]: r for r in reg.report() if r["group"] == SINKS}
    assert all(r["loaded"] and r["error"] is None for r in rep.values()), rep
    for name in BUILTINS:
        cls = reg.get(SINKS, name)
        assert issubclass(cls, Sink) and issubclass(cls.Settings, SinkSettings)


def test_env_restricts_plugins(monkeypatch):
    monkeypatch.setenv("LIVECC_PLUGINS", "jsonl, sinks:srt")
    assert Registry().names(SINKS) == ["jsonl", "srt"]
    monkeypatch.setenv("LIVECC_PLUGINS", "")
    assert Registry().names(SINKS) == []


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


def test_fallback_list_matches_pyproject_entry_points():
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    eps = data["project"]["entry-points"]["livecc.sinks"]
    assert eps == plugins.BUILTIN[SINKS]


def test_every_builtin_sink_documents_its_settings():
    import sys
    from pathlib import Path

    docs = (Path(__file__).resolve().parent.parent / "docs" / "sinks.md").read_text()
    reg = Registry(use_entry_points=False)
    for name in BUILTINS:
        cls = reg.get(SINKS, name)
        assert cls.__module__.startswith("plugins.sinks.") and sys.modules[cls.__module__].__doc__
        assert cls.Settings.model_config.get("extra") == "forbid", name
        for option in cls.Settings.model_fields:
            assert f"`{option}`" in docs, f"{name}.{option} missing from docs/sinks.md"
