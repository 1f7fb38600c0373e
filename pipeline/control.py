"""The control API, metrics and health routes, mounted on the shared HTTP server (the overlay's).

    GET  /metrics       Prometheus text format (the pipeline's own registry)
    GET  /health        {"live": .., "ready": ..}; 200 when ready, 503 otherwise
    GET  /health/live   200 while the pipeline runs          GET /health/ready  200 once captions can flow
    GET  /api/status    the pipeline's snapshot as JSON
    POST /api/query     {"query": "..."}     the commentary instruction, sent with the next turn; the reply
                        comes when that turn is out: {"query", "turn", "caption", ...} (202 while paused)
    POST /api/ask       {"question": "..."}  answered from the stream so far; the answer also goes to the sinks
    POST /api/pause     stop captioning (capture keeps running)      POST /api/resume

Security: the server binds 127.0.0.1 by default. When a token is configured (it must be when the
server binds anything but loopback) every request except /health needs ``Authorization: Bearer
TOKEN``. Browsers: a request with an ``Origin`` header is refused unless it is same-origin or listed
in ``server.cors_origins`` (a web page cannot drive the API from the viewer's browser). Bodies are
JSON only, capped in bytes, and texts in characters.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import Awaitable, Callable

from aiohttp import web

from .config import ServerSection
from .metrics import CONTENT_TYPE

log = logging.getLogger("livecc.control")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ControlAPI:
    def __init__(self, pipeline, settings: ServerSection):
        self.pipeline = pipeline
        self.s = settings
        self._token = settings.token.encode() if settings.token else None

    def mount(self, server) -> None:
        """Add the routes to an ``OverlayServer`` (before or after it starts)."""
        routes: list[tuple[str, str, Handler, bool]] = [
            ("GET", "/metrics", self.metrics, True),
            ("GET", "/health", self.health, False),
            ("GET", "/health/live", self.health_live, False),
            ("GET", "/health/ready", self.health_ready, False),
            ("GET", "/api/status", self.status, True),
            ("POST", "/api/query", self.query, True),
            ("POST", "/api/ask", self.ask, True),
            ("POST", "/api/pause", self.pause, True),
            ("POST", "/api/resume", self.resume, True),
        ]
        for method, path, handler, auth in routes:
            server.add_route(method, path, self._guarded(handler, auth))
            if path.startswith("/api/"):
                server.add_route("OPTIONS", path, self._preflight)

    # -- checks ---------------------------------------------------------------------------------------
    def _origin(self, request: web.Request) -> tuple[bool, str | None]:
        """(allowed, origin to echo in Access-Control-Allow-Origin)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True, None  # not a browser page (curl, OBS, Prometheus)
        if origin in self.s.cors_origins:
            return True, origin
        m = re.match(r"^https?://([^/]+)$", origin)
        if m and m.group(1).lower() == (request.host or "").lower():
            return True, None  # same origin
        return False, None

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self._token)

    def _guarded(self, handler: Handler, auth: bool) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            ok, echo = self._origin(request)
            if not ok:
                return _error(403, "cross-origin request refused (add the origin to server.cors_origins)")
            if auth and not self._authorized(request):
                resp = _error(401, "missing or wrong token (Authorization: Bearer TOKEN)")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="livecc"'
                return resp
            if request.content_length is not None and request.content_length > self.s.max_request_bytes:
                return _error(413, f"request body over {self.s.max_request_bytes} bytes")
            resp = await handler(request)
            if echo is not None:
                resp.headers["Access-Control-Allow-Origin"] = echo
                resp.headers["Vary"] = "Origin"
            return resp
        return guarded

    async def _preflight(self, request: web.Request) -> web.StreamResponse:
        ok, echo = self._origin(request)
        if not ok or echo is None:
            return _error(403, "cross-origin request refused")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": echo, "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600"})

    async def _text(self, request: web.Request, key: str) -> str | web.Response:
        if request.content_type != "application/json":
            return _error(415, "send JSON (Content-Type: application/json)")
        try:
            raw = await request.content.read(self.s.max_request_bytes + 1)
        except Exception:
            return _error(400, "could not read the request body")
        if len(raw) > self.s.max_request_bytes:
            return _error(413, f"request body over {self.s.max_request_bytes} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get(key), str):
            return _error(400, f'expected {{"{key}": "..."}}')
        text = _CONTROL_CHARS.sub("", body[key]).strip()
        if not text:
            return _error(400, f"{key} is empty")
        if len(text) > self.s.max_text_chars:
            return _error(413, f"{key} is over {self.s.max_text_chars} characters")
        return text

    # -- handlers -------------------------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, self.pipeline.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def health(self, request: web.Request) -> web.Response:
        p = self.pipeline
        return web.json_response({"live": p.live, "ready": p.ready, "state": p.state},
                                 status=200 if p.ready else 503)

    async def health_live(self, request: web.Request) -> web.Response:
        live = self.pipeline.live
        return web.json_response({"live": live}, status=200 if live else 503)

    async def health_ready(self, request: web.Request) -> web.Response:
        ready = self.pipeline.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.pipeline.snapshot())

    async def query(self, request: web.Request) -> web.Response:
        text = await self._text(request, "query")
        if isinstance(text, web.Response):
            return text
        fut = self.pipeline.set_query(text)
        if self.pipeline.paused:  # no turn will carry it until resumed: don't hold the request
            return web.json_response({"query": text, "pending": True}, status=202)
        try:
            # set between turns; answered once the next caption turn, the first to carry it, is out
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.s.answer_timeout_s)
        except asyncio.TimeoutError:
            return web.json_response({"query": text, "pending": True}, status=202)
        except Exception as e:
            return _error(503, str(e))
        if result.get("turn") is not None:
            log.info("query changed (from turn %d)", result["turn"])
        return web.json_response(result)

    async def ask(self, request: web.Request) -> web.Response:
        text = await self._text(request, "question")
        if isinstance(text, web.Response):
            return text
        fut = self.pipeline.ask(text)
        try:
            ans = await asyncio.wait_for(asyncio.wrap_future(fut), self.s.answer_timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()
            return _error(504, f"no answer within {self.s.answer_timeout_s:g} s")
        except Exception as e:
            from .engine import ContextFullError

            return _error(409 if isinstance(e, ContextFullError) else 503, f"{type(e).__name__}: {e}")
        return web.json_response({"question": text, "answer": ans.text, "at": round(ans.start, 3),
                                  "turn": ans.turn, "latency_s": round(ans.latency_s, 3)})

    async def pause(self, request: web.Request) -> web.Response:
        return web.json_response({"paused": self.pipeline.pause()})

    async def resume(self, request: web.Request) -> web.Response:
        return web.json_response({"paused": self.pipeline.resume()})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
