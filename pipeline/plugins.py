"""One plugin registry for both plugin groups, found through Python entry points.

- ``livecc.sources``: the name is a source scheme (``rtmp``, ``opencv``, ...), the object a
  factory ``f(spec: str, opts: SourceOptions) -> Source`` (see ``pipeline/capture/sources.py``).
- ``livecc.sinks``: the name is a sink kind, the object a ``Sink`` subclass (``pipeline/fanout/sink.py``).

Built-ins are plugins like any other: this package's ``pyproject.toml`` lists them under the same
two entry-point groups a third-party package uses, and that list is the only one. Run from a
source tree, the registry reads that ``pyproject.toml`` itself, so an editable install whose
metadata predates the last change still sees the current list; an installed wheel carries no
``pyproject.toml`` and its metadata (written from that file at build time) is read instead.
A third-party plugin cannot take a built-in's name (it is skipped with a warning).

Environment (both groups):
  ``LIVECC_PLUGINS``  comma-separated: plugin names (``jsonl``), group-qualified names
                      (``sinks:jsonl``, ``sources:rtmp``) or distribution names (``livecc-pipeline``:
                      all of that package's plugins). Unset: everything; empty: nothing.
                      The test suite sets ``livecc-pipeline`` (tests/conftest.py): installed
                      third-party plugins are not loaded under pytest, as datasette does.
  ``LIVECC_TRACE_PLUGINS=1``  log each plugin as it is found and loaded.

``register``/``unregister`` add and remove plugins by hand (tests, embedding); ``report()`` and
``python -m pipeline.plugins`` list what was found, where it came from and whether it loads.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the installed metadata only
    tomllib = None

from .errors import PluginError  # noqa: F401  (re-exported)
log = logging.getLogger(__name__)

SOURCES = "livecc.sources"
SINKS = "livecc.sinks"
GROUPS = (SOURCES, SINKS)
_NOUN = {SOURCES: "source kind", SINKS: "sink"}  # for messages
DIST = "livecc-pipeline"
#: this package's own pyproject.toml when running from a source tree (absent in an installed wheel)
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"



@dataclass
class PluginInfo:
    group: str
    name: str
    value: str  # "module:attr", or a repr for objects registered directly
    origin: str  # distribution name, or "manual"
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


def _short(group: str) -> str:
    return group.split(".")[-1]  # "sources", "sinks"


def own_entry_points(pyproject: Path | None = PYPROJECT) -> dict[str, dict[str, str]]:
    """This package's plugins, ``{group: {name: "module:attr"}}``: from ``pyproject`` when it is
    this package's (a source tree), else from the installed distribution's metadata."""
    if pyproject is not None and tomllib is not None and pyproject.is_file():
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == DIST:
            eps = project.get("entry-points", {})
            return {g: dict(eps.get(g, {})) for g in GROUPS}
    out: dict[str, dict[str, str]] = {g: {} for g in GROUPS}
    try:
        for ep in metadata.distribution(DIST).entry_points:
            if ep.group in out:
                out[ep.group][ep.name] = ep.value
    except metadata.PackageNotFoundError:  # neither a source tree nor installed: no built-ins
        log.warning("no %s metadata and no pyproject.toml: no built-in plugins", DIST)
    return out


class Registry:
    """Plugins by group and name. Entry points are read once, imported lazily on first use.

    ``third_party=False`` reads only this package's own plugins."""

    def __init__(self, third_party: bool = True, pyproject: Path | None = PYPROJECT) -> None:
        self.third_party = third_party
        self.pyproject = pyproject
        self._plugins: dict[str, dict[str, PluginInfo]] = {g: {} for g in GROUPS}
        self._discovered = False

    # --- discovery -------------------------------------------------------------------
    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        allowed = _allowed()
        for group, refs in own_entry_points(self.pyproject).items():
            for name, ref in refs.items():
                self._add(PluginInfo(group, name, ref, DIST, __version__), allowed)
        if not self.third_party:
            return
        for group in GROUPS:
            for ep in metadata.entry_points(group=group):
                dist = getattr(ep, "dist", None)
                origin = dist.metadata["Name"] if dist is not None else "unknown"
                if origin == DIST:
                    continue  # ours: read above
                self._add(PluginInfo(group, ep.name, ep.value, origin, dist.version if dist else None), allowed)

    def _add(self, info: PluginInfo, allowed: set[str] | None) -> None:
        short = _short(info.group)
        if allowed is not None and not {info.name, f"{short}:{info.name}", info.origin} & allowed:
            if _trace():
                log.info("plugin %s:%s skipped (LIVECC_PLUGINS)", short, info.name)
            return
        prev = self._plugins[info.group].get(info.name)
        if prev is not None:
            log.warning("plugin %s:%s from %s ignored: %s already has that name", short, info.name,
                        info.origin, prev.origin)
            return
        if _trace():
            log.info("plugin %s:%s found (%s from %s)", short, info.name, info.value, info.origin)
        self._plugins[info.group][info.name] = info

    # --- manual registration (tests, embedding) --------------------------------------
    def register(self, group: str, name: str, obj: Any) -> None:
        """Register an object (or a ``"module:attr"`` string) under ``name``; replaces any existing."""
        self.discover()
        if isinstance(obj, str):
            info = PluginInfo(group, name, obj, "manual")
        else:
            value = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
            info = PluginInfo(group, name, value, "manual", obj=obj, loaded=True)
        self._plugins[group][name] = info

    def unregister(self, group: str, name: str) -> None:
        """Remove ``name`` from ``group`` (a plugin registered by hand, in a test's teardown)."""
        self._plugins[group].pop(name, None)

    # --- lookup ----------------------------------------------------------------------
    def names(self, group: str = SINKS) -> list[str]:
        self.discover()
        return sorted(self._plugins[group])

    def get(self, group: str, name: str) -> Any:
        """The plugin's object, imported on first use; PluginError when unknown or broken."""
        self.discover()
        info = self._plugins[group].get(name)
        if info is None:
            known = ", ".join(sorted(self._plugins[group])) or "none"
            raise PluginError(f"unknown {_NOUN.get(group, group)} {name!r} (known: {known})")
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
            from .redact import redact

            msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or kind}: {err['msg']}" for err in e.errors())
            raise ValueError(redact(f"sink {kind!r}: {msgs}")) from None
        raise


def report() -> list[dict]:
    return registry.report()


def main() -> None:  # python -m pipeline.plugins: what is installed, and does it load
    registry.load_all()
    for r in report():
        state = "ok" if r["loaded"] else f"ERROR {r['error']}"
        print(f"{_short(r['group']):<8} {r['name']:<13} {r['value']:<42} {r['origin']:<18} {state}")


if __name__ == "__main__":
    main()
