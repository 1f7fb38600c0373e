"""OBS sink: each caption sent to OBS Studio's built-in WebSocket server as ``SendStreamCaption``;
OBS puts it into its own stream output as CEA-608 closed captions (viewers switch them on).

Protocol: obs-websocket 5.x (built into OBS >= 28), documented in obs-websocket's
``docs/generated/protocol.md``: the server sends Hello (op 0, with ``authentication.challenge`` and
``salt`` when a password is set); the client answers Identify (op 1, ``rpcVersion`` 1,
``authentication`` = base64(sha256(base64(sha256(password + salt)) + challenge))); the server
confirms with Identified (op 2). Each caption is a Request (op 6, ``requestType``
``SendStreamCaption``, ``requestData.captionText``) answered by a RequestResponse (op 7) with
``requestStatus.result`` (OBS refuses with code 501 "OutputNotRunning" while it is not streaming).

The password is read from the environment (``password_env``, default ``OBS_WEBSOCKET_PASSWORD``).
When OBS goes away (restart, crash) the sink reconnects with ``pipeline.backoff.Backoff``;
captions that wait longer than ``max_age_s`` are dropped (counted ``stale``: a late live caption
misleads more than a missing one). A wrong password (close code 4009) is not retried: the next
caption raises ``DeliveryError``. A run that never reached OBS while it had captions to send ends with
``DeliveryError`` from ``stop`` (lost data: ``livecc run`` exits 1 and says so), not a quiet "stopped".
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import itertools
import logging
import os
import threading
import time

import aiohttp
from pydantic import field_validator

from pipeline.backoff import Backoff
from pipeline.fanout.sink import DeliveryError, Sink, SinkSettings
from pipeline.redact import redact

log = logging.getLogger(__name__)

AUTH_FAILED = 4009  # obs-websocket WebSocketCloseCode::AuthenticationFailed


def auth_string(password: str, salt: str, challenge: str) -> str:
    """obs-websocket v5 authentication: base64(sha256(base64(sha256(password + salt)) + challenge))."""
    secret = base64.b64encode(hashlib.sha256((password + salt).encode()).digest()).decode()
    return base64.b64encode(hashlib.sha256((secret + challenge).encode()).digest()).decode()


class ObsProtocolError(ConnectionError):
    """The server broke the handshake or closed the connection."""


class ObsSink(Sink):
    name = "obs"
    target_field = "url"

    class Settings(SinkSettings):
        url: str = "ws://127.0.0.1:4455"
        password_env: str = "OBS_WEBSOCKET_PASSWORD"
        timeout_s: float = 5.0
        backoff_initial_s: float = 0.5
        backoff_max_s: float = 5.0
        max_age_s: float = 10.0  # a caption older than this is dropped (never sent late; not held while OBS is away)
        answer_prefix: str = "A: "
        stop_timeout_s: float = 5.0

        @field_validator("url")
        @classmethod
        def _url(cls, v: str) -> str:
            if not v.lower().startswith(("ws://", "wss://")):
                raise ValueError("the OBS WebSocket URL must start with ws:// or wss://")
            return v

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.counters = collections.Counter()
        self.connected = False
        self.error: str | None = None
        self.obs_version: str | None = None
        self._pending: collections.deque = collections.deque()  # (monotonic, text)
        self._pending_lock = threading.Lock()  # the caller's thread appends and prunes, the sink's thread sends
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count(1)

    # --- sink API --------------------------------------------------------------------
    def start(self) -> None:
        self._password = os.environ.get(self.settings.password_env, "")
        self._stopping = False
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._wake = asyncio.Event()
            ready.set()
            self._loop.run_until_complete(self._main())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="obs-captions", daemon=True)
        self._thread.start()
        ready.wait(5)

    def _notify(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def on_caption(self, caption) -> None:
        if self.error:
            raise DeliveryError(self.error)
        if caption.is_silence:
            return
        text = " ".join(caption.text.split())
        if caption.kind == "answer":
            text = self.settings.answer_prefix + text
        now = time.monotonic()
        with self._pending_lock:  # while OBS is away nothing is sent: what has aged past max_age_s goes now
            while self._pending and now - self._pending[0][0] > self.settings.max_age_s:
                self._pending.popleft()
                self.counters["stale"] += 1
            self._pending.append((now, text))
        self.counters["captions"] += 1
        self._notify()

    def stop(self) -> None:
        self._stopping = True
        self._notify()
        if self._thread is not None:
            self._thread.join(self.settings.stop_timeout_s + self.settings.timeout_s)
        if self.error:
            raise DeliveryError(self.error)
        if self.counters["captions"] and not self.counters["connects"]:
            raise DeliveryError(f"OBS at {redact(self.settings.url)} was never reached: none of "
                                f"{self.counters['captions']} captions was sent (is OBS running, with Tools -> "
                                f"WebSocket Server Settings -> Enable WebSocket server?)")

    def describe(self) -> str:
        return f"obs:{redact(self.settings.url)}"

    def stats(self) -> dict:
        return {**self.counters, "connected": self.connected, "pending": len(self._pending),
                "obs": self.obs_version}

    # --- the connection (asyncio, in the sink's thread) ---------------------------------
    async def _main(self) -> None:
        s = self.settings
        backoff = Backoff(initial=s.backoff_initial_s, max_delay=s.backoff_max_s)
        failures = 0
        async with aiohttp.ClientSession() as http:
            while not self._stopping and not self.error:
                try:
                    async with http.ws_connect(s.url, protocols=("obswebsocket.json",),
                                               timeout=aiohttp.ClientWSTimeout(ws_close=s.timeout_s)) as ws:
                        await self._identify(ws)
                        if self.counters["connects"]:
                            log.info("obs: reconnected to %s", redact(s.url))
                        self.counters["connects"] += 1
                        failures = 0
                        self.connected = True
                        await self._send_loop(ws)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ObsProtocolError) as e:
                    if self.connected or failures == 0:
                        log.warning("obs: %s: %s; reconnecting", redact(s.url), redact(f"{type(e).__name__}: {e}"))
                finally:
                    self.connected = False
                if self._stopping or self.error:
                    return
                failures += 1
                self.counters["reconnect_attempts"] += 1
                try:
                    await asyncio.wait_for(self._stopped(), backoff.delay(failures + 1))
                except asyncio.TimeoutError:
                    pass

    async def _stopped(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._wake.wait()

    async def _receive(self, ws, timeout: float) -> dict:
        return self._decode(ws, await ws.receive(timeout=timeout))

    def _decode(self, ws, msg) -> dict:
        """A text message's JSON; a close raises ObsProtocolError (and records a wrong password)."""
        if msg.type == aiohttp.WSMsgType.TEXT:
            return msg.json()
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            code = ws.close_code
            if code == AUTH_FAILED:
                self.error = f"obs: authentication failed (check {self.settings.password_env})"
                log.error("%s", self.error)
            raise ObsProtocolError(f"connection closed (code {code})")
        raise ObsProtocolError(f"unexpected message type {msg.type}")

    async def _identify(self, ws) -> None:
        hello = await self._receive(ws, self.settings.timeout_s)
        if hello.get("op") != 0:
            raise ObsProtocolError(f"expected Hello (op 0), got op {hello.get('op')}")
        d = hello.get("d", {})
        self.obs_version = d.get("obsWebSocketVersion")
        ident = {"rpcVersion": 1, "eventSubscriptions": 0}
        auth = d.get("authentication")
        if auth:
            if not self._password:
                self.error = f"obs: OBS asks for a password: set {self.settings.password_env}"
                raise ObsProtocolError("no password")
            ident["authentication"] = auth_string(self._password, auth["salt"], auth["challenge"])
        await ws.send_json({"op": 1, "d": ident})
        reply = await self._receive(ws, self.settings.timeout_s)
        if reply.get("op") != 2:
            raise ObsProtocolError(f"expected Identified (op 2), got op {reply.get('op')}")

    async def _idle(self, ws) -> None:
        """Wait for a caption while reading the socket, so a closed connection is seen at once."""
        recv = asyncio.ensure_future(ws.receive())
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait({recv, wake}, return_when=asyncio.FIRST_COMPLETED)
            if recv in done:
                self._decode(ws, recv.result())  # an event: not for us; a close: raises
        finally:
            for t in (recv, wake):
                t.cancel()
            await asyncio.gather(recv, wake, return_exceptions=True)

    async def _send_loop(self, ws) -> None:
        s = self.settings
        while not self._stopping or self._pending:
            if not self._pending:
                self._wake.clear()
                if self._stopping:
                    return
                await self._idle(ws)
                continue
            with self._pending_lock:
                if not self._pending:
                    continue
                item = self._pending[0]
                if time.monotonic() - item[0] > s.max_age_s:
                    self._pending.popleft()
                    self.counters["stale"] += 1
                    continue
            rid = str(next(self._ids))
            await ws.send_json({"op": 6, "d": {"requestType": "SendStreamCaption", "requestId": rid,
                                               "requestData": {"captionText": item[1]}}})
            with self._pending_lock:  # sent: never sent again (OBS may already have shown it)
                if self._pending and self._pending[0] is item:  # not pruned meanwhile by on_caption
                    self._pending.popleft()
            deadline = time.monotonic() + s.timeout_s
            while True:
                reply = await self._receive(ws, max(0.01, deadline - time.monotonic()))
                if reply.get("op") == 7 and reply.get("d", {}).get("requestId") == rid:
                    break  # other messages (events) are not for us
            status = reply["d"].get("requestStatus", {})
            if status.get("result"):
                self.counters["acked"] += 1
            else:
                self.counters["refused"] += 1
                if self.counters["refused"] <= 3 or self.counters["refused"] % 100 == 0:
                    log.warning("obs: SendStreamCaption refused (%s %s)%s", status.get("code"), status.get("comment", ""),
                                ": is OBS streaming?" if status.get("code") == 501 else "")
