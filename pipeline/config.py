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
import os
import re
import threading
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .engine.config import EngineConfig
from .errors import ConfigError
from .redact import redact
from .server import is_loopback

TOKEN_ENV = "LIVECC_API_TOKEN"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"



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
    max_connections: int = Field(256, ge=1)  # one more evicts the oldest half-open one, else a 503
    request_timeout_s: float = Field(10.0, gt=0)  # a new connection's request head, and a body, arrive within this
    idle_timeout_s: float = Field(60.0, gt=0)  # keep-alive connections idle longer are closed

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


MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; a bigger file is a mistake or an attack
MAX_CONFIG_NODES = 100_000  # values after YAML aliases are expanded ("billion laughs": 10 aliases of 10 ...)
MAX_CONFIG_DEPTH = 32  # nesting of mappings / lists


def presets() -> list[str]:
    """The preset names ``--config NAME`` accepts (``configs/NAME.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml(path: str | os.PathLike) -> dict:
    """``yaml.safe_load`` of a config file, within ``MAX_CONFIG_*``.

    Raises:
        ConfigError: one line: a missing file (with the presets and the closest name), not UTF-8, too big,
            bad YAML, aliases or nesting beyond the limits, or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.exists() and not p.suffix and (CONFIG_DIR / f"{p.name}.yaml").exists():
        p = CONFIG_DIR / f"{p.name}.yaml"  # ``--config sports`` names a preset
    try:
        if p.is_file() and p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {p.stat().st_size} bytes: too big for a config (at most {MAX_CONFIG_BYTES})")
        raw = p.read_bytes()
    except FileNotFoundError:
        import difflib

        names = presets()
        close = difflib.get_close_matches(Path(path).stem, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{path}: no such config file ({hint}presets: {', '.join(names)})") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_shape(node, str(path))
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {at}not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(data).__name__}")
    return data


def _check_shape(root: yaml.Node, where: str) -> None:
    """Depth and expanded size of a composed YAML document, counted per node once (an alias is the same node)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: line {node.start_mark.line + 1}: nested too deeply "
                              f"(at most {MAX_CONFIG_DEPTH} levels)")
        if id(node) in sizes:
            return sizes[id(node)]
        n = 1
        if isinstance(node, yaml.MappingNode):
            n += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n += sum(size(v, depth + 1) for v in node.value)
        if n > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values once its aliases are expanded "
                              "(a YAML alias bomb?)")
        sizes[id(node)] = n
        return n

    size(root, 0)


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
    sinks = []
    if isinstance(raw_sinks, list):
        first_cli = len(raw_sinks) - cli_sinks
        for i, block in enumerate(raw_sinks):
            label = f"--sink {_spec_text(block)}" if i >= first_cli else f"{where}: sinks[{i}]"
            try:
                sinks.append(validate_sink(block, label))
            except ConfigError as e:
                problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))
    cfg.sinks = sinks
    if len(cfg.engine.query) > cfg.server.max_text_chars:
        raise ConfigError(f"{where}: engine.query: {len(cfg.engine.query)} characters: at most "
                          f"{cfg.server.max_text_chars} (server.max_text_chars, as for a query sent to the API)")
    try:
        cfg.engine_config()  # the engine's own checks (positions, context policy, ...) with the file's name
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    check_security(cfg, where)
    output_files(cfg.sinks, where)  # two sinks on one file: refused here, before anything loads
    return cfg


def _spec_text(block: Any) -> str:
    if isinstance(block, dict) and "kind" in block:
        t = block.get("target")
        return redact(f"{block['kind']}:{t}" if t is not None else str(block["kind"]))
    return redact(str(block))


def validate_sink(block: Any, label: str = "sinks[0]") -> dict:
    """Check one ``sinks:`` entry with its sink's own Settings; returns the normalised block."""
    from .plugins import PluginError, parse_spec, sink_class

    try:
        kind, target, settings = parse_spec(block)
    except ValueError as e:
        raise ConfigError(f"{label}: {e}") from None
    try:
        cls = sink_class(kind)
    except PluginError as e:
        import difflib

        from .plugins import SINKS, registry

        key = "" if label.startswith("--sink ") else ".kind"  # --sink KIND:TARGET names the flag, not a key
        names = registry.names(SINKS)
        if kind in names:  # known, but it failed to import
            raise ConfigError(f"{label}{key}: {e}") from None
        close = difflib.get_close_matches(kind, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{label}{key}: unknown sink {kind!r} ({hint}known: {', '.join(names)})") from None
    if target is not None:
        tf = getattr(cls, "target_field", None)
        if not tf:
            raise ConfigError(f"{label}: sink {kind!r} takes no target")
        settings.setdefault(tf, target)
    try:
        checked = cls.Settings.model_validate(settings)
    except ValidationError as e:
        raise ConfigError("\n".join(f"{label}({kind}).{m}" for m in _messages(e, candidates=list(cls.Settings.model_fields)))) from None
    for field in OUTPUT_FIELDS:
        value = getattr(checked, field, None)
        if isinstance(value, str):
            inner = getattr(cls, "folder_target", None)  # a folder is a valid target: check the file in it
            if inner and "://" not in value and Path(value).expanduser().is_dir():
                value = os.path.join(value, inner)
            problem = output_path_problem(value)
            if problem:
                raise ConfigError(f"{label}({kind}).{field}: {problem}")
    if kind == "twitch":
        _check_twitch(checked, label)
    if kind == "youtube":
        _check_youtube(checked, label)
    return {"kind": kind, **settings}


#: sink settings that name a file the sink writes (a URL there is left to the sink)
OUTPUT_FIELDS = ("path", "output")


def output_files(sinks: list[dict], where: str) -> dict[str, str]:
    """Where a stream's sinks write: ``{real path or URL: "sinks[i] (kind)"}``, from its validated ``sinks``
    blocks (a sink's default path counts: a bare ``jsonl`` writes ``events.jsonl``). A network output
    (``rtmp://...``, ``srt://...``: a burn-in or restream target) counts by its URL, as two publishers to
    one stream key fight over it; stdout does not count. Relative paths are taken from the working
    directory, as the sinks open them. Print the keys through ``redact`` (a URL may hold a stream key).

    Raises ConfigError naming ``where`` when two of the stream's sinks write one file or one URL."""
    from .plugins import sink_class

    out: dict[str, str] = {}
    for i, block in enumerate(sinks):
        settings = dict(block)
        kind = settings.pop("kind")
        try:
            checked = sink_class(kind).Settings.model_validate(settings)
        except Exception:  # validate() checked it already
            continue
        for field in OUTPUT_FIELDS:
            value = getattr(checked, field, None)
            if not isinstance(value, str) or not value or value in ("-", "stdout"):
                continue
            key = value.rstrip("/") if "://" in value else os.path.realpath(os.path.expanduser(value))
            label = f"sinks[{i}] ({kind})"
            if key in out:
                raise ConfigError(f"{where}: {label} writes {redact(key)}, as {out[key]} does: give each sink its own "
                                  f"{'URL' if '://' in key else 'file'}")
            out[key] = label
    return out


def output_path_problem(target: str) -> str | None:
    """Why a file cannot be created at ``target`` (None: it can, as far as can be told before writing).

    Caught here, before the model loads, rather than by a sink that retries forever: a directory, a path
    under a regular file, a folder with no write permission, a symlink loop, a dangling symlink into a folder
    that does not exist (a dangling symlink into a folder that does is fine: the file is created where it
    points). A symlink to a file is checked where it points. A target with ``://`` is a URL: not checked.
    """
    if "://" in target:
        return None
    p = Path(target).expanduser()
    if p.is_symlink():
        try:
            p.stat()
        except FileNotFoundError:  # dangling: the file would be created where it points
            real = Path(os.path.realpath(p))
            if not real.parent.is_dir():
                return f"{target} is a symlink to {real}, whose folder {real.parent} does not exist"
        except OSError as e:  # ELOOP
            return f"{target}: a symlink loop ({e.strerror})"
        p = Path(os.path.realpath(p))
    if p.is_dir():
        return f"{target} is a directory (give a file name in it)"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{target}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{target}: no permission to write in {parent}"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{target}: no permission to write it"
    # permission bits do not tell everything (root passes every check; /proc, a read-only mount): try it. A
    # regular file is opened for appending (its content and times unchanged); for a new file, a probe file is
    # created and removed in the nearest folder that exists (missing folders are made when the sink opens)
    try:
        if p.is_file():
            os.close(os.open(p, os.O_WRONLY | os.O_APPEND))
        elif not p.exists():
            probe = parent / f".livecc-probe-{os.getpid()}-{threading.get_ident()}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
    except OSError as e:
        return f"{target}: cannot write {'it' if p.exists() else f'a file in {parent}'} ({e.strerror})"
    return None


TWITCH_HOST_SUFFIX = "twitch.tv"


def _check_twitch(settings: Any, label: str) -> None:
    """Twitch drops what an anonymous (token-less) user posts: refuse to start a sink that would post nothing.

    Plain IRC servers (``host`` not ``*.twitch.tv``) accept anonymous users: no token needed there."""
    host = str(getattr(settings, "host", "")).lower().rstrip(".")
    if not (host == TWITCH_HOST_SUFFIX or host.endswith("." + TWITCH_HOST_SUFFIX)):
        return
    token = getattr(settings, "token", None)
    env = getattr(settings, "token_env", "TWITCH_OAUTH_TOKEN")
    if token is None and not os.environ.get(env):
        raise ConfigError(f"{label}(twitch): no OAuth token: Twitch drops every message of an anonymous user, "
                          f"so nothing would be posted. Set ${env} (or token: in the config; a bot account's "
                          "token from https://dev.twitch.tv/docs/irc/authenticate-bot)")


def _check_youtube(settings: Any, label: str) -> None:
    """The ingestion key is read from the environment only (never the config): without it nothing can be sent."""
    env = getattr(settings, "key_env", "YOUTUBE_CAPTION_KEY")
    if not os.environ.get(env):
        raise ConfigError(f"{label}(youtube): no caption ingestion key: set ${env} to the cid= value of the URL "
                          "YouTube Studio shows (Go live -> Stream settings -> captions: POST captions to URL)")


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
            if spec.strip().endswith(":") and target is None:
                raise ConfigError(f"--sink {redact(spec)}: empty target after ':' (give one, e.g. "
                                  f"{kind}:TARGET, or write --sink {kind} for the sink's default)")
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
