"""The control API, metrics and health routes, mounted on the process's HTTP server (``pipeline/server.py``).

    GET  /metrics       Prometheus text format (the pipeline's own registry)
    GET  /health        {"live": .., "ready": ..}; 200 when ready, 503 otherwise
    GET  /health/live   200 while the pipeline runs          GET /health/ready  200 once captions can flow
    GET  /api/status    the pipeline's snapshot as JSON
    POST /api/query     {"query": "..."}     the commentary instruction, sent with the next turn; the reply
                        comes when that turn is out: {"query", "turn", "caption", ...} (202 while paused)
    POST /api/ask       {"question": "..."}  answered from the stream so far; the answer also goes to the sinks
    POST /api/pause     stop captioning (capture keeps running)      POST /api/resume

Security (done by the server for every route): the server binds 127.0.0.1 by default. When a token
is configured (it must be when the server binds anything but loopback) every request except /health
needs ``Authorization: Bearer TOKEN``. Browsers: a request with an ``Origin`` header is refused unless
it is same-origin or listed in ``server.cors_origins`` (a web page cannot drive the API from the
viewer's browser). Here: bodies are JSON only (``server.read_json``: size, time, UTF-8, depth), and
texts are plain text of at most ``server.max_text_chars`` characters (``ControlAPI._text``).
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web

from .config import ServerSection
from .metrics import CONTENT_TYPE
from .server import Route, bad_request, error, read_json

log = logging.getLogger("livecc.control")

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON decodes a valid pair to one character: these are lone


class ControlAPI:
    """The routes above, for ``pipeline.server.HttpServer.mount``; the server does the checks
    (Host, Origin, token, body size); this class checks what the caller's JSON says."""

    def __init__(self, pipeline, settings: ServerSection):
        self.pipeline = pipeline
        self.s = settings

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/metrics", self.metrics),
            Route("GET", "/health", self.health, public=True),
            Route("GET", "/health/live", self.health_live, public=True),
            Route("GET", "/health/ready", self.health_ready, public=True),
            Route("GET", "/api/status", self.status),
            Route("POST", "/api/query", self.query),
            Route("POST", "/api/ask", self.ask),
            Route("POST", "/api/pause", self.pause),
            Route("POST", "/api/resume", self.resume),
        ]

    async def _text(self, request: web.Request, key: str) -> str:
        """``body[key]`` as plain text: a string, valid Unicode (no lone surrogate such as an
        escaped ``\\ud800``), C0 control characters and DEL removed, not empty, at most
        ``max_text_chars``. Raises 400 / 413 (and ``read_json``'s 400 / 408 / 413 / 415)."""
        body = await read_json(request, self.s.max_request_bytes, self.s.request_timeout_s)
        if not isinstance(body, dict) or not isinstance(body.get(key), str):
            raise bad_request(f'expected {{"{key}": "..."}}')
        if _SURROGATE.search(body[key]):
            raise bad_request(f"{key} is not valid Unicode (a lone surrogate)")
        text = _CONTROL_CHARS.sub("", body[key]).strip()
        if not text:
            raise bad_request(f"{key} is empty")
        if len(text) > self.s.max_text_chars:
            raise web.HTTPRequestEntityTooLarge(max_size=self.s.max_text_chars, actual_size=len(text),
                                                text=f"{key} is over {self.s.max_text_chars} characters")
        return text

    # -- handlers -------------------------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, self.pipeline.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def health(self, request: web.Request) -> web.Response:
        p = self.pipeline
        cap = p.capture
        source = {"state": cap.state, "reason": cap.state_reason} if cap is not None else {"state": "new", "reason": ""}
        return web.json_response({"live": p.live, "ready": p.ready, "state": p.state, "source": source},
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
        fut = self.pipeline.set_query(text)
        if self.pipeline.paused:  # no turn will carry it until resumed: don't hold the request
            return web.json_response({"query": text, "pending": True}, status=202)
        try:
            # set between turns; answered once the next caption turn, the first to carry it, is out
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.s.answer_timeout_s)
        except asyncio.TimeoutError:
            return web.json_response({"query": text, "pending": True}, status=202)
        except Exception as e:
            return error(503, str(e))
        if result.get("turn") is not None:
            log.info("query changed (from turn %d)", result["turn"])
        return web.json_response(result)

    async def ask(self, request: web.Request) -> web.Response:
        text = await self._text(request, "question")
        fut = self.pipeline.ask(text)
        try:
            ans = await asyncio.wait_for(asyncio.wrap_future(fut), self.s.answer_timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()
            return error(504, f"no answer within {self.s.answer_timeout_s:g} s")
        except Exception as e:
            from .engine import ContextFullError

            return error(409 if isinstance(e, ContextFullError) else 503, f"{type(e).__name__}: {e}")
        return web.json_response({"question": text, "answer": ans.text, "at": round(ans.start, 3),
                                  "turn": ans.turn, "latency_s": round(ans.latency_s, 3)})

    async def pause(self, request: web.Request) -> web.Response:
        return web.json_response({"paused": self.pipeline.pause()})

    async def resume(self, request: web.Request) -> web.Response:
        return web.json_response({"paused": self.pipeline.resume()})
