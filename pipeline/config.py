"""The ``livecc run`` configuration: a YAML file validated by a pydantic schema, plus overrides.

One block per concern::

    engine:   the model and its decoding (the fields of :class:`pipeline.engine.EngineConfig`)
    capture:  how the source is opened and reconnected
    sampler:  the 2 fps sampling and the clip queue between sampler and engine
    sinks:    a list of blocks ``{kind: KIND, ...settings}``, each checked by that sink's Settings
    server:   the HTTP server (overlay, control API, metrics): host, port, token
    status:   the live status display
    log:      log format and level
    shutdown: how long a graceful stop may take

Errors name the file and the key path: ``configs/x.yaml: engine.repetiton_penalty: unknown key``.
YAML is read with ``yaml.safe_load`` (no tags that build Python objects). String values may name
environment variables as ``${NAME}`` (for stream keys and tokens that should not live in files).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .cli import UserError
from .engine.config import EngineConfig
from .redact import redact

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
TOKEN_ENV = "LIVECC_API_TOKEN"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A configuration that can't be used; the message names the file and the key."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# -- engine: generated from EngineConfig, so a new engine field is a new config key -----------------
def _engine_model() -> type[BaseModel]:
    hints = typing.get_type_hints(EngineConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(EngineConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        fields[f.name] = (hints[f.name], default)
    if "context" not in fields:  # an engine without context policies: the key exists, only "none" works
        fields["context"] = (str, "none")
    return create_model("EngineSection", __base__=_Block, **fields)


EngineSection = _engine_model()


class CaptureSection(_Block):
    source: str | None = None  # used when SOURCE is not given on the command line
    wait_for_source: bool | None = None  # None: retry a network source not up yet (files fail at once)
    wait_after_end: bool = False  # an HLS playlist that ends (#EXT-X-ENDLIST): end the run (False) or wait
    ring_size: int = Field(16, ge=1, le=1024)  # frames held between capture and sampler
    pace: bool | None = None  # files / lavfi: real time (default) or as fast as decoded
    listen: bool | None = None  # rtmp / rtsp: wait for an encoder to push to us
    transport: str | None = None  # rtsp: tcp (default) | udp
    low_latency: bool = True
    relay: bool | None = None
    video_size: str | None = None  # webcams: "1280x720"
    framerate: str | None = None  # webcams: "30"
    pixel_format: str | None = None
    decoder_threads: int = 0
    thread_type: Literal["AUTO", "SLICE", "FRAME"] = "AUTO"
    open_timeout: float | None = Field(None, gt=0)
    read_timeout: float | None = Field(None, gt=0)
    live: bool | None = None
    options: dict[str, str] = Field(default_factory=dict)  # extra FFmpeg input options
    reconnect_initial_s: float = Field(0.5, ge=0)
    reconnect_max_s: float = Field(5.0, gt=0)
    reconnect_max_attempts: int | None = Field(None, ge=1)  # None: forever


class SamplerSection(_Block):
    fps: float = Field(2.0, gt=0, le=30)
    opener_frames: int = Field(6, ge=2)
    turn_frames: int = Field(2, ge=2)
    lookahead_s: float = Field(0.2, ge=0)
    hold_s: float = Field(2.0, gt=0)
    queue_size: int = Field(2, ge=1, le=64)  # clips waiting for the engine; the oldest is dropped

    @field_validator("opener_frames", "turn_frames")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (temporal patch of 2)")
        return v


class ServerSection(_Block):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    token: str | None = None  # required when host is not loopback; or set $LIVECC_API_TOKEN
    cors_origins: list[str] = Field(default_factory=list)  # browser origins allowed to call the API
    max_request_bytes: int = Field(16 * 1024, ge=256, le=1024 * 1024)
    max_text_chars: int = Field(2000, ge=1)
    answer_timeout_s: float = Field(120.0, gt=0)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


class StatusSection(_Block):
    mode: Literal["auto", "rich", "plain", "off"] = "auto"  # auto: rich on a terminal, plain otherwise
    interval_s: float = Field(10.0, gt=0)  # plain mode: one status log line this often
    refresh_hz: float = Field(4.0, gt=0, le=30)

    @field_validator("mode", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false


class LogSection(_Block):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class ShutdownSection(_Block):
    turn_timeout_s: float = Field(10.0, ge=0)  # wait this long for the turn in progress, then abandon it
    sinks_timeout_s: float = Field(15.0, gt=0)  # flush and close every sink within this


class RunConfig(_Block):
    engine: EngineSection = Field(default_factory=EngineSection)  # type: ignore[valid-type]
    capture: CaptureSection = Field(default_factory=CaptureSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    sinks: list[dict[str, Any] | str] = Field(default_factory=list)  # blocks, or "KIND[:TARGET]" strings
    server: ServerSection = Field(default_factory=ServerSection)
    status: StatusSection = Field(default_factory=StatusSection)
    log: LogSection = Field(default_factory=LogSection)
    shutdown: ShutdownSection = Field(default_factory=ShutdownSection)

    def engine_config(self) -> EngineConfig:
        """The engine's dataclass from the ``engine:`` block (keys it doesn't know yet are held back)."""
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        data = self.engine.model_dump()
        if data.get("context", "none") != "none" and "context" not in known:
            raise ConfigError(f"engine.context: {data['context']!r} is not supported by this engine yet (use 'none')")
        try:
            return EngineConfig(**{k: v for k, v in data.items() if k in known})
        except ValueError as e:
            raise ConfigError(f"engine: {e}") from None


def is_loopback(host: str) -> bool:
    """Only the usual loopback names count: anything else (127.0.0.2, 0.0.0.0, a LAN address) needs a token."""
    h = host.strip("[]").lower()
    if h in LOOPBACK_HOSTS:
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    return ip in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


# -- loading -----------------------------------------------------------------------------------------
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(obj: Any, path: str, where: str) -> Any:
    if isinstance(obj, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand_env(v, f"{path}[{i}]", where) for i, v in enumerate(obj)]
    if isinstance(obj, str) and "${" in obj:
        def sub(m: re.Match) -> str:
            val = os.environ.get(m.group(1))
            if val is None:
                raise ConfigError(f"{where}: {path}: environment variable {m.group(1)} is not set")
            return val
        return _ENV.sub(sub, obj)
    return obj


def read_yaml(path: str | os.PathLike) -> dict:
    """``yaml.safe_load`` of a config file; a clear error for a missing file or bad YAML."""
    p = Path(path)
    if not p.exists() and not p.suffix and (CONFIG_DIR / f"{p.name}.yaml").exists():
        p = CONFIG_DIR / f"{p.name}.yaml"  # ``--config sports`` names a preset
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {at}not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    return data


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _messages(e: ValidationError, prefix: str = "", candidates: list[str] | None = None) -> list[str]:
    msgs = []
    for err in e.errors():
        loc = err["loc"]
        # pydantic puts the union member / function name in loc for some errors: drop non-keys
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        key = _loc(loc)
        if prefix:
            key = prefix + ("" if key == "(top level)" else ("" if key.startswith("[") else ".") + key)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            close = _suggest(err, candidates)
            if close:
                msg += f" (did you mean {close!r}?)"
        elif err["type"] == "missing":
            msg = "missing (required)"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f", got {redact(repr(err['input']))[:80]}"
        msgs.append(f"{key}: {msg}")
    return msgs


_SUGGEST_FIELDS: dict[str, list[str]] = {}


def _suggest(err: dict, candidates: list[str] | None = None) -> str | None:
    import difflib

    name = str(err["loc"][-1])
    cands = candidates if candidates is not None else _SUGGEST_FIELDS.get("all", [])
    m = difflib.get_close_matches(name, cands, n=1, cutoff=0.75)
    return m[0] if m else None


def _all_field_names() -> list[str]:
    names: set[str] = set()
    for model in (RunConfig, EngineSection, CaptureSection, SamplerSection, ServerSection, StatusSection,
                  LogSection, ShutdownSection):
        names.update(model.model_fields)
    return sorted(names)


def validate(data: dict, where: str = "config", cli_sinks: int = 0) -> RunConfig:
    """``data`` (the YAML mapping, overrides applied) -> RunConfig; every problem in one error.

    The last ``cli_sinks`` entries of ``sinks`` came from ``--sink`` and are named so in errors."""
    _SUGGEST_FIELDS.setdefault("all", _all_field_names())
    data = _expand_env(data, "", where)
    problems: list[str] = []
    raw_sinks = data.get("sinks") if isinstance(data, dict) else None
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        problems += [f"{where}: {m}" for m in _messages(e)]
        cfg = None
    server = cfg.server if cfg is not None else ServerSection()
    sinks = []
    if isinstance(raw_sinks, list):
        first_cli = len(raw_sinks) - cli_sinks
        for i, block in enumerate(raw_sinks):
            label = f"--sink {_spec_text(block)}" if i >= first_cli else f"{where}: sinks[{i}]"
            try:
                sinks.append(validate_sink(block, label, server))
            except ConfigError as e:
                problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))
    cfg.sinks = sinks
    try:
        cfg.engine_config()  # the engine's own checks (positions, context policy, ...) with the file's name
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    check_security(cfg, where)
    return cfg


def _spec_text(block: Any) -> str:
    if isinstance(block, dict) and "kind" in block:
        t = block.get("target")
        return redact(f"{block['kind']}:{t}" if t is not None else str(block["kind"]))
    return redact(str(block))


def validate_sink(block: Any, label: str = "sinks[0]", server: ServerSection | None = None) -> dict:
    """Check one ``sinks:`` entry with its sink's own Settings; returns the normalised block."""
    from .plugins import PluginError, parse_spec, sink_class

    try:
        kind, target, settings = parse_spec(block)
    except ValueError as e:
        raise ConfigError(f"{label}: {e}") from None
    try:
        cls = sink_class(kind)
    except PluginError as e:
        raise ConfigError(f"{label}.kind: {e}") from None
    if target is not None:
        tf = getattr(cls, "target_field", None)
        if not tf:
            raise ConfigError(f"{label}: sink {kind!r} takes no target")
        settings.setdefault(tf, target)
    if kind == "overlay" and server is not None and server.enabled and \
            not {"host", "port", "listen"} & settings.keys():
        settings["host"], settings["port"] = server.host, server.port  # one server for overlay + API
    try:
        cls.Settings.model_validate(settings)
    except ValidationError as e:
        raise ConfigError("\n".join(f"{label}({kind}).{m}" for m in _messages(e, candidates=list(cls.Settings.model_fields)))) from None
    return {"kind": kind, **settings}


def check_security(cfg: RunConfig, where: str = "config") -> None:
    """Off loopback the control API must have a token (refuse to start without one)."""
    srv = cfg.server
    if srv.token is None and os.environ.get(TOKEN_ENV):
        srv.token = os.environ[TOKEN_ENV]
    if srv.enabled and not srv.loopback and not srv.token:
        raise ConfigError(f"{where}: server.host: {srv.host} is not loopback: set server.token (or ${TOKEN_ENV}) "
                          "so the control API is not open to anyone who can reach it")
    if srv.token is not None and len(srv.token) < 16:
        raise ConfigError(f"{where}: server.token: use at least 16 characters")


# -- overrides ---------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalar syntax (``1.15``, ``true``, ``null``, ``[a, b]``), else the string."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, bool) and text.strip().lower() not in ("true", "false"):
        return text  # YAML 1.1's on/off/yes/no stay words: --set status.mode=off
    return text if isinstance(v, (dict,)) and not text.strip().startswith("{") else v


def set_path(data: dict, dotted: str, value: Any) -> None:
    """``set_path(d, "engine.repetition_penalty", 1.15)``; ``sinks.0.output`` / ``sinks[0].output`` index lists."""
    parts = [p for p in re.split(r"\.|\[(\d+)\]", dotted) if p]
    if not parts:
        raise ConfigError(f"--set {dotted}: empty key")
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise ConfigError(f"--set {dotted}: {part!r} is not an index of a list of {len(cur)}")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            cur[part] = value
        else:
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            cur = nxt


def load(path: str | os.PathLike | None = None, *, overrides: list[str] = (), sinks: list[str] = (),
         engine: dict[str, Any] | None = None, source: str | None = None) -> RunConfig:
    """The config file (or the defaults), then ``engine`` overrides (``--model``, ``--query`` ...),
    ``--set key.path=value`` overrides, and ``--sink`` specs appended to the file's sinks."""
    where = _display_path(path) if path else "command line"
    data = read_yaml(path) if path else {}
    for key, value in (engine or {}).items():
        if value is not None:
            set_path(data, f"engine.{key}", value)
    if source:
        set_path(data, "capture.source", source)
    if sinks:
        from .plugins import parse_spec

        if data.get("sinks") is not None and not isinstance(data["sinks"], list):
            raise ConfigError(f"{where}: sinks: must be a list of sink blocks")
        blocks = []
        for spec in sinks:  # "kind:target" -> a block, so --set sinks[N].key=... reaches it too
            try:
                kind, target, _ = parse_spec(spec)
            except ValueError as e:
                raise ConfigError(f"--sink {redact(spec)}: {e}") from None
            blocks.append({"kind": kind, **({"target": target} if target is not None else {})})
        data["sinks"] = list(data.get("sinks") or []) + blocks
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        set_path(data, key.strip(), parse_value(value))
    return validate(data, where, cli_sinks=len(sinks))


def _display_path(path) -> str:
    p = Path(path)
    if not p.exists() and not p.suffix and (CONFIG_DIR / f"{p.name}.yaml").exists():
        p = CONFIG_DIR / f"{p.name}.yaml"
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return str(p)
    return str(path)
