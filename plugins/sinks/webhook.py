"""Webhook sink: each caption POSTed as JSON, with retries and backoff.

``format``:
  ``generic``  ``{"type": "caption", "start", "stop", "text", "kind", "query", "turn", "latency_s",
               "created_at"}``
               (and ``{"type": "event", ...}`` with ``include_events``)
  ``discord``  ``{"content": text}`` (2000 chars at most; mentions disabled, so a caption
               containing ``@everyone`` pings no one)
  ``slack``    ``{"text": text}`` (``& < >`` escaped as Slack asks, so ``<!channel>`` is text)

HTTP is ``requests`` with urllib3's ``Retry``: connection errors, timeouts, 429 and 5xx are
retried (``retries`` times) after the pipeline's :class:`~pipeline.backoff.Backoff` wait
(``backoff_initial_s`` doubling up to ``backoff_max_s``), or after the server's ``Retry-After``
(RFC 9110 10.2.3: seconds or an HTTP date; decimal seconds accepted too); other 4xx are not (the
payload would not change). Credentials in the URL (``https://user:pass@host/``) go as Basic auth.

Every retry fits inside the dispatcher's deadline for the call (``Sink.deadline``: its
``call_timeout``, or the shutdown budget when stopping), 0.5 s to spare: a retry whose wait plus
one full ``timeout_s`` attempt would end later is not made, so a sink that is only retrying is
never reported hung. When the attempts or the time run out the sink raises ``DeliveryError``: the
dispatcher counts the failure and moves on, without retrying a second time. Silence is never posted.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from typing import Callable, Literal

import requests
from pydantic import Field, field_validator
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader, MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from pipeline import __version__
from pipeline.backoff import Backoff
from pipeline.fanout.sink import CaptionText, DeliveryError, Sink
from pipeline.redact import redact

MARGIN_S = 0.5  # returned this long before the dispatcher's deadline
RETRY_STATUS = frozenset({429, *range(500, 600)})


class _Retry(Retry):
    """urllib3's Retry with the pipeline's Backoff for the waits, decimal ``Retry-After`` seconds,
    and a deadline (``deadline()``, a ``time.monotonic()`` value, read at each retry since a
    shutdown may bring it closer): a retry whose wait plus one attempt of ``attempt_s`` would end
    past it is not made. ``tally`` (shared by the copies urllib3 makes) counts the
    failed attempts and says why the retries stopped."""

    backoff = Backoff()
    deadline: Callable[[], float] = staticmethod(lambda: math.inf)
    attempt_s = 0.0
    tally: dict

    def new(self, **kw) -> "_Retry":
        new = super().new(**kw)
        new.backoff, new.deadline, new.attempt_s, new.tally = self.backoff, self.deadline, self.attempt_s, self.tally
        return new

    def get_backoff_time(self) -> float:
        return self.backoff.delay(len(self.history) + 1)

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            pass
        try:
            return super().parse_retry_after(retry_after)  # an HTTP date
        except InvalidHeader:
            return 0.0  # unreadable: our own backoff

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        self.tally["failed"] += 1
        try:
            new = super().increment(method, url, response, error, _pool, _stacktrace)
        except MaxRetryError:
            self.tally["stopped"] = "attempts"
            raise
        wait = (new.get_retry_after(response) if response is not None and new.respect_retry_after_header else None) \
            or new.get_backoff_time()
        if time.monotonic() + wait + self.attempt_s > self.deadline():
            self.tally["stopped"] = f"time (next attempt {wait:.1f} s away)"
            reason = error or ResponseError(f"HTTP {getattr(response, 'status', '?')}")
            raise MaxRetryError(_pool, url, reason) from reason
        return new


class WebhookSink(Sink):
    name = "webhook"
    target_field = "url"

    class Settings(CaptionText):
        url: str
        format: Literal["generic", "discord", "slack"] = "generic"
        headers: dict[str, str] = {}
        timeout_s: float = Field(5.0, gt=0)  # per attempt (connect, and each read)
        retries: int = Field(3, ge=0)  # attempts after the first
        backoff_initial_s: float = Field(0.5, ge=0)
        backoff_max_s: float = Field(10.0, ge=0)
        include_events: bool = False  # generic format only
        username: str | None = None  # discord: the name shown for the webhook's messages

        @field_validator("url")
        @classmethod
        def _url(cls, v: str) -> str:
            if not v.lower().startswith(("http://", "https://")):
                raise ValueError("the webhook URL must start with http:// or https://")
            return v

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.sent = 0
        self.attempts = 0
        # webhook URLs carry their secret in the path (Discord, Slack): show scheme and host only
        u = urllib.parse.urlsplit(self.settings.url)
        self.safe_url = f"{u.scheme}://{u.hostname or ''}{':' + str(u.port) if u.port else ''}/…"
        self._session = requests.Session()
        self._adapter = HTTPAdapter()
        self._session.mount("http://", self._adapter)
        self._session.mount("https://", self._adapter)
        self._session.headers.update({"User-Agent": f"livecc-pipeline/{__version__}", **self.settings.headers})

    def payload(self, caption) -> dict | None:
        s = self.settings
        text = self.text_of(caption)
        if text is None:
            return None
        if s.format == "discord":
            body = {"content": text[:2000], "allowed_mentions": {"parse": []}}
            if s.username:
                body["username"] = s.username
            return body
        if s.format == "slack":
            return {"text": text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")}
        body = {"type": "caption", **caption.to_json()}
        body.pop("token_ids", None)  # model internals: of no use to a chat or automation hook
        return body

    def on_caption(self, caption) -> None:
        body = self.payload(caption)
        if body is not None:
            self._post(body)

    def on_event(self, event) -> None:
        if self.settings.include_events and self.settings.format == "generic":
            self._post({"type": "event", "kind": event.kind, "stream_time": event.stream_time,
                        "detail": event.detail, "created_at": event.created_at})

    def stop(self) -> None:
        self._session.close()

    def _post(self, body: dict) -> None:
        s = self.settings
        def deadline() -> float:  # the dispatcher may lower Sink.deadline while we retry (shutdown)
            return math.inf if self.deadline is None else self.deadline - MARGIN_S

        attempt_s = min(s.timeout_s, deadline() - time.monotonic())
        if attempt_s < 0.1:
            raise DeliveryError(f"webhook {self.safe_url}: no time left before the dispatcher's deadline")
        tally = {"failed": 0, "stopped": None}
        retry = _Retry(total=s.retries, status_forcelist=RETRY_STATUS, allowed_methods={"POST"},
                       raise_on_status=False, respect_retry_after_header=True)
        retry.backoff = Backoff(initial=s.backoff_initial_s, max_delay=s.backoff_max_s)
        retry.deadline, retry.attempt_s, retry.tally = deadline, attempt_s, tally
        self._adapter.max_retries = retry  # read by each send; only this sink's worker thread posts
        try:
            resp = self._session.post(s.url, json=body, timeout=attempt_s)
            resp.close()
            error = None if resp.ok else f"HTTP {resp.status_code}"
        except requests.RequestException as e:  # its message names the URL's path (the secret): use the cause
            cause = e.args[0].reason if e.args and isinstance(e.args[0], MaxRetryError) else e
            resp, error = None, f"{type(cause).__name__}: {str(cause).split('): ', 1)[-1]}"
        self.attempts += tally["failed"] + (0 if tally["stopped"] else 1)
        if error is None:
            self.sent += 1
            return
        if resp is not None and resp.status_code not in RETRY_STATUS:
            raise DeliveryError(redact(f"webhook {self.safe_url}: {error} (not retried)"))
        why = f", out of {tally['stopped']}" if tally["stopped"] and tally["stopped"] != "attempts" else ""
        raise DeliveryError(redact(f"webhook {self.safe_url}: {error} after {tally['failed']} attempt(s){why}"))

    def describe(self) -> str:
        return f"webhook:{self.safe_url}"

    def stats(self) -> dict:
        return {"sent": self.sent, "attempts": self.attempts}
