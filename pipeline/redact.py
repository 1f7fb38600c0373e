"""Hide secrets in stream URLs (and in text that contains them) before anything is logged.

What counts as a secret:
- ``user:password@`` in any URL: the password (``user:***@``); a lone ``token@`` user part too.
- query parameters whose name says key / token / pass / secret / auth / sig / streamid
  (``?key=abc`` -> ``?key=***``), including SRT's ``passphrase`` and ``streamid``, and YouTube's
  caption-ingestion ``cid``.
- an RTMP stream key: the last path segment after the application
  (``rtmp://host/live/KEY`` -> ``rtmp://host/live/***``); ``rtmp://host/app`` has no key.
- outside URLs too: a ``?name=value`` / ``&name=value`` / ``;name=value`` pair with such a name
  (a relative request line, a header value), and a Twitch chat token (``oauth:abc`` -> ``oauth:***``).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
SECRET_PARAM = re.compile(r"(key|token|pass|secret|auth|sig|streamid|credential|session|^cid$)", re.I)
RTMP_SCHEMES = ("rtmp", "rtmps", "rtmpe", "rtmpt", "rtmpte", "rtmpts")
# a URL inside free text: scheme://... up to whitespace or a quote
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_PARAM_IN_TEXT = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^&;\s'\"<>]+)")
_OAUTH = re.compile(r"(?i)\boauth:[a-z0-9]+")


def redact(text: object) -> str:
    """``str(text)`` with every secret above replaced by ``***``; a bare URL is redacted as a whole."""
    s = str(text)
    if not s:
        return s
    s = _URL_IN_TEXT.sub(_redact_match, s)
    s = _PARAM_IN_TEXT.sub(_redact_param_in_text, s)
    return _OAUTH.sub(f"oauth:{MASK}", s)


def _redact_param_in_text(m: re.Match) -> str:
    value = m.group("value")
    core = value.rstrip(":,.)]}")  # "...?token=abc: refused": the colon is the message's
    if not SECRET_PARAM.search(m.group("name")) or core == MASK:
        return m.group(0)
    return f"{m.group('sep')}{m.group('name')}={MASK}{value[len(core):]}"


def _redact_match(m: re.Match) -> str:
    url = m.group(0)
    core = url.rstrip(":;,.)]}")  # "...rtmp://h/app/key: refused": the colon is the message's
    return _redact_url(core) + url[len(core):]


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url, allow_fragments=False)  # SRT stream ids contain '#'
    except ValueError:
        return re.sub(r"//[^/]*@", f"//{MASK}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{host}"
        else:
            netloc = f"{MASK}@{host}"
    path = parts.path
    if parts.scheme.lower() in RTMP_SCHEMES:
        segs = path.split("/")  # ['', app, key, ...]
        if len([s for s in segs if s]) >= 2:
            segs[-1] = MASK if segs[-1] else segs[-1]
            if not segs[-1]:  # trailing slash: hide the segment before it
                segs[-2] = MASK
            path = "/".join(segs)
    query = parts.query
    if query:
        query = "&".join(_redact_param(p) for p in query.split("&"))
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


def _redact_param(param: str) -> str:
    name, eq, value = param.partition("=")
    if eq and value and SECRET_PARAM.search(name):
        return f"{name}={MASK}"
    return param
