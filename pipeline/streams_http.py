"""The HTTP API of a service of many streams, shared by ``livecc serve`` (``serve.Service``: every stream in this
process) and ``livecc serve --cluster`` (``cluster.service.ClusterService``: streams in Ray actors):

    GET    /api/streams                    every stream's status
    POST   /api/streams                    {"id", "source", ...} as in the streams file -> 201
    DELETE /api/streams/{id}
    GET    /api/streams/{id}/status        POST /api/streams/{id}/query | ask | pause | resume (as /api/...)
    GET    /overlay/{id}[/...]             the stream's sink pages (an ``overlay`` sink of that stream)
    GET    /metrics                        every stream's families, labelled ``stream="{id}"``
    GET    /health                         {"live", "ready", "streams", "capacity", "free", ...}

``StreamsHTTP`` holds the handlers; a service provides the few operations that differ (see its abstract
methods) and may add routes of its own (``extra_routes``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .app import PipelineError
from .config import ConfigError
from .control import ControlAPI
from .metrics import CONTENT_TYPE
from .server import Route, bad_request, error, read_json


class StreamConflict(PipelineError):
    """A stream that clashes with one that runs or is starting: its id is taken, a file it would write is
    written by another stream, or it is still starting (HTTP 409)."""


class StreamsHTTP:
    """Mixin: ``http_routes()`` for ``serve.start_server``. Needs ``self.cfg`` (``cfg.server``: the server's
    settings), ``self.streams`` (id -> the service's record of a stream), ``self.registry`` (Prometheus) and the
    service's ``add_stream``, ``remove_stream`` and ``snapshot``; the methods below marked "a service's" too."""

    cfg: Any
    streams: dict
    registry: Any

    # -- what a service provides ---------------------------------------------------------------------------
    def health(self) -> dict:
        """A service's: ``{"live": bool, ...}`` (200 when live, else 503)."""
        raise NotImplementedError

    def added(self, stream) -> dict:
        """A service's: the 201 body for a stream ``add_stream`` returned."""
        raise NotImplementedError

    def controlled(self, stream):
        """A service's: what ``ControlAPI`` drives for the stream (``set_query``, ``ask``, ``paused``,
        ``pause``, ``resume``)."""
        raise NotImplementedError

    def stream_status(self, stream) -> dict:
        """A service's: the stream's snapshot (may block: it runs in a thread)."""
        raise NotImplementedError

    async def sink_route(self, stream, request: web.Request) -> web.StreamResponse:
        """A service's: answer a request under ``/overlay/{id}`` with the stream's sink routes."""
        raise web.HTTPNotFound()

    def extra_routes(self) -> list[Route]:
        return []

    # -- the routes ------------------------------------------------------------------------------------------
    def http_routes(self) -> list[Route]:
        return [
            Route("GET", "/health", self._health, public=True),
            Route("GET", "/metrics", self._metrics),
            Route("GET", "/api/streams", self._list),
            Route("POST", "/api/streams", self._add),
            Route("DELETE", "/api/streams/{id}", self._remove),
            Route("GET", "/api/streams/{id}/status", self._status),
            Route("POST", "/api/streams/{id}/query", self._control("query")),
            Route("POST", "/api/streams/{id}/ask", self._control("ask")),
            Route("POST", "/api/streams/{id}/pause", self._control("pause")),
            Route("POST", "/api/streams/{id}/resume", self._control("resume")),
            # a stream's sink pages: the overlay page and its script and style are public, as on one stream
            Route("GET", "/overlay/{id}/overlay.js", self._sink, public=True),
            Route("GET", "/overlay/{id}/overlay.css", self._sink, public=True),
            Route("GET", "/overlay/{id}", self._sink, public=True),
            Route("GET", "/overlay/{id}/{tail:.+}", self._sink),
        ] + self.extra_routes()

    @staticmethod
    async def _run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _stream(self, request: web.Request):
        st = self.streams.get(request.match_info["id"])
        if st is None:
            raise web.HTTPNotFound(text=f"no stream {request.match_info['id']!r}")
        return st

    async def _health(self, request: web.Request) -> web.Response:
        body = self.health()
        return web.json_response(body, status=200 if body["live"] else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import generate_latest

        body = await self._run(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.snapshot))

    async def _add(self, request: web.Request) -> web.Response:
        srv = self.cfg.server
        spec = await read_json(request, srv.max_request_bytes, srv.request_timeout_s)
        try:
            st = await self._run(self.add_stream, spec, "POST /api/streams")
        except ConfigError as e:
            raise bad_request(str(e)) from None
        except PipelineError as e:
            return error(409 if isinstance(e, StreamConflict) or "exists already" in str(e) else 503, str(e))
        return web.json_response(self.added(st), status=201)

    async def _remove(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        try:
            final = await self._run(self.remove_stream, sid)
        except KeyError:
            return error(404, f"no stream {sid!r}")
        except StreamConflict as e:
            return error(409, str(e))
        return web.json_response({"id": sid, "sinks": final})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.stream_status, self._stream(request)))

    def _control(self, name: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            api = ControlAPI(self.controlled(self._stream(request)), self.cfg.server)
            return await getattr(api, name)(request)
        return handler

    async def _sink(self, request: web.Request) -> web.StreamResponse:
        return await self.sink_route(self._stream(request), request)
