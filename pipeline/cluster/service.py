"""``livecc serve STREAMS.yaml --cluster ADDRESS``: the streams of a streams file spread over the GPUs of a Ray
cluster, behind the same HTTP API as the one-process ``livecc serve`` (``pipeline/serve.py``).

- A ``GpuWorker`` actor (``worker.py``) per unit of the worker resource (``GPU`` by default: one per GPU) on
  every node that has it, made as nodes join; a ``StreamActor`` (``stream.py``) per stream, on the head node
  (where ``livecc serve`` runs and sources are read from; Ray's soft affinity spreads actors even when the
  node has room, so it is a hard one), restarted by Ray if its process dies.
- Placement: a stream is pinned to one worker (its KV-cache row lives there); a new stream goes to the ready
  worker with the most free rows; a stream that fits nowhere is refused (``PipelineError``, HTTP 503).
- Failure: a worker that does not answer a ping within ``PING_TIMEOUT_S`` (its process or node killed) is
  dropped and its streams move to the survivors with the most free rows: each opens a fresh context on its
  recent commentary (as a rollover does) and serves the turn that was in flight there. An event names the
  stream, the old and the new worker (``GET /api/events``, the stream's sinks, the log).
- ``POST /api/nodes/{node}/drain`` (``livecc drain NODE``) moves a node's streams away and ends its workers;
  no new worker is made there.

The HTTP API is ``serve.py``'s (``streams_http.StreamsHTTP``) plus ``GET /api/nodes``,
``POST /api/nodes/{node}/drain`` and ``GET /api/events``. A stream's sink pages (``/overlay/{id}...``) are served
by its actor on a loopback server of its own (a random token) and passed through by the head (``proxy``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
import time

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from ..app import PipelineError
from ..config import validate
from ..config import output_files
from ..serve import EndedStreams, OutputClaims, check_streams, start_server, stream_config
from ..server import HttpServer, Route, error
from ..streams_http import StreamsHTTP

log = logging.getLogger("livecc.cluster")

PING_EVERY_S = 1.0  # the supervisor's round: pings, moves, new nodes
PING_TIMEOUT_S = 4.0  # a ready worker silent this long is dead (moved streams resume within ~PING_TIMEOUT_S + a turn)
START_TIMEOUT_S = 180.0  # a stream actor's start (opening its source, its session)
NAMESPACE = "livecc"


@dataclasses.dataclass
class _Worker:
    name: str
    handle: object
    node: str  # Ray node id (hex)
    ready: bool = False
    draining: bool = False
    info: dict = dataclasses.field(default_factory=dict)  # the last ping
    ping: object = None  # the outstanding ping's ObjectRef
    ping_sent: float = 0.0


@dataclasses.dataclass
class _Stream:
    sid: str
    handle: object
    worker: str  # where its session (KV-cache row) lives
    incarnation: float = 0.0
    ping: object = None
    sinks: dict | None = None  # {port, token}: the loopback server of its sink pages, on the head node


class _StreamControl:
    """What ``ControlAPI`` asks of a pipeline, forwarded to the stream's actor."""

    def __init__(self, handle, answer_timeout_s: float):
        self.h, self.timeout = handle, answer_timeout_s

    def set_query(self, text: str):
        return self.h.set_query.remote(text, self.timeout).future()

    def ask(self, text: str):
        return self.h.ask.remote(text, self.timeout).future()

    @property
    def paused(self) -> bool:
        import ray

        return ray.get(self.h.ping.remote(), timeout=10)["paused"]

    def pause(self) -> bool:
        import ray

        return ray.get(self.h.pause.remote(), timeout=10)

    def resume(self) -> bool:
        import ray

        return ray.get(self.h.resume.remote(), timeout=10)


class _Collector:
    """Every stream's families labelled ``stream``, plus each worker's: ``livecc_worker_{up,slots,free_slots,
    streams}`` and ``livecc_worker_turns_total``, labelled ``worker`` and ``node``."""

    def __init__(self, service: "ClusterService"):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        import ray

        svc = self.service
        streams = list(svc.streams.values())
        refs = [s.handle.metrics.remote() for s in streams]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5) if refs else ([], [])
        families: dict[str, Metric] = {}
        for s, ref in zip(streams, refs):
            if ref not in ready:
                continue
            try:
                text = ray.get(ref).decode()
            except Exception:  # noqa: BLE001 - a stream actor restarting
                continue
            for fam in text_string_to_metric_families(text):
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for smp in fam.samples:
                    out.add_sample(smp.name, {**smp.labels, "stream": s.sid}, smp.value, smp.timestamp)
        yield from families.values()
        labels = ["worker", "node"]
        up = GaugeMetricFamily("livecc_worker_up", "1 while the worker answers its pings", labels=labels)
        slots = GaugeMetricFamily("livecc_worker_slots", "KV-cache rows (streams) of the worker", labels=labels)
        free = GaugeMetricFamily("livecc_worker_free_slots", "rows not taken", labels=labels)
        nstreams = GaugeMetricFamily("livecc_worker_streams", "streams placed on the worker", labels=labels)
        turns = CounterMetricFamily("livecc_worker_turns", "turns served by the worker", labels=labels)
        for w in list(svc.workers.values()):
            lv = [w.name, w.node[:12]]
            up.add_metric(lv, 1.0 if w.ready else 0.0)
            slots.add_metric(lv, w.info.get("slots", 0))
            free.add_metric(lv, w.info.get("free", 0))
            nstreams.add_metric(lv, len(svc.placed_on(w.name)))
            turns.add_metric(lv, w.info.get("turns", 0))
        yield from (up, slots, free, nstreams, turns)


class ClusterService(StreamsHTTP):
    """``start()``, ``add_stream``/``remove_stream``/``drain`` at any time, ``wait()``, ``stop()`` (as ``Service``).

    ``address``: ``ray://HOST:PORT``, ``HOST:PORT`` or ``auto`` (a running cluster this machine belongs to).
    ``resource``: the Ray resource a worker takes one of (``GPU``, or a custom one such as ``gpu_slot``)."""

    def __init__(self, shared: dict, streams: list, *, address: str, resource: str = "GPU",
                 where: str = "streams file"):
        self.shared = {k: v for k, v in shared.items() if k != "streams"}
        self.cfg = validate(dict(self.shared), where)
        self.stream_shared = {**self.shared, "server": {**(self.shared.get("server") or {}), "enabled": False}}
        self.where, self.address, self.resource = where, address, resource
        self.specs = list(streams or [])
        self.workers: dict[str, _Worker] = {}
        self.streams: dict[str, _Stream] = {}
        self.ended = EndedStreams()  # streams that ended by themselves: their sinks' final status
        self.events: list[dict] = []
        self.drained: set[str] = set()  # node ids: no new workers there
        self.lost: set[str] = set()  # node ids whose worker died: none made there again (a node back is a new id)
        self.server: HttpServer | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._supervisor: threading.Thread | None = None
        # the streams' sinks all run on the head node (``_Stream``): two never write one file or URL there; their
        # sources are opened there too, but a source file may be on a shared mount: not checked here
        self._files = OutputClaims()
        check_streams(self.stream_shared, self.specs, where, sources=False)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, ready_timeout: float = 600.0) -> "ClusterService":
        import ray

        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            ray.init(address=self.address, namespace=NAMESPACE, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            msg = str(e)
            if "Could not find any running Ray instance" in msg:  # Ray's advice names its own --address flag
                msg = ("no running Ray cluster found on this machine: start one (`ray start --head`, docs/cluster.md) "
                       "or give its address: --cluster HOST:6379 or --cluster ray://HOST:10001")
            raise PipelineError(f"--cluster {self.address}: {msg}") from None
        if threading.current_thread() is threading.main_thread():
            for s, h in handlers.items():  # ray.init puts its own in place: SIGTERM must stop the streams cleanly
                signal.signal(s, h)
        self._Worker = ray.remote(max_restarts=0, max_concurrency=64)(_worker_class())
        self._Stream = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=16)(_stream_class())
        self._head_node = next((n["NodeID"] for n in ray.nodes() if n.get("Alive")
                                and "node:__internal_head__" in n.get("Resources", {})),
                               ray.get_runtime_context().get_node_id())
        if self.cfg.server.enabled:
            self._start_server()
        self._round()
        end = time.monotonic() + ready_timeout
        while not any(w.ready for w in self.workers.values()):
            if time.monotonic() > end:
                raise PipelineError(f"no GPU worker became ready within {ready_timeout:.0f} s (does any node have "
                                    f"the resource {self.resource!r}? `ray status` lists them)")
            time.sleep(0.5)
            self._round()
        self._supervisor = threading.Thread(target=self._supervise, name="livecc-cluster", daemon=True)
        self._supervisor.start()
        for i, spec in enumerate(self.specs):
            self.add_stream(spec, f"{self.where}: streams[{i}]")
        return self

    def _start_server(self) -> None:
        self.server = start_server(self.cfg.server, self.http_routes())

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def request_stop(self) -> None:
        self._done.set()

    def stop(self) -> dict:
        """Stop every stream (sinks finalised) and every worker; returns {stream: {sink: final status}}."""
        import ray

        self._done.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
        out = dict(self.ended)
        for sid in list(self.streams):
            try:
                out[sid] = self.remove_stream(sid)
            except Exception as e:  # noqa: BLE001 - the others still stop
                log.error("stream %s did not stop cleanly: %s", sid, e)
        for w in list(self.workers.values()):
            ray.kill(w.handle, no_restart=True)
        self.workers.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        ray.shutdown()
        return out

    # -- placement ----------------------------------------------------------------------------------------
    def placed_on(self, worker: str) -> list[str]:
        return [s.sid for s in list(self.streams.values()) if s.worker == worker]

    def _free(self, w: _Worker) -> int:
        return w.info.get("slots", 0) - len(self.placed_on(w.name))

    def _best(self, exclude: str | None = None) -> _Worker | None:
        """The ready, not draining worker with the most free rows (None if every row is taken)."""
        cands = [w for w in self.workers.values() if w.ready and not w.draining and w.name != exclude
                 and self._free(w) > 0]
        return max(cands, key=lambda w: (self._free(w), -len(self.placed_on(w.name)), w.name), default=None)

    def _capacity(self) -> str:
        ready = [w for w in self.workers.values() if w.ready and not w.draining]
        return f"{sum(w.info.get('slots', 0) for w in ready)} rows on {len(ready)} worker(s)"

    def add_stream(self, spec: dict, where: str = "stream") -> _Stream:
        """Start a stream on the worker with the most free rows. Raises ConfigError (bad entry) or PipelineError
        (id taken, no room anywhere, a source that cannot be opened)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        sid, scfg = stream_config(self.stream_shared, spec, where)
        files = output_files(scfg.sinks, f"{where} ({sid})")
        with self._lock:
            if sid in self.streams:
                raise PipelineError(f"stream {sid!r} exists already")
            w = self._best()
            if w is None:
                raise PipelineError(f"no room for stream {sid!r}: every KV-cache row is taken ({self._capacity()}; "
                                    "add a GPU node, or engine.max_streams / engine.max_context)")
            self._files.claim(sid, files)
            handle = self._Stream.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(self._head_node, soft=False),
            ).remote(sid, scfg, list(scfg.sinks or [{"kind": "console"}]))
            st = self.streams[sid] = _Stream(sid, handle, w.name)
        try:
            info = ray.get(handle.start.remote(w.handle, w.name), timeout=START_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            with self._lock:
                self.streams.pop(sid, None)
                self._files.release(sid)
            ray.kill(handle, no_restart=True)
            cause = getattr(e, "cause", None) or e
            raise PipelineError(f"stream {sid!r}: {cause}") from None
        st.incarnation, st.sinks = info["incarnation"], info.get("sinks")
        self._event("placed", sid, to=w.name)
        return st

    def remove_stream(self, sid: str) -> dict:
        """Stop a stream (its sinks finalise their files); KeyError if unknown."""
        import ray

        with self._lock:
            st = self.streams.pop(sid)
        try:
            return ray.get(st.handle.stop.remote(), timeout=self.cfg.shutdown.sinks_timeout_s + 30)
        finally:
            ray.kill(st.handle, no_restart=True)
            with self._lock:
                self._files.release(sid)  # once its sinks have finalised their files

    def drain(self, node: str) -> dict:
        """Move the streams of ``node`` (a node id, a prefix of one, or its name/address) away and end its
        workers. KeyError: no such node. Streams that fit nowhere stay (listed in ``stuck``)."""
        import ray

        nid = self._node_id(node)
        with self._lock:
            self.drained.add(nid)
            mine = [w for w in self.workers.values() if w.node == nid]
            for w in mine:
                w.draining = True
        moved, stuck = {}, []
        for w in mine:
            for sid in self.placed_on(w.name):
                to = self._move(sid, "drained", exclude=w.name)
                (moved.__setitem__(sid, to) if to else stuck.append(sid))
            if not self.placed_on(w.name):
                with self._lock:
                    self.workers.pop(w.name, None)
                ray.kill(w.handle, no_restart=True)
        self._event("node_drained", None, detail=f"{nid[:12]}: moved {moved or 'nothing'}"
                    + (f", no room for {stuck}" if stuck else ""))
        return {"node": nid, "moved": moved, "stuck": stuck}

    def _node_id(self, node: str) -> str:
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        hits = [n["NodeID"] for n in alive if n["NodeID"].startswith(node) or node in (n.get("NodeName"),)]
        if len(hits) != 1:
            raise KeyError(f"{'no' if not hits else 'more than one'} live node matches {node!r} "
                           f"(GET /api/nodes lists them)")
        return hits[0]

    def _move(self, sid: str, why: str, exclude: str | None = None) -> str | None:
        """Move a stream to the best other worker; its name, or None when no worker has room."""
        import ray

        with self._lock:
            st = self.streams.get(sid)
            if st is None:
                return None
            w = self._best(exclude=exclude or st.worker)
            if w is None:
                self._event("no_room", sid, detail=f"{why} on {st.worker}; waiting for a free row")
                return None
            old, st.worker = st.worker, w.name  # counted there from now on
        try:
            info = ray.get(st.handle.move.remote(w.handle, w.name), timeout=30)
            st.incarnation, st.sinks = info["incarnation"], info.get("sinks")
        except Exception as e:  # noqa: BLE001 - tried again next round
            log.warning("stream %s: move to %s failed: %s", sid, w.name, e)
            st.worker = old
            return None
        self._event("moved", sid, detail=why, **{"from": old, "to": w.name})
        return w.name

    def _event(self, kind: str, sid: str | None, **kw) -> None:
        ev = {"time": round(time.time(), 3), "kind": kind, "stream": sid, **kw}
        self.events.append(ev)
        del self.events[:-500]
        log.warning("%s", " ".join(f"{k}={v}" for k, v in ev.items() if v is not None and k != "time"))

    # -- the supervisor: pings, deaths, new nodes ---------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._done.wait(PING_EVERY_S):
            try:
                self._round()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("cluster supervisor round failed")

    def _round(self) -> None:
        self._new_workers()
        self._check_workers()
        self._check_streams()

    def _new_workers(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ecfg = self.cfg.engine_config()
        for n in ray.nodes():
            want = int(n.get("Resources", {}).get(self.resource, 0))
            nid = n["NodeID"]
            if not n.get("Alive") or want == 0 or nid in self.drained or nid in self.lost:
                continue
            for i in range(want):
                name = f"{n.get('NodeManagerAddress', '?')}/{nid[:8]}/{i}"
                if name in self.workers:
                    continue
                res = {"num_gpus": 1} if self.resource == "GPU" else {"resources": {self.resource: 1}}
                handle = self._Worker.options(
                    num_cpus=0, **res, scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False),
                ).remote(ecfg, name)
                w = self.workers[name] = _Worker(name, handle, nid)
                w.ping, w.ping_sent = handle.ping.remote(), time.monotonic()
                log.info("worker %s: loading %s", name, ecfg.model)

    def _check_workers(self) -> None:
        import ray

        now = time.monotonic()
        dead = []
        for w in list(self.workers.values()):
            ready, _ = ray.wait([w.ping], timeout=0)
            if ready:
                try:
                    w.info = ray.get(w.ping)
                except Exception as e:  # noqa: BLE001 - the actor (or its node) died
                    dead.append((w, f"{type(e).__name__}"))
                    continue
                if not w.ready:
                    w.ready = True
                    self._event("worker_ready", None, worker=w.name, detail=f"{w.info['slots']} rows")
                w.ping, w.ping_sent = w.handle.ping.remote(), now
            elif w.ready and now - w.ping_sent > PING_TIMEOUT_S:
                dead.append((w, f"no answer for {now - w.ping_sent:.1f} s"))
        for w, why in dead:
            with self._lock:
                self.workers.pop(w.name, None)
                self.lost.add(w.node)
            ray.kill(w.handle, no_restart=True)
            if w.ready:
                self._event("worker_lost", None, worker=w.name, detail=why)
            else:
                log.warning("worker %s did not start: %s", w.name, why)
        for w, why in dead:
            for sid in self.placed_on(w.name):
                self._move(sid, f"worker {w.name} lost ({why})", exclude=w.name)
        for st in list(self.streams.values()):  # streams left waiting for a row
            if st.worker not in self.workers:
                self._move(st.sid, f"worker {st.worker} lost")

    def _check_streams(self) -> None:
        """A stream actor Ray restarted is started again on its worker; one whose source ended is removed."""
        import ray

        for st in list(self.streams.values()):
            if st.ping is None:
                st.ping = st.handle.ping.remote()
                continue
            ready, _ = ray.wait([st.ping], timeout=0)
            if not ready:
                continue
            try:
                info = ray.get(st.ping)
            except Exception:  # noqa: BLE001 - being restarted by Ray
                st.ping = None
                continue
            st.ping = None
            w = self.workers.get(st.worker)
            restarted = st.incarnation and info["incarnation"] != st.incarnation and not info["started"]
            if restarted and w is not None and w.ready:
                info = ray.get(st.handle.start.remote(w.handle, w.name), timeout=START_TIMEOUT_S)
                st.incarnation, st.sinks = info["incarnation"], info.get("sinks")
                self._event("stream_restarted", st.sid, worker=w.name)
            elif info["ended"] and st.sid in self.streams:
                self.ended.add(st.sid, self.remove_stream(st.sid))
                self._event("stream_ended", st.sid, detail=info["error"])

    # -- reporting --------------------------------------------------------------------------------------------
    def nodes(self) -> dict:
        import ray

        out = {}
        for n in ray.nodes():
            nid = n["NodeID"]
            out[nid] = {"name": n.get("NodeName"), "alive": n.get("Alive"), "drained": nid in self.drained,
                        "address": f"{n.get('NodeManagerAddress')}:{n.get('NodeManagerPort')}",
                        self.resource: n.get("Resources", {}).get(self.resource, 0),
                        "workers": {w.name: {"ready": w.ready, "draining": w.draining, "slots": w.info.get("slots"),
                                             "free": self._free(w) if w.ready else None,
                                             "streams": self.placed_on(w.name)}
                                    for w in list(self.workers.values()) if w.node == nid}}
        return out

    def snapshot(self) -> dict:
        import ray

        streams = list(self.streams.values())
        refs = [s.handle.snapshot.remote() for s in streams]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10) if refs else ([], [])
        snaps = {}
        for s, ref in zip(streams, refs):
            try:
                snaps[s.sid] = ray.get(ref) if ref in ready else {"stream": s.sid, "state": "unreachable"}
            except Exception as e:  # noqa: BLE001
                snaps[s.sid] = {"stream": s.sid, "state": "restarting", "error": type(e).__name__}
            snaps[s.sid]["worker"] = s.worker
        ws = [w for w in self.workers.values() if w.ready and not w.draining]
        return {"streams": snaps, "capacity": sum(w.info.get("slots", 0) for w in ws),
                "free": sum(self._free(w) for w in ws), "workers": len(ws)}

    # -- HTTP (the per-stream routes: ``streams_http.StreamsHTTP``) ----------------------------------------------
    def extra_routes(self) -> list[Route]:
        return [
            Route("GET", "/api/nodes", self._nodes),
            Route("POST", "/api/nodes/{node}/drain", self._drain),
            Route("GET", "/api/events", self._events),
        ]

    def health(self) -> dict:
        ws = [w for w in list(self.workers.values()) if w.ready and not w.draining]
        live = bool(ws)
        return {"live": live, "ready": live and bool(self.streams), "streams": len(self.streams),
                "workers": len(ws), "capacity": sum(w.info.get("slots", 0) for w in ws),
                "free": sum(self._free(w) for w in ws)}

    def added(self, st: _Stream) -> dict:
        return {"id": st.sid, "worker": st.worker}

    def controlled(self, st: _Stream) -> _StreamControl:
        return _StreamControl(st.handle, self.cfg.server.answer_timeout_s)

    def stream_status(self, st: _Stream) -> dict:
        import ray

        return {**ray.get(st.handle.snapshot.remote(), timeout=10), "worker": st.worker}

    async def sink_route(self, st: _Stream, request: web.Request) -> web.StreamResponse:
        """The stream's sink pages, served by its actor on a loopback server of its own: passed through."""
        if not st.sinks:
            raise web.HTTPNotFound()
        return await proxy(request, f"http://127.0.0.1:{st.sinks['port']}", st.sinks["token"])

    async def _nodes(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.nodes))

    async def _events(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.events))

    async def _drain(self, request: web.Request) -> web.Response:
        try:
            out = await self._run(self.drain, request.match_info["node"])
        except KeyError as e:
            return error(404, str(e.args[0]))
        return web.json_response(out, status=200 if not out["stuck"] else 409)


# what a proxied answer keeps of the upstream's headers (the head's server adds its own security headers to
# answers it has not sent yet; a stream passed through is sent as it comes, with the upstream's)
_PASSED = ("Content-Type", "Cache-Control", "Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy",
           "X-Accel-Buffering")


async def proxy(request: web.Request, base: str, token: str) -> web.StreamResponse:
    """``request`` (a GET) passed to the server at ``base`` with ``token``: a WebSocket relayed both ways, an
    event stream relayed as it comes, anything else read whole. 502 when that server does not answer."""
    import aiohttp

    query = [(k, v) for k, v in request.query.items() if k != "token"]  # the head's token stays here
    url = base + str(request.rel_url.with_query(query))
    headers = {"Authorization": f"Bearer {token}"}
    for h in ("Accept", "Last-Event-ID"):
        if h in request.headers:
            headers[h] = request.headers[h]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await _relay_ws(request, session, url, headers)
            async with session.get(url, headers=headers, allow_redirects=False) as up:
                kept = {h: up.headers[h] for h in _PASSED if h in up.headers}
                if up.content_type != "text/event-stream":
                    return web.Response(status=up.status, body=await up.read(), headers=kept)
                resp = web.StreamResponse(status=up.status, headers=kept)
                await resp.prepare(request)
                try:
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                except (ConnectionError, aiohttp.ClientError, asyncio.TimeoutError):
                    pass  # either side went away: the page reconnects
                return resp
    except (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError, asyncio.TimeoutError) as e:
        return error(502, f"the stream's sink server does not answer ({type(e).__name__})")


async def _relay_ws(request: web.Request, session, url: str, headers: dict) -> web.StreamResponse:
    import aiohttp

    try:
        up = await session.ws_connect(url, headers=headers, autoping=True, max_msg_size=1 << 20)
    except aiohttp.WSServerHandshakeError as e:
        return error(e.status, f"the stream's sink server refused the WebSocket: {e.message}")
    down = web.WebSocketResponse(heartbeat=15.0, max_msg_size=4096)
    async with up:
        await down.prepare(request)

        async def pipe(src, dst) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                else:
                    break

        tasks = [asyncio.ensure_future(pipe(up, down)), asyncio.ensure_future(pipe(down, up))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await down.close()
    return down

def _worker_class():
    from .worker import GpuWorker

    return GpuWorker


def _stream_class():
    from .stream import StreamActor

    return StreamActor
