"""Many live streams in one process: one model and engine core (``engine_worker.py``), one HTTP server, one
``Pipeline`` per stream (its own capture, sampler, clip queue, session, sinks, metrics).

A streams file is a ``livecc run`` config (``engine``, ``server``, ``status``, ``log``, ``shutdown``, and
defaults for ``capture``, ``sampler``, ``sinks``) plus ``streams:``, a list of

    {id: court1, source: rtmp://..., query: "...", sinks: [...], capture: {...}, sampler: {...}}

(``id``: letters, digits, ``-``, ``_``; ``query`` sets ``engine.query`` for that stream; ``capture`` and
``sampler`` are merged over the shared blocks; ``sinks`` replaces them). Streams can be added and removed
while it runs (the routes, shared with ``--cluster``: ``streams_http.py``):

    GET    /api/streams                    every stream's status
    POST   /api/streams                    {"id", "source", ...} as in the file -> 201
    DELETE /api/streams/{id}
    GET    /api/streams/{id}/status        POST /api/streams/{id}/query | ask | pause | resume (as /api/...)
    GET    /overlay/{id}                   the stream's overlay page (an ``overlay`` sink of that stream)
    GET    /metrics                        every stream's families, labelled ``stream="{id}"``
    GET    /health                         {"live", "ready", "streams", "capacity", "free"}

Two streams never write one file or publish to one URL (``config.output_files``): a second stream naming a
file or an output URL (an RTMP stream key) that a running one writes is refused (HTTP 409), as is a streams
file with such streams or with one id twice (before the model loads); ``--cluster`` checks the same
(``check_streams``, ``OutputClaims``: every stream's sinks run on its head node).
A stream that does not fit (every KV-cache row taken: ``engine.max_streams`` or what the GPU's memory
allows at ``engine.max_context``) is refused with a message saying how many fit.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from .app import Pipeline, PipelineError, resolve_source
from .config import ConfigError, RunConfig, output_files, validate
from .redact import redact
from .server import HttpServer, Route, from_settings
from .streams_http import StreamConflict, StreamsHTTP

log = logging.getLogger("livecc.serve")

STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: "$" would let a trailing newline through
STREAM_KEYS = {"id", "source", "query", "sinks", "capture", "sampler"}


def stream_config(shared: dict, spec: Any, where: str) -> tuple[str, RunConfig]:
    """(id, the stream's RunConfig) from the shared sections and one ``streams:`` entry.

    Raises ConfigError naming ``where`` and the key."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with id and source")
    unknown = set(spec) - STREAM_KEYS
    if unknown:
        import difflib

        key = sorted(map(str, unknown))[0]
        close = difflib.get_close_matches(key, sorted(STREAM_KEYS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: unknown key {key!r} ({hint}a stream takes {', '.join(sorted(STREAM_KEYS))})")
    sid = spec.get("id")
    if not isinstance(sid, str) or not STREAM_ID.fullmatch(sid):
        raise ConfigError(f"{where}.id: {sid!r} is not a stream id (letters, digits, '-', '_'; at most 64)")
    if not spec.get("source"):
        raise ConfigError(f"{where}.source: missing")
    data = copy.deepcopy(shared)
    for key in ("capture", "sampler"):
        if spec.get(key) is not None:
            if not isinstance(spec[key], dict):
                raise ConfigError(f"{where}.{key}: expected a mapping")
            data[key] = {**(data.get(key) or {}), **spec[key]}
    data.setdefault("capture", {})["source"] = spec["source"]
    if spec.get("query") is not None:
        data.setdefault("engine", {})["query"] = spec["query"]
    if spec.get("sinks") is not None:
        data["sinks"] = spec["sinks"]
    return sid, validate(data, f"{where} ({sid})")


def check_source(scfg: RunConfig, where: str) -> None:
    """A stream's source can be resolved here (a known kind; a file that exists): nothing is opened.

    Raises ConfigError naming ``where`` (a client error: HTTP 400). Not for ``--cluster``, whose files
    are on the workers' machines."""
    try:
        resolve_source(scfg.capture.source, scfg.capture)
    except PipelineError as e:
        raise ConfigError(f"{where}: source: {e}") from None


def check_streams(shared: dict, specs: list, where: str, sources: bool = True) -> None:
    """Every ``streams:`` entry before anything starts: valid, ids unique, no two streams writing one file or URL
    (``config.output_files``) and, with ``sources``, each source resolvable here (``check_source``). Raises
    ConfigError naming the entry."""
    ids: dict[str, int] = {}
    files: dict[str, str] = {}
    for i, spec in enumerate(specs):
        label = f"{where}: streams[{i}]"
        sid, scfg = stream_config(shared, spec, label)
        if sid in ids:
            raise ConfigError(f"{label}.id: {sid!r} is taken by streams[{ids[sid]}] (ids must be unique)")
        ids[sid] = i
        if sources:
            check_source(scfg, f"{label} ({sid})")
        for path, sink in output_files(scfg.sinks, f"{label} ({sid})").items():
            if path in files:
                raise ConfigError(f"{label} ({sid}): {sink} writes {redact(path)}, as stream {files[path]!r} "
                                  "does: give each stream its own file or URL (sinks: in its entry)")
            files[path] = sid


class OutputClaims:
    """Which stream (running or starting) writes each file or URL of ``config.output_files``: a stream added while
    another writes one of its outputs is refused. Not locked: callers hold their own lock around it."""

    def __init__(self) -> None:
        self.by_path: dict[str, str] = {}  # real path or URL -> stream id

    def claim(self, sid: str, files: dict[str, str]) -> None:
        """Reserve ``files`` (``output_files``' result) for ``sid``; StreamConflict if another stream has one."""
        for path, sink in files.items():
            if path in self.by_path:
                raise StreamConflict(f"stream {sid!r}: {sink} writes {redact(path)}, which stream "
                                     f"{self.by_path[path]!r} writes already (give each stream its own file or URL)")
        self.by_path.update(dict.fromkeys(files, sid))

    def release(self, sid: str) -> None:
        """``sid``'s outputs may be written by another stream again."""
        for path in [path for path, owner in self.by_path.items() if owner == sid]:
            del self.by_path[path]


def start_server(settings, routes: list[Route]) -> HttpServer:
    """The service's HTTP server (``settings``: the ``server:`` block) with ``routes``, listening.

    Raises PipelineError when it cannot listen (the port is taken, a bad address)."""
    server = from_settings(settings)
    server.mount(routes)
    try:
        server.start()
    except OSError as e:
        raise PipelineError(f"server: {e} (is another livecc running? set --port)") from None
    log.info("control API and metrics at %s (streams at %s/api/streams)", server.url, server.url)
    return server


class _StreamRoutes:
    """What a stream's sinks mount on: routes go into this stream's own table (served through the service's
    ``/overlay/{id}...`` routes, which exist from the start, so streams can come and go); anything else
    (the event loop, the URL) is the real server's."""

    def __init__(self, server: HttpServer):
        self._server = server
        self.table: dict[tuple[str, str], Route] = {}

    def mount(self, routes) -> None:
        for r in routes:
            key = (r.method.upper(), r.path)
            if key in self.table:
                raise ValueError(f"{r.method} {r.path} is mounted twice")
            self.table[key] = r

    def __getattr__(self, name):
        return getattr(self._server, name)


class _Merged:
    """Every stream's metric families, each sample labelled with its stream id (one Prometheus exposition)."""

    def __init__(self, service: "Service"):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        families: dict[str, Metric] = {}
        for sid, p in list(self.service.streams.items()):
            for fam in p.metrics.registry.collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "stream": sid}, s.value, s.timestamp, s.exemplar)
        yield from families.values()


class EndedStreams(dict):
    """Streams that ended by themselves (source over or failed): id -> {sink: final status}, for the service's summary
    and exit status at its stop. A service runs for months with streams coming and going, so this is bounded: the
    newest ``keep`` that lost data (a sink ``failed`` or ``hung``: they decide the exit status) and the newest ``keep``
    that did not; ``dropped_clean``/``dropped_lost`` count the ones let go."""

    def __init__(self, keep: int = 256):
        super().__init__()
        self.keep = keep
        self.dropped_clean = self.dropped_lost = 0

    @staticmethod
    def lost(final: dict) -> bool:
        return any(v.get("state") in ("failed", "hung") for v in final.values() if isinstance(v, dict))

    def add(self, sid: str, final: dict) -> None:
        self.pop(sid, None)
        self[sid] = final
        for lost in (False, True):
            kind = [k for k, v in self.items() if self.lost(v) == lost]
            for k in kind[:max(0, len(kind) - self.keep)]:  # oldest first (dicts keep insertion order)
                del self[k]
                if lost:
                    self.dropped_lost += 1
                else:
                    self.dropped_clean += 1


class Service(StreamsHTTP):
    """``start()``, ``add_stream``/``remove_stream`` at any time, ``wait()``, ``stop()``."""

    def __init__(self, shared: dict, streams: list, *, where: str = "streams file", engine=None):
        self.shared = {k: v for k, v in shared.items() if k != "streams"}
        self.cfg = validate(dict(self.shared), where)
        self.where = where
        self.specs = list(streams or [])
        self.engine = engine
        self.streams: dict[str, Pipeline] = {}
        self.routes: dict[str, _StreamRoutes] = {}
        self.server: HttpServer | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Merged(self))
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.ended = EndedStreams()  # streams that ended by themselves: their sinks' final status
        self._starting: set[str] = set()  # ids of streams being started (not in ``streams`` yet)
        self._files = OutputClaims()
        check_streams(self.shared, self.specs, where)  # every stream checked before the model loads

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "Service":
        from .engine_worker import EngineWorker

        if self.cfg.server.enabled:
            self._start_server()
        if self.engine is None:
            ecfg = self.cfg.engine_config()
            log.info("loading %s", ecfg.model)
            self.engine = EngineWorker(ecfg, slots=ecfg.max_streams or None, cpu_slots=max(4, len(self.specs)))
        self.engine.start()
        for i, spec in enumerate(self.specs):
            self.add_stream(spec, f"{self.where}: streams[{i}]")
        return self

    def _start_server(self) -> None:
        self.server = start_server(self.cfg.server, self.http_routes())

    def add_stream(self, spec: dict, where: str = "stream") -> Pipeline:
        """Start a stream from a ``streams:`` entry; returns its running Pipeline. Raises ConfigError (a bad
        entry, a source that cannot be resolved, two of its sinks on one file), StreamConflict (its id is taken,
        or a file it would write is written by another stream: running or starting) or PipelineError (no free
        KV-cache row, a stream that fails to start). The id, the files and a row are reserved at once, so
        concurrent calls cannot share them."""
        sid, scfg = stream_config(self.shared, spec, where)
        check_source(scfg, f"{where} ({sid})")
        files = output_files(scfg.sinks, f"{where} ({sid})")
        with self._lock:  # the id, the files and a KV-cache row are reserved together, before anything starts
            if sid in self.streams or sid in self._starting:
                raise StreamConflict(f"stream {sid!r} exists already")
            if self._free() <= 0:
                raise PipelineError(f"no room for stream {sid!r}: all {self.engine.slots} streams of "
                                    f"{self.engine.cfg.max_context} context tokens are taken on this GPU "
                                    "(engine.max_streams / engine.max_context)")
            self._files.claim(sid, files)
            self._starting.add(sid)
        p = None
        try:
            from .plugins import make_sink

            sinks = []
            for block in scfg.sinks or [{"kind": "console"}]:
                block = dict(block)
                if block.get("kind") == "overlay" and not block.get("name"):
                    block["name"] = sid  # /overlay/{id}
                sinks.append(make_sink(block))
            mounts = _StreamRoutes(self.server) if self.server is not None else None
            if mounts is not None:
                for sink in sinks:
                    sink.mount(mounts)
            p = Pipeline(scfg, engine=self.engine, stream_id=sid, sinks=sinks, server=mounts)
            p.start()
        except BaseException:
            if p is not None:
                p.stop()
            with self._lock:
                self._starting.discard(sid)
                self._files.release(sid)
            raise
        with self._lock:
            self._starting.discard(sid)
            stopping = self._done.is_set()
            if not stopping:
                self.streams[sid] = p
                if mounts is not None:
                    self.routes[sid] = mounts
        if stopping:  # the service stopped while this stream started: stop() did not see it
            p.stop()
            with self._lock:
                self._files.release(sid)
            raise PipelineError(f"stream {sid!r}: the service is stopping")
        threading.Thread(target=self._watch, args=(sid, p), name=f"livecc-watch-{sid}", daemon=True).start()
        log.info("stream %s: %s", sid, p.source.display)
        return p

    def _watch(self, sid: str, p: Pipeline) -> None:
        """A stream whose source ended (or failed) is stopped and removed; the service goes on."""
        p.wait()
        with self._lock:
            mine = self.streams.get(sid) is p
        if mine and not self._done.is_set():
            final = self.remove_stream(sid)
            self.ended.add(sid, final)
            log.info("stream %s ended%s", sid, f" ({p.error})" if p.error else "")

    def remove_stream(self, sid: str) -> dict:
        """Stop a stream (its sinks finalise their files) and free its KV-cache row and its files; returns its
        sinks' final status. KeyError if unknown; StreamConflict while it is still starting."""
        with self._lock:
            if sid in self._starting:
                raise StreamConflict(f"stream {sid!r} is starting: remove it once it runs")
            p = self.streams.pop(sid)
            self.routes.pop(sid, None)
        try:
            return p.stop()
        finally:
            with self._lock:
                self._files.release(sid)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def request_stop(self) -> None:
        self._done.set()

    def stop(self) -> dict:
        """Stop every stream, the engine and the server; returns {stream: {sink: final status}}."""
        self._done.set()
        out = dict(self.ended)
        for sid in list(self.streams):
            try:
                out[sid] = self.remove_stream(sid)
            except (KeyError, StreamConflict):  # gone meanwhile, or still starting (add_stream stops it: _done)
                pass
        if self.engine is not None:
            self.engine.stop(self.cfg.shutdown.turn_timeout_s)
        if self.server is not None:
            self.server.stop()
            self.server = None
        return out

    def _free(self) -> int:
        """KV-cache rows free for another stream (rows of streams still starting are taken)."""
        return max(0, self.engine.free_slots - len(self._starting)) if self.engine is not None else 0

    # -- reporting -----------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"streams": {sid: p.snapshot() for sid, p in list(self.streams.items())},
                "capacity": self.engine.slots if self.engine else 0,
                "free": self._free()}

    # -- HTTP (the routes: ``streams_http.StreamsHTTP``) -------------------------------------------------------
    def health(self) -> dict:
        ps = list(self.streams.values())
        live = self.engine is not None and self.engine.core.alive
        return {"live": live, "ready": bool(ps) and all(p.ready for p in ps), "streams": len(ps),
                "capacity": self.engine.slots if self.engine else 0,
                "free": self._free()}

    def added(self, p: Pipeline) -> dict:
        return {"id": p.stream_id, "source": p.source.display}

    def controlled(self, p: Pipeline) -> Pipeline:
        return p

    def stream_status(self, p: Pipeline) -> dict:
        return p.snapshot()

    async def sink_route(self, p: Pipeline, request: web.Request) -> web.StreamResponse:
        table = self.routes.get(p.stream_id)
        route = table.table.get((request.method, request.path)) if table is not None else None
        if route is None:
            raise web.HTTPNotFound()
        return await route.handler(request)
