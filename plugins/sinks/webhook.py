"""Webhook sink: each caption POSTed as JSON, with retries and backoff.

``format``:
  ``generic``  ``{"type": "caption", "start", "stop", "text", "kind", "query", "turn", "latency_s",
               "created_at"}``
               (and ``{"type": "event", ...}`` with ``include_events``)
  ``discord``  ``{"content": text}`` (2000 chars at most; mentions disabled, so a caption
               containing ``@everyone`` pings no one)
  ``slack``    ``{"text": text}`` (``& < >`` escaped as Slack asks, so ``<!channel>`` is text)

Connection errors, timeouts, 5xx and 429 are retried with exponential backoff (429's
``Retry-After`` honoured up to ``backoff_max_s``); other 4xx are not (the payload would not
change). When the retries run out the sink raises ``DeliveryError``: the dispatcher counts the
failure and moves on, without retrying a second time. Silence is never posted.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Literal

from pydantic import field_validator

from pipeline import __version__
from pipeline.fanout.sink import DeliveryError, Sink, SinkSettings
from pipeline.redact import redact


class WebhookSink(Sink):
    name = "webhook"
    target_field = "url"

    class Settings(SinkSettings):
        url: str
        format: Literal["generic", "discord", "slack"] = "generic"
        headers: dict[str, str] = {}
        timeout_s: float = 5.0
        retries: int = 3
        backoff_initial_s: float = 0.5
        backoff_max_s: float = 10.0
        include_answers: bool = True
        include_events: bool = False  # generic format only
        answer_prefix: str = "A: "
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
        # urllib takes user:password@ for part of the host name: send it as HTTP basic auth instead
        self._url, self._auth = self.settings.url, None
        if "@" in u.netloc:
            self._url = urllib.parse.urlunsplit(u._replace(netloc=u.netloc.rsplit("@", 1)[1]))
            creds = f"{urllib.parse.unquote(u.username or '')}:{urllib.parse.unquote(u.password or '')}"
            self._auth = "Basic " + base64.b64encode(creds.encode()).decode()

    def payload(self, caption) -> dict | None:
        s = self.settings
        if caption.is_silence or (caption.kind == "answer" and not s.include_answers):
            return None
        text = " ".join(caption.text.split())
        if caption.kind == "answer":
            text = s.answer_prefix + text
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

    def _post(self, body: dict) -> None:
        s = self.settings
        data = json.dumps(body, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"livecc-pipeline/{__version__}", **s.headers}
        if self._auth and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = self._auth
        delay = s.backoff_initial_s
        last = ""
        for attempt in range(s.retries + 1):
            self.attempts += 1
            wait = delay
            try:
                req = urllib.request.Request(self._url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=s.timeout_s) as resp:
                    resp.read(65536)
                self.sent += 1
                return
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code == 429:
                    try:
                        wait = float(e.headers.get("Retry-After", delay))
                    except ValueError:
                        wait = delay
                elif e.code < 500:
                    raise DeliveryError(redact(f"webhook {self.safe_url}: {last} (not retried)")) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < s.retries:
                time.sleep(min(s.backoff_max_s, max(0.0, wait)))
                delay = min(s.backoff_max_s, delay * 2)
        raise DeliveryError(redact(f"webhook {self.safe_url}: {last} after {s.retries + 1} attempts"))

    def describe(self) -> str:
        return f"webhook:{self.safe_url}"

    def stats(self) -> dict:
        return {"sent": self.sent, "attempts": self.attempts}
