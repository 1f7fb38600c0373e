"""Plugin registry: sinks and sources found through Python entry points.

Built-ins are registered exactly like third-party plugins: ``pyproject.toml`` lists them under
``[project.entry-points."livecc.sinks"]`` pointing into ``plugins.sinks.<module>:<Class>``. When
the package metadata is absent (running from a source tree that was never pip-installed), the
same references are taken from ``BUILTIN`` below.

Environment:
  ``LIVECC_PLUGINS``  comma-separated names to load (``jsonl,srt`` or ``sinks:jsonl``); unset
                      loads everything, an empty string loads nothing.
  ``LIVECC_TRACE_PLUGINS=1``  log each plugin as it is found and loaded.

``report()`` lists what was found, where it came from and whether it loaded.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from .errors import PluginError  # noqa: F401  (re-exported)
log = logging.getLogger(__name__)

SINKS = "livecc.sinks"
SOURCES = "livecc.sources"
GROUPS = (SINKS, SOURCES)
DIST = "livecc-pipeline"

#: Fallback when the distribution's metadata is missing. Keep in step with pyproject.toml.
BUILTIN: dict[str, dict[str, str]] = {
    SINKS: {
        "console": "plugins.sinks.console:ConsoleSink",
        "jsonl": "plugins.sinks.jsonl:JsonlSink",
        "subtitles": "plugins.sinks.subtitles:SubtitleSink",
        "srt": "plugins.sinks.subtitles:SrtSink",
        "vtt": "plugins.sinks.subtitles:VttSink",
        "overlay": "plugins.sinks.overlay:OverlaySink",
        "twitch": "plugins.sinks.twitch:TwitchSink",
        "webhook": "plugins.sinks.webhook:WebhookSink",
        "burnin": "plugins.sinks.burnin:BurninSink",
    },
    SOURCES: {},
}



@dataclass
class PluginInfo:
    group: str
    name: str
    value: str  # "module:attr", or a repr for objects registered directly
    origin: str  # distribution name, "builtin-fallback" or "manual"
    version: str | None = None
    obj: Any = None
    error: str | None = None
    loaded: bool = False

    def as_dict(self) -> dict:
        return {
            "group": self.group,
            "name": self.name,
            "value": self.value,
            "origin": self.origin,
            "version": self.version,
            "loaded": self.loaded,
            "error": self.error,
        }


def _load_ref(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _allowed() -> set[str] | None:
    raw = os.environ.get("LIVECC_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _trace() -> bool:
    return os.environ.get("LIVECC_TRACE_PLUGINS", "") not in ("", "0", "false")


class Registry:
    """Plugins by group and name. Entry points are read once, imported lazily on first use."""

    def __init__(self, use_entry_points: bool = True) -> None:
        self.use_entry_points = use_entry_points
        self._plugins: dict[str, dict[str, PluginInfo]] = {g: {} for g in GROUPS}
        self._discovered = False

    # --- discovery -------------------------------------------------------------------
    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        allowed = _allowed()
        found_own: set[str] = set()
        if self.use_entry_points:
            for group in GROUPS:
                for ep in metadata.entry_points(group=group):
                    dist = getattr(ep, "dist", None)
                    origin = dist.metadata["Name"] if dist is not None else "unknown"
                    version = dist.version if dist is not None else None
                    if origin == DIST:
                        found_own.add(group)
                    self._add(PluginInfo(group, ep.name, ep.value, origin, version), allowed)
        for group in GROUPS:  # source tree without metadata: the same references, by hand
            if group in found_own:
                continue
            for name, ref in BUILTIN[group].items():
                if name not in self._plugins[group]:
                    self._add(PluginInfo(group, name, ref, "builtin-fallback"), allowed)

    def _add(self, info: PluginInfo, allowed: set[str] | None) -> None:
        short = info.group.split(".")[-1]
        if allowed is not None and info.name not in allowed and f"{short}:{info.name}" not in allowed:
            if _trace():
                log.info("plugin %s:%s skipped (LIVECC_PLUGINS)", short, info.name)
            return
        if info.name in self._plugins[info.group]:
            prev = self._plugins[info.group][info.name]
            log.warning("plugin %s:%s from %s shadows %s", short, info.name, info.origin, prev.origin)
        if _trace():
            log.info("plugin %s:%s found (%s from %s)", short, info.name, info.value, info.origin)
        self._plugins[info.group][info.name] = info

    # --- manual registration (tests, embedding) --------------------------------------
    def register(self, group: str, name: str, obj: Any) -> None:
        """Register a class (or a ``"module:attr"`` string) under ``name``; replaces any existing."""
        self.discover()
        if isinstance(obj, str):
            info = PluginInfo(group, name, obj, "manual")
        else:
            value = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
            info = PluginInfo(group, name, value, "manual", obj=obj, loaded=True)
        self._plugins[group][name] = info

    def unregister(self, group: str, name: str) -> None:
        self._plugins[group].pop(name, None)

    # --- lookup ----------------------------------------------------------------------
    def names(self, group: str = SINKS) -> list[str]:
        self.discover()
        return sorted(self._plugins[group])

    def get(self, group: str, name: str) -> Any:
        self.discover()
        info = self._plugins[group].get(name)
        if info is None:
            known = ", ".join(sorted(self._plugins[group])) or "none"
            raise PluginError(f"unknown {group.split('.')[-1][:-1]} {name!r} (known: {known})")
        if not info.loaded:
            try:
                info.obj = _load_ref(info.value)
                info.loaded, info.error = True, None
                if _trace():
                    log.info("plugin %s loaded", info.value)
            except Exception as e:  # report it, don't crash discovery of the others
                info.error = f"{type(e).__name__}: {e}"
                raise PluginError(f"plugin {name!r} ({info.value}) failed to load: {info.error}") from e
        return info.obj

    def load_all(self) -> None:
        """Import every plugin now (errors are kept in the report, not raised)."""
        self.discover()
        for group, plugins in self._plugins.items():
            for name in list(plugins):
                try:
                    self.get(group, name)
                except PluginError:
                    pass

    def report(self) -> list[dict]:
        self.discover()
        return [info.as_dict() for g in GROUPS for info in sorted(self._plugins[g].values(), key=lambda i: i.name)]


registry = Registry()


def parse_spec(spec: str | dict) -> tuple[str, str | None, dict]:
    """``"burnin:rtmp://h/app/key"`` -> ``("burnin", "rtmp://h/app/key", {})``.

    A dict is either ``{"kind": "jsonl", "path": ...}`` or a one-key block ``{"jsonl": {...}}``.
    """
    if isinstance(spec, str):
        kind, sep, target = spec.partition(":")
        kind = kind.strip()
        if not kind:
            raise ValueError(f"bad sink spec {spec!r}: expected KIND[:TARGET]")
        return kind, (target if sep and target else None), {}
    if isinstance(spec, dict):
        if "kind" in spec:
            rest = dict(spec)
            kind = rest.pop("kind")
            target = rest.pop("target", None)
            return str(kind), target, rest
        if len(spec) == 1:
            (kind, block), = spec.items()
            block = dict(block or {})
            target = block.pop("target", None)
            return str(kind), target, block
    raise ValueError(f"bad sink spec {spec!r}: expected 'KIND[:TARGET]' or a mapping with 'kind'")


def sink_class(kind: str) -> type:
    return registry.get(SINKS, kind)


def make_sink(spec: str | dict, **settings: Any):
    """Build a sink from ``"kind[:target]"`` or a config block; ``settings`` override the block."""
    kind, target, block = parse_spec(spec)
    cls = sink_class(kind)
    block.update(settings)
    if target is not None:
        field_name = getattr(cls, "target_field", None)
        if not field_name:
            raise ValueError(f"sink {kind!r} takes no target (got {target!r})")
        block.setdefault(field_name, target)
    try:
        return cls(block)
    except Exception as e:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            from .fanout.sink import redact

            msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or kind}: {err['msg']}" for err in e.errors())
            raise ValueError(redact(f"sink {kind!r}: {msgs}")) from None
        raise


def report() -> list[dict]:
    return registry.report()


def main() -> None:  # python -m pipeline.plugins: what is installed, and does it load
    registry.load_all()
    for r in report():
        state = "ok" if r["loaded"] else f"ERROR {r['error']}"
        print(f"{r['group']:<15} {r['name']:<10} {r['value']:<45} {r['origin']:<18} {state}")


if __name__ == "__main__":
    main()
