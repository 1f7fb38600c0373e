"""OBS overlay sink: a caption page for OBS's Browser Source, pushed over WebSocket or SSE.

Routes, on the process's HTTP server (``pipeline/server.py``) or, for a sink given its own
address, on a server of its own. ``P`` is the sink's prefix: empty for an unnamed sink, whose
page is ``/overlay``; ``/overlay/NAME`` for a sink with ``name: NAME``, whose page is ``P``:

  ``/overlay`` or ``P``     the page (public): transparent; styling from this sink's config, each
                            value overridable by a URL parameter (``font``, ``size``, ``color``,
                            ``background``, ``box``, ``shadow``, ``position``, ``align``, ``fade``
                            (ms), ``mode`` rollup|replace, ``keep``, ``ttl`` (s), ``transport``
                            auto|ws|sse, ``token``)
  ``P/overlay.js``, ``P/overlay.css``   its script and style (public)
  ``P/ws``                  WebSocket push of captions (the page reconnects by itself)
  ``P/events``              the same as Server-Sent Events (fallback; ``?transport=sse`` forces it)
  ``P/captions.json``       the most recent captions (bounded)

The data routes (``ws``, ``events``, ``captions.json``) need the server's token when it has one
(off loopback); the page passes its own ``?token=`` on to them. Captions reach the page as JSON and
are inserted with ``textContent``; a Content-Security-Policy allowing only the page's own script
adds a second wall. Cross-origin WebSockets are refused by the server.

Slow clients: each page has a bounded queue (``QUEUE``) and a bounded socket send buffer
(``SEND_BUFFER``); a send that does not complete within ``write_timeout_s``, or a full queue, drops
the page. A WebSocket page that does not answer a ping within ``ping_s / 2`` is dropped (aiohttp's
heartbeat). An SSE stream ends after ``sse_max_s``: the browser reconnects at once and gets what it
missed from ``Last-Event-ID`` (every caption carries an ``id``), so a client that never reads holds
its slot at most that long. At most ``max_clients`` pages at once; more get a 503.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

from aiohttp import WSMsgType, web
from pydantic import field_validator, model_validator

from pipeline.fanout.sink import CaptionText, Sink
from pipeline.server import CSP, HttpServer, Route, is_loopback

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("assets")
TOKEN_ENV = "LIVECC_API_TOKEN"
QUEUE = 64  # messages waiting per page; a page this far behind is dropped (it reconnects)
SEND_BUFFER = 64 * 1024  # bytes buffered per page (kernel and asyncio each) before a send waits
_CSS_VALUE = re.compile(r"^[#(),.%\w\s\"'-]{0,120}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def valid_unicode(text: str) -> str:
    """``text`` with every lone surrogate (not encodable as UTF-8) replaced by U+FFFD; a pair
    split in two code points is joined. Anything sent to a page must encode."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _json_for_html(obj: Any) -> str:
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class OverlaySink(Sink):
    name = "overlay"
    target_field = "listen"

    class Settings(CaptionText):
        name: str | None = None  # the page's name: /overlay/NAME (none: /overlay)
        host: str | None = None  # with port / listen: a server of its own at that address
        port: int | None = None  # 0: any free port
        listen: str | int | None = None  # "HOST:PORT" or PORT shorthand (``--sink overlay:8765``)
        token: str | None = None  # its own server off loopback: the token (or $LIVECC_API_TOKEN)
        allowed_hosts: list[str] = []  # its own server: extra Host header names to accept
        max_clients: int = 64
        recent: int = 50  # captions kept for /captions.json and for pages that (re)connect
        answer_prefix: str = ""  # the page marks answers itself (class "answer")
        ping_s: float = 15.0  # SSE comment / WebSocket ping interval
        write_timeout_s: float = 10.0  # a page that takes no data for this long is dropped
        sse_max_s: float = 120.0  # an SSE stream is renewed after this (the page reconnects, losing nothing)
        # page defaults (each overridable with a URL parameter of the same name)
        font: str = '"DejaVu Sans", "Segoe UI", Arial, sans-serif'
        size: int = 42
        color: str = "#ffffff"
        background: str = "rgba(0,0,0,0.6)"
        box: bool = True
        shadow: bool = True
        position: Literal["bottom", "top", "middle"] = "bottom"
        align: Literal["center", "left", "right"] = "center"
        fade: int = 300  # ms
        mode: Literal["rollup", "replace"] = "rollup"  # rollup: the last `keep` fragments flow together
        keep: int = 3
        ttl: float = 10.0  # s without a caption before the box fades out (0: never)

        @field_validator("font", "color", "background")
        @classmethod
        def _css(cls, v: str) -> str:
            if not _CSS_VALUE.match(v):
                raise ValueError("unexpected characters for a CSS value")
            return v

        @field_validator("name")
        @classmethod
        def _name(cls, v: str | None) -> str | None:
            if v is not None and not _NAME.match(v):
                raise ValueError("use 1-32 lowercase letters, digits, '-' or '_' (it is a URL path)")
            return v

        @model_validator(mode="after")
        def _own_server_token(self):
            host = self.address()[0]
            if host is not None and not is_loopback(host) and not (self.token or os.environ.get(TOKEN_ENV)):
                raise ValueError(f"host {host} is not loopback: set token (or ${TOKEN_ENV}) so the captions "
                                 "are not open to anyone who can reach it")
            return self

        def address(self) -> tuple[str | None, int | None]:
            """(host, port) given in the settings; (None, None): the process's server."""
            host, port = self.host, self.port
            if self.listen not in (None, ""):
                h, sep, p = str(self.listen).rpartition(":")
                if sep:
                    host = h.strip("[]") or host
                port = int(p)
            if host is None and port is None:
                return None, None
            return host or "127.0.0.1", 8765 if port is None else port

    PAGE_KEYS = ("font", "size", "color", "background", "box", "shadow", "position", "align", "fade", "mode", "keep", "ttl")

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        s = self.settings
        self.host, self.port = s.address()
        self.prefix = f"/overlay/{s.name}" if s.name else ""
        self.page = self.prefix or "/overlay"
        self.server: HttpServer | None = None
        self._own_server = False
        self.recent: collections.deque[tuple[int, dict]] = collections.deque(maxlen=s.recent)  # (id, caption)
        self._ids = itertools.count(1)
        self._clients: dict[asyncio.Queue, web.Request] = {}  # event loop thread only
        page = {k: getattr(s, k) for k in self.PAGE_KEYS}
        page.update(box="1" if s.box else "0", shadow="1" if s.shadow else "0", prefix=self.prefix)
        self._html = (ASSETS / "overlay.html").read_text(encoding="utf-8") \
            .replace("__PREFIX__", self.prefix).replace("__CONFIG__", _json_for_html(page))

    # --- routes --------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        p = self.prefix
        return [
            Route("GET", self.page, self._page, public=True),
            Route("GET", f"{p}/overlay.js", self._asset, public=True),
            Route("GET", f"{p}/overlay.css", self._asset, public=True),
            Route("GET", f"{p}/ws", self._ws),
            Route("GET", f"{p}/events", self._sse),
            Route("GET", f"{p}/captions.json", self._captions),
        ]

    def mount(self, server: HttpServer) -> None:
        """Serve on the process's server unless this sink was given another address."""
        if self.host is not None and (self.host, self.port) != (server.host, server.port):
            return
        server.mount(self.routes())
        self.server = server

    @property
    def url(self) -> str:
        base = self.server.url if self.server else f"http://{self.host or '127.0.0.1'}:{self.port or 8765}"
        return base + self.page

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.server is None:  # no process server to share (livecc caption, server.enabled false) or another address
            s = self.settings
            host, port = self.host or "127.0.0.1", 8765 if self.port is None else self.port
            server = HttpServer(host, port, token=s.token or os.environ.get(TOKEN_ENV) or None,
                                allowed_hosts=s.allowed_hosts, name="overlay")
            server.mount(self.routes())
            server.start()
            self.server, self._own_server = server, True
        log.info("overlay at %s", self.url)

    def on_caption(self, caption) -> None:
        text = self.text_of(caption)
        if text is None or self.server is None:
            return  # silence (by default): the page keeps the previous caption
        c = caption.to_json()
        c.pop("token_ids", None)
        c["text"] = text
        self.publish({"type": "caption", "caption": c})

    def publish(self, message: dict) -> None:
        """Send one message to every page (thread-safe); captions are also kept in ``recent``."""
        data = json.dumps(message, ensure_ascii=False)
        if (valid := valid_unicode(data)) is not data:  # a lone surrogate would fail every send, and the
            data, message = valid, json.loads(valid)  # hello of each reconnect: the page would be cut off
        msg_id = None
        if message.get("type") == "caption":
            msg_id = next(self._ids)
            self.recent.append((msg_id, message["caption"]))
        loop = self.server.loop if self.server is not None else None
        if loop is not None and self.server.running:
            loop.call_soon_threadsafe(self._fanout, msg_id, data)

    def stop(self) -> None:
        srv = self.server
        if srv is not None and srv.running:
            self.drop_clients()
            if self._own_server:
                srv.stop()
        self.server, self._own_server = None, False

    def describe(self) -> str:
        return f"overlay:{self.url}"

    def stats(self) -> dict:
        srv = self.server
        return {"url": self.url, "clients": len(self._clients), "running": bool(srv and srv.running)}

    def drop_clients(self) -> None:
        """Disconnect every page (they reconnect by themselves)."""
        if self.server is not None and self.server.running:
            asyncio.run_coroutine_threadsafe(self._drop_all(), self.server.loop).result(5)

    # --- event loop side ----------------------------------------------------------------
    async def _drop_all(self) -> None:
        for q in list(self._clients):
            self._drop(q)

    def _fanout(self, msg_id: int | None, data: str) -> None:
        for q in list(self._clients):
            try:
                q.put_nowait((msg_id, data))
            except asyncio.QueueFull:  # QUEUE messages behind: cut it off, its page will reconnect
                log.warning("overlay page %s is %d messages behind: dropped", self.page, QUEUE)
                self._drop(q)

    def _drop(self, q: asyncio.Queue) -> None:
        """End a page's stream: its handler wakes up on ``None``; the connection is aborted."""
        request = self._clients.pop(q, None)
        while not q.empty():
            q.get_nowait()
        q.put_nowait(None)
        if request is not None and request.transport is not None:
            request.transport.abort()  # not close(): that would wait for a reader that may never read

    def _join(self, request: web.Request) -> asyncio.Queue | None:
        if len(self._clients) >= self.settings.max_clients:
            return None
        q: asyncio.Queue = asyncio.Queue(maxsize=QUEUE)
        self._clients[q] = request
        transport = request.transport
        if transport is not None:  # bound what a page that stops reading can hold here
            transport.set_write_buffer_limits(high=SEND_BUFFER)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        return q

    async def _send(self, coro) -> None:
        await asyncio.wait_for(coro, self.settings.write_timeout_s)

    def _hello(self) -> str:
        return json.dumps({"type": "hello", "recent": [c for _, c in self.recent][-10:]}, ensure_ascii=False)

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=self._html, content_type="text/html", charset="utf-8")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[1]
        ctype = "text/javascript" if name.endswith(".js") else "text/css"
        return web.Response(text=(ASSETS / name).read_text(encoding="utf-8"), content_type=ctype, charset="utf-8")

    async def _captions(self, request: web.Request) -> web.Response:
        return web.json_response({"captions": [c for _, c in self.recent]})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        q = self._join(request)
        if q is None:
            return web.Response(status=503, text="too many clients\n")
        ws = web.WebSocketResponse(heartbeat=self.settings.ping_s, max_msg_size=4096)
        try:
            await ws.prepare(request)

            async def drain_incoming() -> None:  # pages send nothing; read to see closes and pongs
                async for msg in ws:
                    if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                        break

            reader = asyncio.ensure_future(drain_incoming())
            try:
                await self._send(ws.send_str(self._hello()))
                while not ws.closed:
                    getter = asyncio.ensure_future(q.get())
                    done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        break
                    item = getter.result()
                    if item is None:
                        break
                    await self._send(ws.send_str(item[1]))
            finally:
                reader.cancel()
        except (ConnectionError, RuntimeError, asyncio.TimeoutError):
            pass  # the page went away, or stopped reading: it is dropped below
        finally:
            self._drop(q)
        return ws

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        q = self._join(request)
        if q is None:
            return web.Response(status=503, text="too many clients\n")
        s = self.settings
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no",
                                           "Cache-Control": "no-store", "Content-Security-Policy": CSP})
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + s.sse_max_s
        try:
            await self._send(resp.prepare(request))
            await self._send(resp.write(b"retry: 1000\n\n" + self._resume(request.headers.get("Last-Event-ID"))))
            while (left := renew_at - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(q.get(), min(s.ping_s, left))
                except asyncio.TimeoutError:
                    await self._send(resp.write(b": ping\n\n"))
                    continue
                if item is None:
                    break
                msg_id, data = item
                await self._send(resp.write(f"id: {msg_id}\ndata: {data}\n\n".encode() if msg_id
                                            else f"data: {data}\n\n".encode()))
        except (ConnectionError, RuntimeError, asyncio.TimeoutError):
            pass
        finally:
            self._drop(q)
        return resp

    def _resume(self, last_event_id: str | None) -> bytes:
        """What a (re)connecting SSE page gets first: the captions after ``Last-Event-ID`` when
        they are all still in ``recent``, else a hello with the latest ones."""
        recent = list(self.recent)
        if last_event_id and last_event_id.isdigit() and recent and recent[0][0] <= int(last_event_id) + 1 \
                and int(last_event_id) <= recent[-1][0]:
            after = int(last_event_id)
            return b"".join(f"id: {i}\ndata: {json.dumps({'type': 'caption', 'caption': c}, ensure_ascii=False)}\n\n"
                            .encode() for i, c in recent if i > after)
        return f"data: {self._hello()}\n\n".encode()
