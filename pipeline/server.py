"""The process's one HTTP server: aiohttp on its own thread and event loop.

Who mounts what: the control API, ``/metrics`` and ``/health`` (``pipeline/control.py``), and any
sink that declares routes (``Sink.mount``, e.g. the overlay's pages). Every route is mounted
before ``start``; the router is then frozen.

What every request goes through, in this order (one middleware, ``_guard``):

1. **Host**: on loopback only a loopback ``Host`` header is answered (DNS rebinding); bound to a
   specific address or name, that name (plus ``allowed_hosts``). 403 otherwise.
2. **Origin** (browsers): a request with an ``Origin`` header is refused (403) unless it is
   same-origin or listed in ``cors_origins``; a listed origin gets ``Access-Control-Allow-Origin``
   and its preflight (``OPTIONS``) is answered.
3. **Token**: when a token is set (it must be off loopback, see ``is_loopback``) every route not
   mounted ``public`` needs ``Authorization: Bearer TOKEN``; a GET may carry ``?token=TOKEN``
   instead, because a browser's ``EventSource`` and ``WebSocket`` cannot send headers. 401.
4. **Size**: a body over ``max_request_bytes`` is 413 before the handler runs.
5. Errors: an ``HTTPException`` becomes ``{"error": "..."}`` with its status; a client error
   (400, 408, 413, 415) is one log line; any other exception is 500 and one log line (a traceback
   the first time). Repeated log lines of one kind are rate-limited (``_Throttle``).
6. Security headers (CSP, nosniff, no-referrer, no-store) on every answer that is not a stream.

Slow and idle clients (numbers are the defaults of ``server:`` in the config):

- a new connection must deliver its first request head within ``request_timeout_s`` (10 s), else
  it is closed; between requests a keep-alive connection may idle ``idle_timeout_s`` (60 s);
  ``read_json`` reads a body within ``request_timeout_s`` too (408). For scale: nginx's
  ``client_header_timeout`` is 60 s and Apache's ``RequestReadTimeout`` 20-40 s for the head; OBS,
  browsers and curl send a head in milliseconds, so 10 s is generous;
- at most ``max_connections`` (256) connections are open. One more evicts the oldest connection
  that has not sent a complete request yet; if every connection is busy, the newcomer gets
  ``503 too many connections`` and is closed. So a flood of half-open connections cannot lock
  out ``/health``, and file descriptors stay bounded.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from aiohttp import web

log = logging.getLogger("livecc.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; font-src 'self' data:; base-uri 'none'; form-action 'none'"
)
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n"
           b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n")
_CLIENT_ERRORS = (400, 408, 413, 415)


def is_loopback(host: str) -> bool:
    """True only for ``127.0.0.1``, ``::1`` and ``localhost`` (brackets and case ignored).

    Anything else (``127.0.0.2``, ``0.0.0.0``, a LAN address, a host name) counts as reachable
    by others: the server refuses to start there without a token (``config.check_security``)."""
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(h) in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
    except ValueError:
        return False


@dataclass(frozen=True)
class Route:
    """One handler: ``async def handler(request) -> web.StreamResponse`` for METHOD PATH.

    ``public``: served without the token (health probes, a static page); everything else needs
    it whenever the server has one."""

    method: str
    path: str
    handler: Handler
    public: bool = False


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    """The JSON error answer every route uses: ``{"error": message}``."""
    return web.json_response({"error": message}, status=status, headers=headers)


def bad_request(message: str) -> web.HTTPBadRequest:
    """An exception the middleware turns into ``400 {"error": message}`` (one log line)."""
    return web.HTTPBadRequest(text=message)


async def read_json(request: web.Request, max_bytes: int, timeout_s: float) -> Any:
    """The request's JSON body, checked: ``Content-Type: application/json`` (else 415), at most
    ``max_bytes`` (413), arriving within ``timeout_s`` seconds (408), UTF-8 (400), valid JSON
    (RFC 8259: no ``NaN``/``Infinity``) and nested less deep than Python's recursion limit (400).

    Raises ``web.HTTPException`` subclasses; the server's middleware answers them."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send JSON (Content-Type: application/json)")
    try:
        raw = await asyncio.wait_for(request.read(), timeout_s)  # the whole body; 413 over client_max_size
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the body did not arrive within {timeout_s:g} s") from None
    if len(raw) > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(raw),
                                            text=f"request body over {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the body is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise bad_request("the body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, an integer over Python's digit limit, NaN
        raise bad_request(f"the body is not valid JSON ({str(e).split(':')[0]})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Throttle:
    """Log one line per ``key`` at most every ``every_s`` seconds; the next line says how many
    were held back. Keys are fixed strings (messages, routes), so the table stays small."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.log = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, level: int, key: str, msg: str, *args: Any, exc_info: Any = None) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                self._held[key] += 1
                return
            held = self._held.pop(key, 0)
            self._last[key] = now
        if held:
            msg += f" (and {held} more like it in the last {now - last:.0f} s)"
        self.log.log(level, msg, *args, exc_info=exc_info)


throttled = _Throttle(log)


class _Connection(web.RequestHandler):
    """aiohttp's per-connection protocol, reporting opens and closes to its ``HttpServer``."""

    def __init__(self, owner: "HttpServer", **kw: Any) -> None:
        super().__init__(**kw)
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.owner._opened(self, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.owner._closed(self)
        super().connection_lost(exc)

    def log_exception(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        throttled(logging.ERROR, "aiohttp:" + msg, "http: " + msg, *args, exc_info=exc_info)


class HttpServer:
    """aiohttp in its own thread; ``mount(routes)`` then ``start()``; ``stop()`` at the end.

    ``port`` 0 binds any free port; after ``start`` ``port`` is the bound one (the socket is
    bound here, in the caller's thread, so a taken port raises ``OSError`` from ``start``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, *, token: str | None = None,
                 cors_origins: Iterable[str] = (), allowed_hosts: Iterable[str] = (),
                 max_request_bytes: int = 16 * 1024, max_connections: int = 256,
                 request_timeout_s: float = 10.0, idle_timeout_s: float = 60.0, name: str = "http") -> None:
        self.host = host.strip("[]")
        self.port = port
        self.token = token.encode() if token else None
        self.cors_origins = frozenset(cors_origins)
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.name = name
        self.hosts = _accepted_hosts(self.host, allowed_hosts)  # empty: any Host header
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app = web.Application(client_max_size=max_request_bytes, middlewares=[self._guard])
        self._public: set = set()  # aiohttp routes mounted public
        self._methods: dict[str, set[str]] = collections.defaultdict(set)  # path -> methods (preflight)
        self._connections: set[_Connection] = set()
        self._unserved: collections.OrderedDict[_Connection, asyncio.TimerHandle] = collections.OrderedDict()
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    # -- routes --------------------------------------------------------------------------------------
    def mount(self, routes: Iterable[Route]) -> None:
        """Add routes (before ``start``). A METHOD PATH mounted twice is a ``ValueError``."""
        if self.loop is not None:
            raise RuntimeError("mount routes before the server starts")
        for r in routes:
            method = r.method.upper()
            if method in self._methods.get(r.path, ()):
                raise ValueError(f"{method} {r.path} is mounted twice")
            route = self.app.router.add_route(method, r.path, r.handler)
            self._methods[r.path].add(method)
            if r.public:
                self._public.add(route)

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` to reach it from this machine (0.0.0.0 / :: -> the loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def start(self, timeout: float = 10.0) -> None:
        """Bind ``host:port`` and serve. Raises ``OSError`` (port taken, bad address)."""
        if self.loop is not None:
            raise RuntimeError("the server was started already")
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(sock, ready, failure),
                                        name=f"{self.name}-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            self.stop()
            raise OSError(f"server on {self.host}:{self.port} did not start: {failure[0] if failure else 'timeout'}")

    def _run(self, sock: socket.socket, ready: threading.Event, failure: list) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(runner.setup())
            self._stopped = asyncio.Event()
            listener = loop.run_until_complete(loop.create_server(
                lambda: _Connection(self, manager=runner.server, loop=loop, access_log=None,
                                    keepalive_timeout=self.idle_timeout_s),
                sock=sock, backlog=128))
        except BaseException as e:  # noqa: BLE001 - reported to start() in the caller's thread
            failure.append(e)
            sock.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_until_complete(self._stopped.wait())
        finally:
            listener.close()
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection (streams end), then end the thread."""
        t, loop = self._thread, self.loop
        if t is None or loop is None or not t.is_alive():
            return
        if self._stopped is not None:
            loop.call_soon_threadsafe(self._stopped.set)
        t.join(timeout)

    # -- connections (event loop thread) --------------------------------------------------------------
    def _opened(self, conn: _Connection, transport: asyncio.BaseTransport) -> None:
        self._connections.add(conn)
        if len(self._connections) > self.max_connections:
            oldest = next(iter(self._unserved), None)
            if oldest is None:  # every connection is busy: refuse the newcomer
                throttled(logging.WARNING, "refused", "server: %d connections open, refusing more (503)",
                          self.max_connections)
                transport.write(REFUSAL)
                conn.force_close()
                return
            throttled(logging.WARNING, "evicted", "server: %d connections open; closed the oldest that "
                      "sent no request yet", self.max_connections)
            self._expire(oldest)
        self._unserved[conn] = self.loop.call_later(self.request_timeout_s, self._expire, conn)

    def _closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        timer = self._unserved.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, conn: _Connection) -> None:
        """No complete request head within ``request_timeout_s`` (or evicted): close it."""
        timer = self._unserved.pop(conn, None)
        if timer is not None:
            timer.cancel()
        conn.force_close()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The loop's own errors (``accept()`` out of file descriptors, ...): one line each, rate-limited.

        One is expected and not an error: after ``accept()`` runs out of file descriptors, asyncio stops listening
        and schedules ``_start_serving`` to listen again a second later (CPython's selector loop; more than once per
        burst of failures, python/cpython#151615); if the server stops in that second, the retry finds the listener closed and
        raises ``ValueError: Invalid file descriptor: -1`` with a traceback. Once stopping, that one is logged
        at debug level."""
        msg = context.get("message") or "event loop error"
        exc = context.get("exception")
        stopping = self._stopped is not None and self._stopped.is_set()
        if stopping and isinstance(exc, ValueError) and "_start_serving" in repr(context.get("handle")):
            log.debug("server: a retry to accept after running out of file descriptors came after the listener "
                      "closed (ignored)")
            return
        throttled(logging.ERROR, "loop:" + msg, "server: %s: %s", msg, exc if exc is not None else "",
                  exc_info=exc if exc is not None and not isinstance(exc, OSError) else None)

    # -- the one middleware ---------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        timer = self._unserved.pop(request.protocol, None)  # a request head arrived: no longer half-open
        if timer is not None:
            timer.cancel()
        hostname = _hostname(request.host)
        if self.hosts and hostname not in self.hosts:
            return _with_headers(error(403, "forbidden host"))
        origin = request.headers.get("Origin")
        echo = origin if origin is not None and origin in self.cors_origins else None
        if origin is not None and echo is None and not _same_origin(origin, request.host):
            return _with_headers(error(403, "cross-origin request refused (add the origin to server.cors_origins)"))
        if request.method == "OPTIONS" and origin is not None:
            return self._preflight(request, echo)
        resp = await self._answer(request, handler)
        if echo is not None and not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = echo
            resp.headers["Vary"] = "Origin"
        return _with_headers(resp)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route not in self._public and not self._authorized(request):
            return error(401, "missing or wrong token (Authorization: Bearer TOKEN)",
                         headers={"WWW-Authenticate": 'Bearer realm="livecc"'})
        if request.content_length is not None and request.content_length > self.max_request_bytes:
            return error(413, f"request body over {self.max_request_bytes} bytes")
        route = request.match_info.route.resource  # None for 404: log keys stay a fixed set
        key = f"{request.method} {route.canonical if route is not None else '?'}"
        try:
            return await handler(request)
        except web.HTTPException as e:  # 404, 405, 413 from aiohttp; 400/408/415 from read_json
            if e.status in _CLIENT_ERRORS:
                throttled(logging.WARNING, f"{e.status} {key}", "%s: %d %s", key, e.status, e.text)
            return error(e.status, e.text if e.text and not e.text.startswith(str(e.status)) else e.reason,
                         headers={k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")})
        except Exception as e:  # a bug in a handler: one line (a traceback the first time), 500
            throttled(logging.ERROR, f"500 {key}", "%s: %s: %s", key, type(e).__name__, e, exc_info=e)
            return error(500, "internal error")

    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            value = request.query.get("token", "") if request.method == "GET" else ""
        return hmac.compare_digest(value.strip().encode("utf-8", "replace"), self.token)

    def _preflight(self, request: web.Request, echo: str | None) -> web.StreamResponse:
        methods = self._methods.get(request.path)
        if not methods:
            return _with_headers(error(404, "not found"))
        if echo is None:
            return _with_headers(error(403, "cross-origin request refused"))
        return _with_headers(web.Response(status=204, headers={
            "Access-Control-Allow-Origin": echo, "Vary": "Origin",
            "Access-Control-Allow-Methods": ", ".join(sorted(methods)),
            "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600"}))


def _with_headers(resp: web.StreamResponse) -> web.StreamResponse:
    if not resp.prepared:  # streams (SSE, WebSocket) set their own before preparing
        h = resp.headers
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("Cache-Control", "no-store")
    return resp


def _hostname(host_header: str | None) -> str:
    h = (host_header or "").lower()
    if h.startswith("["):
        return h.split("]")[0] + "]"
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _same_origin(origin: str, host_header: str | None) -> bool:
    m = re.match(r"^https?://([^/]+)$", origin)
    return bool(m) and m.group(1).lower() == (host_header or "").lower()


def _accepted_hosts(host: str, extra: Iterable[str]) -> frozenset[str]:
    """Host header names to answer: the loopback names on loopback; the bound address or name
    otherwise; none (any) on 0.0.0.0 / :: unless ``extra`` names some."""
    names = {e.lower() for e in extra}
    h = host.lower()
    if is_loopback(h):
        names |= {"localhost", "127.0.0.1", "[::1]"}
    else:
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            names.add(h)  # a host name: what clients put in the Host header
        else:
            if not ip.is_unspecified:
                names.add(f"[{h}]" if ip.version == 6 else h)
    return frozenset(names)


def from_settings(srv) -> "HttpServer":
    """The process's server for a config's ``server:`` block (``pipeline.config.ServerSection``)."""
    return HttpServer(srv.host, srv.port, token=srv.token, cors_origins=srv.cors_origins,
                      max_request_bytes=srv.max_request_bytes, max_connections=srv.max_connections,
                      request_timeout_s=srv.request_timeout_s, idle_timeout_s=srv.idle_timeout_s)


def _bind(host: str, port: int) -> socket.socket:
    family, _, _, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                               flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
