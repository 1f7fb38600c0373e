"""OBS overlay sink: an HTTP server with a caption page for OBS's Browser Source.

Routes (all on one aiohttp server, bound to 127.0.0.1 by default):
  ``/overlay``        the page: transparent background; styling from the sink's config, each
                      value overridable by a URL parameter (``font``, ``size``, ``color``,
                      ``background``, ``box``, ``shadow``, ``position``, ``align``, ``fade`` (ms),
                      ``mode`` rollup|replace, ``keep``, ``ttl`` (s), ``transport`` auto|ws|sse)
  ``/ws``             WebSocket push of captions (the page reconnects by itself)
  ``/events``         the same as Server-Sent Events (fallback; ``?transport=sse`` forces it)
  ``/captions.json``  the most recent captions (bounded)

Captions reach the page as JSON and are inserted with ``textContent``; a Content-Security-Policy
allowing only the page's own script adds a second wall. Request bodies are capped, clients are
limited, and on loopback the Host header must name the loopback (DNS rebinding).

``OverlayServer`` is shareable: ``OverlayServer.shared(host, port)`` returns one server per
address, and ``add_route`` mounts more handlers (the control API) at any time, before or after
the server starts. The server runs its event loop in its own thread.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

from aiohttp import WSMsgType, web
from pydantic import field_validator

from pipeline.fanout.sink import CaptionText, Sink

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("assets")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; font-src 'self' data:; base-uri 'none'; form-action 'none'"
)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _json_for_html(obj: Any) -> str:
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class OverlayServer:
    """aiohttp server in its own thread, shared per (host, port); pushes captions to pages."""

    _shared: dict[tuple[str, int], "OverlayServer"] = {}
    _shared_lock = threading.Lock()

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        max_request_bytes: int = 64 * 1024,
        max_clients: int = 64,
        recent: int = 50,
        allowed_hosts: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.port = port  # the bound port once started (useful with port 0)
        self.max_clients = max_clients
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.recent: collections.deque = collections.deque(maxlen=recent)
        self.page_config: dict = {}
        self._dynamic: dict[tuple[str, str], Handler] = {}
        self._clients: set[asyncio.Queue] = set()
        self._websockets: set[web.WebSocketResponse] = set()
        self._users = 0
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=max_request_bytes, middlewares=[self._guard, self._dispatch_dynamic])
        self.app.router.add_get("/overlay", self._page)
        self.app.router.add_get("/overlay.js", self._asset)
        self.app.router.add_get("/overlay.css", self._asset)
        self.app.router.add_get("/ws", self._ws)
        self.app.router.add_get("/events", self._sse)
        self.app.router.add_get("/captions.json", self._captions)
        self.app.on_shutdown.append(self._on_shutdown)

    # --- sharing ---------------------------------------------------------------------
    @classmethod
    def shared(cls, host: str = "127.0.0.1", port: int = 8765, **kw: Any) -> "OverlayServer":
        """The one server for this address (port 0 always makes a new one)."""
        with cls._shared_lock:
            srv = cls._shared.get((host, port)) if port else None
            if srv is None:
                srv = cls(host, port, **kw)
                if port:
                    cls._shared[(host, port)] = srv
            return srv

    def acquire(self) -> "OverlayServer":
        """Start (if needed) and count one more user; pair with ``release``."""
        with self._lock:
            self._users += 1
        self.start()
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users <= 0
        if last:
            self.stop()
            with self._shared_lock:
                for k, v in list(self._shared.items()):
                    if v is self:
                        del self._shared[k]

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Mount a handler (``async def h(request) -> Response``), before or after start."""
        self._dynamic[(method.upper(), path)] = handler

    # --- lifecycle -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self.running:
                return
            ready = threading.Event()
            failure: list[BaseException] = []
            self.loop = asyncio.new_event_loop()

            def run() -> None:
                asyncio.set_event_loop(self.loop)
                try:
                    self.loop.run_until_complete(self._astart())
                except BaseException as e:
                    failure.append(e)
                    ready.set()
                    self.loop.close()
                    return
                ready.set()
                try:
                    self.loop.run_forever()
                finally:
                    self.loop.run_until_complete(self._astop())
                    self.loop.close()

            self._thread = threading.Thread(target=run, name=f"overlay-http-{self.port}", daemon=True)
            self._thread.start()
            ready.wait(timeout)
            if failure:
                self._thread.join()
                self._thread = None
                raise OSError(f"overlay server could not listen on {self.host}:{self.port}: {failure[0]}") from failure[0]
        log.info("overlay at %s/overlay", self.url)

    async def _astart(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sock = site._server.sockets[0]  # the bound port when 0 was asked for
        self.port = sock.getsockname()[1]

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _on_shutdown(self, app: web.Application) -> None:
        for q in list(self._clients):
            q.put_nowait(None)
        for ws in list(self._websockets):
            await ws.close()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            t, loop = self._thread, self.loop
            if t is None or loop is None or not t.is_alive():
                return
            loop.call_soon_threadsafe(loop.stop)
            t.join(timeout)
            self._thread = None

    # --- publishing (thread-safe) -------------------------------------------------------
    def publish(self, message: dict) -> None:
        """Send one message to every page; captions are also kept in ``recent``."""
        if message.get("type") == "caption":
            self.recent.append(message["caption"])
        data = json.dumps(message, ensure_ascii=False)
        loop = self.loop
        if loop is not None and self.running:
            loop.call_soon_threadsafe(self._fanout, data)

    def _fanout(self, data: str) -> None:
        for q in list(self._clients):
            try:
                q.put_nowait(data)
            except asyncio.QueueFull:  # a stuck client: cut it off, its page will reconnect
                self._clients.discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    def drop_clients(self) -> None:
        """Disconnect every page (they reconnect by themselves)."""
        if self.loop is not None and self.running:
            asyncio.run_coroutine_threadsafe(self._on_shutdown(self.app), self.loop).result(5)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # --- middleware --------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        hostname = (request.host or "").lower()
        hostname = hostname.rsplit(":", 1)[0] if not hostname.endswith("]") else hostname
        if _is_loopback(self.host) and hostname not in LOOPBACK_NAMES and hostname not in self.allowed_hosts:
            return web.Response(status=403, text="forbidden host\n")
        if not _is_loopback(self.host) and self.allowed_hosts and hostname not in self.allowed_hosts:
            return web.Response(status=403, text="forbidden host\n")
        try:
            resp = await handler(request)
        except web.HTTPException as e:  # 404, 405, 413 ...: same headers as any answer
            resp = web.Response(status=e.status, text=f"{e.reason}\n", headers={
                k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")})
        if not resp.prepared:  # streams (SSE, WebSocket) set theirs before preparing
            h = resp.headers
            h.setdefault("Content-Security-Policy", CSP)
            h.setdefault("X-Content-Type-Options", "nosniff")
            h.setdefault("Referrer-Policy", "no-referrer")
            h.setdefault("Cache-Control", "no-store")
        return resp

    @web.middleware
    async def _dispatch_dynamic(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        extra = self._dynamic.get((request.method, request.path))
        if extra is not None:
            return await extra(request)
        return await handler(request)

    # --- handlers ----------------------------------------------------------------------
    async def _page(self, request: web.Request) -> web.Response:
        html = (ASSETS / "overlay.html").read_text(encoding="utf-8")
        html = html.replace("__CONFIG__", _json_for_html(self.page_config))
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/")
        ctype = "text/javascript" if name.endswith(".js") else "text/css"
        return web.Response(text=(ASSETS / name).read_text(encoding="utf-8"), content_type=ctype, charset="utf-8")

    async def _captions(self, request: web.Request) -> web.Response:
        return web.json_response({"captions": list(self.recent)})

    def _origin_ok(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser (OBS, curl)
        m = re.match(r"^https?://([^/]+)$", origin)
        return bool(m) and m.group(1).lower() == (request.host or "").lower()

    def _new_client(self) -> asyncio.Queue | None:
        if len(self._clients) >= self.max_clients:
            return None
        q: asyncio.Queue = asyncio.Queue(maxsize=256)
        self._clients.add(q)
        return q

    def _hello(self) -> str:
        return json.dumps({"type": "hello", "recent": list(self.recent)[-10:]}, ensure_ascii=False)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if not self._origin_ok(request):
            return web.Response(status=403, text="cross-origin websocket refused\n")
        q = self._new_client()
        if q is None:
            return web.Response(status=503, text="too many clients\n")
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
        await ws.prepare(request)
        self._websockets.add(ws)

        async def drain_incoming() -> None:  # pages send nothing; read to see closes
            async for msg in ws:
                if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break

        reader = asyncio.ensure_future(drain_incoming())
        try:
            await ws.send_str(self._hello())
            while not ws.closed:
                getter = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                data = getter.result()
                if data is None:
                    break
                await ws.send_str(data)
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            reader.cancel()
            self._clients.discard(q)
            self._websockets.discard(ws)
            await ws.close()
        return ws

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        q = self._new_client()
        if q is None:
            return web.Response(status=503, text="too many clients\n")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no",
                                           "Cache-Control": "no-store", "Content-Security-Policy": CSP})
        try:
            await resp.prepare(request)
            await resp.write(b"retry: 1000\n\n")
            await resp.write(f"data: {self._hello()}\n\n".encode())
            while True:
                try:
                    data = await asyncio.wait_for(q.get(), 15)
                except asyncio.TimeoutError:
                    await resp.write(b": ping\n\n")
                    continue
                if data is None:
                    break
                await resp.write(f"data: {data}\n\n".encode())
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            self._clients.discard(q)
        return resp


_CSS_VALUE = re.compile(r"^[#(),.%\w\s\"'-]{0,120}$")


class OverlaySink(Sink):
    name = "overlay"
    target_field = "listen"

    class Settings(CaptionText):
        host: str = "127.0.0.1"
        port: int = 8765
        listen: str | int | None = None  # "HOST:PORT" or PORT shorthand (``--sink overlay:8765``)
        allowed_hosts: list[str] = []  # extra Host header names to accept
        max_request_bytes: int = 64 * 1024
        max_clients: int = 64
        recent: int = 50  # captions kept for /captions.json and for pages that (re)connect
        answer_prefix: str = ""  # the page marks answers itself (class "answer")
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

    PAGE_KEYS = ("font", "size", "color", "background", "box", "shadow", "position", "align", "fade", "mode", "keep", "ttl")

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        s = self.settings
        self.host, self.port = s.host, s.port
        if s.listen not in (None, ""):
            h, sep, p = str(s.listen).rpartition(":")
            if sep:
                self.host = h.strip("[]") or s.host
            self.port = int(p)
        self.server: OverlayServer | None = None

    @property
    def url(self) -> str:
        return (self.server.url if self.server else f"http://{self.host}:{self.port}") + "/overlay"

    def start(self) -> None:
        s = self.settings
        self.server = OverlayServer.shared(
            self.host, self.port, max_request_bytes=s.max_request_bytes,
            max_clients=s.max_clients, recent=s.recent, allowed_hosts=s.allowed_hosts,
        )
        cfg = {k: getattr(s, k) for k in self.PAGE_KEYS}
        cfg["box"] = "1" if s.box else "0"
        cfg["shadow"] = "1" if s.shadow else "0"
        self.server.page_config = cfg
        self.server.acquire()

    def on_caption(self, caption) -> None:
        text = self.text_of(caption)
        if text is None or self.server is None:
            return  # silence (by default): the page keeps the previous caption
        c = caption.to_json()
        c.pop("token_ids", None)
        c["text"] = text
        self.server.publish({"type": "caption", "caption": c})

    def stop(self) -> None:
        if self.server is not None:
            self.server.release()
            self.server = None

    def describe(self) -> str:
        return f"overlay:{self.host}:{self.port}"

    def stats(self) -> dict:
        srv = self.server
        return {"url": self.url, "clients": srv.client_count if srv else 0, "running": bool(srv and srv.running)}
