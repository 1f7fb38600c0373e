"""OBS overlay in a real headless Chromium (Debian chromium driven by Playwright), and its streams
against real sockets: one page per sink, the token off loopback, pages that stop reading."""

from __future__ import annotations

import io
import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image
from servers import http_get

from pipeline.plugins import make_sink
from pipeline.server import HttpServer
from pipeline.types import Caption

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
TOKEN = "overlay-token-0123456789"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=ARGS,
            headless=True, viewport={"width": 960, "height": 540},
        )
        yield ctx
        ctx.close()


@pytest.fixture
def overlay():
    sink = make_sink("overlay", port=0, recent=5, ttl=0, fade=0)
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def page(browser):
    pg = browser.new_page()
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.dialogs = dialogs
    yield pg
    pg.close()


def wait_js(page, expr: str, timeout: float = 15.0) -> None:
    """Poll a JS expression from here (page.wait_for_function uses eval, which our CSP forbids). 15 s: a CI
    check with two Chromium test runs beside it once took over 5 s to show a first caption."""
    end = time.monotonic() + timeout
    while not page.evaluate(expr):
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for: {expr}")
        time.sleep(0.03)


def wait_connected(page, transport: str) -> None:
    wait_js(page, f"document.body.dataset.connected === '1' && document.body.dataset.transport === '{transport}'", 10)


def box_text(page) -> str:
    return page.eval_on_selector("#box", "e => e.textContent")


def caption_pixels(png: bytes) -> tuple[int, int]:
    """(opaque pixels, bright opaque pixels) of a screenshot taken without background."""
    img = Image.open(io.BytesIO(png)).convert("RGBA")
    px = list(img.get_flattened_data()) if hasattr(img, 'get_flattened_data') else list(img.getdata())
    opaque = sum(1 for p in px if p[3] > 100)
    bright = sum(1 for p in px if p[3] > 200 and p[0] > 200 and p[1] > 200 and p[2] > 200)
    return opaque, bright


def test_captions_appear_in_dom_and_screenshot(overlay, page):
    page.goto(overlay.url)
    wait_connected(page, "ws")
    empty = page.screenshot(omit_background=True)
    assert caption_pixels(empty) == (0, 0)  # transparent until a caption arrives
    overlay.on_caption(Caption(0, 1, "Kickoff at the stadium"))
    wait_js(page, "document.querySelector('#box').textContent.includes('Kickoff')")
    overlay.on_caption(Caption(1, 2, " ..."))  # silence: previous caption stays
    overlay.on_caption(Caption(2, 3, "the ball goes wide"))
    wait_js(page, "document.body.dataset.count === '2'")
    assert box_text(page) == "Kickoff at the stadium the ball goes wide"
    shot = page.screenshot(omit_background=True)
    opaque, bright = caption_pixels(shot)
    assert opaque > 5000 and bright > 300  # a dark box with white text
    headers = page.evaluate("async () => (await fetch('/overlay')).headers.get('content-security-policy')")
    assert "script-src 'self'" in headers


def test_hostile_captions_render_as_text(overlay, page):
    page.goto(overlay.url + "?mode=replace")
    wait_connected(page, "ws")
    evil = ['<script>alert("xss1")</script>', '<img src=x onerror=alert("xss2")>', '"><svg onload=alert(3)>']
    for i, t in enumerate(evil):
        overlay.on_caption(Caption(i, i + 1, t))
        wait_js(page, f"document.body.dataset.count === '{i + 1}'")
        assert box_text(page) == t
    time.sleep(0.3)
    assert page.dialogs == []
    assert page.eval_on_selector_all("#box img, #box script, #box svg", "els => els.length") == 0
    assert page.eval_on_selector("#box", "e => e.children.length") == 1  # replace mode keeps one


def test_sse_fallback_and_styling_params(overlay, page):
    page.goto(overlay.url + "?transport=sse&color=%23ffcc00&position=top&size=30&box=0")
    wait_connected(page, "sse")
    overlay.on_caption(Caption(0, 1, "over server-sent events"))
    wait_js(page, "document.querySelector('#box').textContent.includes('server-sent')")
    style = page.eval_on_selector("#box", "e => { const s = getComputedStyle(e); return [s.color, s.fontSize, s.backgroundColor] }")
    assert style == ["rgb(255, 204, 0)", "30px", "rgba(0, 0, 0, 0)"]
    assert page.eval_on_selector("#wrap", "e => e.className") == "pos-top align-center"
    # a bad colour value is ignored, not injected
    page.goto(overlay.url + "?transport=sse&color=red;background:url(x)")
    wait_connected(page, "sse")
    assert page.eval_on_selector("#box", "e => getComputedStyle(e).color") == "rgb(255, 255, 255)"


def test_websocket_reconnects_and_replays_recent(overlay, page):
    page.goto(overlay.url)
    wait_connected(page, "ws")
    overlay.on_caption(Caption(0, 1, "before the drop"))
    wait_js(page, "document.body.dataset.count === '1'")
    overlay.drop_clients()
    wait_js(page, "document.body.dataset.connected === '0'")
    wait_connected(page, "ws")
    overlay.on_caption(Caption(1, 2, "after the drop"))
    wait_js(page, "document.querySelector('#box').textContent.includes('after the drop')")


def test_captions_json_bounded_and_security(overlay):
    for i in range(8):
        overlay.on_caption(Caption(i, i + 1, f"c{i}"))
    overlay.on_caption(Caption(9, 10, "..."))
    time.sleep(0.1)
    base = overlay.server.url
    with urllib.request.urlopen(base + "/captions.json") as r:
        data = json.load(r)
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert [c["text"] for c in data["captions"]] == ["c3", "c4", "c5", "c6", "c7"]
    # DNS-rebinding guard: a foreign Host header is refused on loopback
    req = urllib.request.Request(base + "/captions.json", headers={"Host": "evil.example:80"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req)
    assert ei.value.code == 403
    # a WebSocket opened by a page of another origin is refused
    with socket.create_connection(("127.0.0.1", overlay.server.port), timeout=5) as s:
        s.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{overlay.server.port}\r\nOrigin: http://evil.example\r\n"
                  f"{WS_HEADERS}\r\n".encode())
        assert s.recv(64).startswith(b"HTTP/1.1 403")


@pytest.fixture
def shared_server():
    """One server with two overlay pages: the default one and ``studio``, each with its own style."""
    srv = HttpServer("127.0.0.1", 0)
    default = make_sink({"kind": "overlay", "size": 30, "color": "#ffcc00", "ttl": 0, "fade": 0})
    studio = make_sink({"kind": "overlay", "name": "studio", "size": 50, "position": "top", "ttl": 0, "fade": 0,
                        "include_answers": False})
    default.mount(srv), studio.mount(srv)
    srv.start()
    default.start(), studio.start()
    yield srv, default, studio
    default.stop(), studio.stop()
    srv.stop()


def test_one_page_per_sink_on_one_server(shared_server, page):
    srv, default, studio = shared_server
    assert (default.url, studio.url) == (srv.url + "/overlay", srv.url + "/overlay/studio")
    page.goto(studio.url)
    wait_connected(page, "ws")
    other = page.context.new_page()
    try:
        other.goto(default.url)
        wait_connected(other, "ws")
        for sink in (default, studio):
            sink.on_caption(Caption(0, 1, "both pages"))
            sink.on_caption(Caption(1, 2, "only the default page", kind="answer"))
        wait_js(other, "document.body.dataset.count === '2'")
        wait_js(page, "document.body.dataset.count === '1'")
        style = "e => { const s = getComputedStyle(e); return [s.color, s.fontSize] }"
        assert other.eval_on_selector("#box", style) == ["rgb(255, 204, 0)", "30px"]  # neither overwrote the other
        assert page.eval_on_selector("#box", style) == ["rgb(255, 255, 255)", "50px"]
        assert page.eval_on_selector("#wrap", "e => e.className") == "pos-top align-center"
        assert box_text(page) == "both pages"
    finally:
        other.close()
    status, body = http_get(srv.url + "/overlay/studio/captions.json")
    assert status == 200 and [c["text"] for c in json.loads(body)["captions"]] == ["both pages"]
    # two unnamed overlays on one server would both take /overlay: a clear error
    fresh = HttpServer("127.0.0.1", 0)
    make_sink("overlay").mount(fresh)
    with pytest.raises(ValueError, match="GET /overlay is mounted twice"):
        make_sink("overlay").mount(fresh)


def test_data_routes_need_the_token_off_loopback(page):
    sink = make_sink({"kind": "overlay", "listen": "127.0.0.2:0", "token": TOKEN, "ttl": 0, "fade": 0})
    sink.start()
    try:
        base = sink.server.url
        assert base.startswith("http://127.0.0.2:")
        assert http_get(base + "/overlay")[0] == 200  # the page itself is static and public
        assert http_get(base + "/overlay.js")[0] == 200
        for path in ("/captions.json", "/events", "/ws"):
            assert http_get(base + path)[0] == 401, path
        assert http_get(base + "/captions.json?token=wrong-token-0123456789")[0] == 401
        assert http_get(base + "/captions.json", token=TOKEN)[0] == 200
        for transport in ("ws", "sse"):  # the page hands its ?token= on to its stream
            page.goto(f"{sink.url}?transport={transport}&token={TOKEN}")
            wait_connected(page, transport)
            sink.on_caption(Caption(0, 1, f"over {transport} with a token"))
            wait_js(page, f"document.querySelector('#box').textContent.includes('over {transport}')")
    finally:
        sink.stop()
    with pytest.raises(ValueError, match="not loopback: set token"):
        make_sink({"kind": "overlay", "listen": "0.0.0.0:0"})


WS_HEADERS = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


def raw_client(port: int, path: str, rcvbuf: int | None = None) -> socket.socket:
    """A client that sends one GET (a WebSocket upgrade for ``/ws``) and then never reads
    (OBS frozen, a stuck proxy)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    extra = WS_HEADERS if path.endswith("/ws") else ""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
    return s


def status_of(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return int(s.recv(64).split()[1])


def wait_for(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"timed out: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.mark.parametrize("path", ["/events", "/ws"])
def test_pages_that_never_read_are_dropped_in_bounded_time(path, page):
    """Every slot held by a client that never reads: the next page gets a clean 503, and is served
    once the server drops them (SSE: the stream is renewed after sse_max_s; WebSocket: no pong)."""
    sink = make_sink({"kind": "overlay", "port": 0, "max_clients": 3, "sse_max_s": 2, "ping_s": 1, "ttl": 0})
    sink.start()
    port = sink.server.port
    stuck = [raw_client(port, path) for _ in range(3)]
    try:
        wait_for(lambda: sink.stats()["clients"] == 3, 5, "3 clients")
        assert status_of(port, "/events") == 503  # a clean refusal while they hold every slot
        took = wait_for(lambda: sink.stats()["clients"] == 0, 6, "the stuck clients dropped")
        print(f"\n{path}: 3 non-reading clients dropped after {took:.1f} s")
        page.goto(sink.url + ("?transport=sse" if path == "/events" else ""))  # a new OBS page
        wait_connected(page, "sse" if path == "/events" else "ws")
        sink.on_caption(Caption(0, 1, "served"))
        wait_js(page, "document.querySelector('#box').textContent.includes('served')")
    finally:
        for s in stuck:
            s.close()
        sink.stop()


def test_a_page_that_stops_reading_under_traffic_is_dropped():
    """With captions flowing, a client whose buffers are full is dropped after write_timeout_s,
    long before sse_max_s; a reading client next to it gets every caption."""
    sink = make_sink({"kind": "overlay", "port": 0, "sse_max_s": 600, "write_timeout_s": 1, "ttl": 0})
    sink.start()
    port = sink.server.port
    stuck = raw_client(port, "/events", rcvbuf=4096)
    reader = raw_client(port, "/events")
    reader.settimeout(5)
    got = bytearray()
    try:
        wait_for(lambda: sink.stats()["clients"] == 2, 5, "2 clients")
        t0 = time.monotonic()
        for i in range(60):  # 60 x 4 KB: more than the stuck client's buffers hold
            sink.on_caption(Caption(i, i + 1, f"caption {i} " + "x" * 4000))
            while b"caption %d " % i not in got:
                got += reader.recv(65536)
            if sink.stats()["clients"] == 1:
                break
        took = wait_for(lambda: sink.stats()["clients"] == 1, 5, "the stuck client dropped")
        print(f"\nstuck SSE client dropped {time.monotonic() - t0:.1f} s after captions started ({took:.1f} s wait)")
        assert b"caption 0 " in got
    finally:
        stuck.close(), reader.close()
        sink.stop()


def test_readme_screenshot(overlay, page, tmp_path):
    """The picture in docs/overlay.png: the overlay composited over a sample frame (the page itself is
    transparent). Written to ``tmp_path`` only; to refresh the README's copy, copy it from there."""
    page.goto(overlay.url + "?size=34")
    wait_connected(page, "ws")
    for i, t in enumerate(["Blue takes the corner,", "the header is saved", "and the keeper throws it long."]):
        overlay.on_caption(Caption(i, i + 1, t))
    wait_js(page, "document.body.dataset.count === '3'")
    shot = Image.open(io.BytesIO(page.screenshot(omit_background=True))).convert("RGBA")
    w, h = shot.size
    g = Image.linear_gradient("L").resize((w, h))  # a pitch-green stand-in for the video
    bg = Image.merge("RGB", [g.point(lambda v: 30 + v // 3), g.point(lambda v: 90 + v // 4), g.point(lambda v: 40 + v // 5)])
    out = Image.alpha_composite(bg.convert("RGBA"), shot).convert("RGB").quantize(64)
    target = tmp_path / "overlay.png"
    out.save(target, optimize=True)
    print(f"\nscreenshot: {target}")
    assert target.stat().st_size < 200_000


def test_a_lone_surrogate_does_not_cut_the_page_off(overlay, page):
    """A caption with a lone surrogate (not encodable as UTF-8) once made every send to a page raise,
    the hello on each reconnect too: the page lost its stream for good. Now it shows U+FFFD."""
    page.goto(overlay.url + "?mode=replace")
    wait_connected(page, "ws")
    overlay.on_caption(Caption(0, 1, "broken \ud800 text"))
    wait_js(page, "document.body.dataset.count === '1'")
    assert box_text(page) == "broken \ufffd text"
    overlay.on_caption(Caption(1, 2, "the next caption"))
    wait_js(page, "document.body.dataset.count === '2'")
    assert box_text(page) == "the next caption"
    page.goto(overlay.url + "?transport=sse")  # a page (re)connecting gets the recent ones
    wait_connected(page, "sse")
    wait_js(page, "document.querySelector('#box').textContent.includes('the next caption')")
    assert "broken \ufffd text" in box_text(page)
    status, body = http_get(overlay.server.url + "/captions.json")
    assert status == 200 and [c["text"] for c in json.loads(body)["captions"]] == ["broken \ufffd text", "the next caption"]


@pytest.mark.parametrize("position", ["top", "middle", "bottom"])
def test_a_very_long_caption_keeps_the_latest_words_on_screen(overlay, page, position):
    """A 10,000-character caption once grew the box to 16,000 px: at the top or middle the newest
    words were far below the screen. The box now fits the screen; the oldest text is cut (…)."""
    page.goto(f"{overlay.url}?position={position}")
    wait_connected(page, "ws")
    overlay.on_caption(Caption(0, 1, "word " * 2000))
    overlay.on_caption(Caption(1, 2, "THE LATEST WORDS"))
    wait_js(page, "document.body.dataset.count === '2'")
    box, last = page.evaluate("""(() => { const b = document.querySelector('#box'); const r = b.getBoundingClientRect();
        const rects = b.lastChild.getClientRects(); const l = rects[rects.length - 1];
        return [[r.top, r.bottom], [l.top, l.bottom]]; })()""")
    assert 0 <= box[0] and box[1] <= 540, box  # the viewport is 960 x 540
    assert 0 <= last[0] and last[1] <= 540, last
    text = box_text(page)
    assert text.endswith("word THE LATEST WORDS") and text.startswith("…") and len(text) < 2000


@pytest.mark.parametrize("transport", ["sse", "auto"])
def test_a_page_refused_with_503_connects_once_a_slot_is_free(transport, page):
    """Beyond max_clients a page gets a 503. An EventSource treats that as final (it is closed, no
    retry of its own): the page once stayed dark for good, although the docs say it retries."""
    sink = make_sink({"kind": "overlay", "port": 0, "max_clients": 1, "ping_s": 0.5, "ttl": 0, "fade": 0})
    sink.start()
    stuck = raw_client(sink.server.port, "/events")
    try:
        wait_for(lambda: sink.stats()["clients"] == 1, 5, "the slot taken")
        page.goto(sink.url + ("?transport=sse" if transport == "sse" else ""))
        # auto: three refused WebSockets (0.5 + 1 + 2 s apart), then SSE, refused too
        wait_js(page, "document.body.dataset.transport === 'sse'", 10)
        time.sleep(1.5)
        assert page.evaluate("document.body.dataset.connected") == "0"
        stuck.close()
        wait_for(lambda: sink.stats()["clients"] == 0, 5, "the slot freed")
        wait_connected(page, "sse")
        sink.on_caption(Caption(0, 1, "in at last"))
        wait_js(page, "document.querySelector('#box').textContent.includes('in at last')")
    finally:
        stuck.close()
        sink.stop()


def test_a_bad_url_parameter_falls_back_to_the_sinks_own_setting(shared_server, page):
    """A URL parameter the page cannot use is ignored: the page keeps this sink's configured value
    (it once fell back to the built-in default: 42 px, white, bottom), and unknown ones do nothing."""
    srv, default, studio = shared_server
    page.goto(studio.url + "?size=big&position=sideways&align=&mode=scroll&keep=x&ttl=soon&fade=-&what=ever")
    wait_connected(page, "ws")
    assert page.eval_on_selector("#box", "e => getComputedStyle(e).fontSize") == "50px"
    assert page.eval_on_selector("#wrap", "e => e.className") == "pos-top align-center"
    page.goto(default.url + "?color=notacolour&size=1e999&background=url(x)")
    wait_connected(page, "ws")
    style = "e => { const s = getComputedStyle(e); return [s.color, s.fontSize, s.backgroundColor] }"
    assert page.eval_on_selector("#box", style) == ["rgb(255, 204, 0)", "30px", "rgba(0, 0, 0, 0.6)"]
    for i in range(4):  # keep=x: the configured 3
        default.on_caption(Caption(i, i + 1, f"c{i}"))
    wait_js(page, "document.body.dataset.count === '4'")
    assert box_text(page) == "c1 c2 c3"


def test_a_right_to_left_caption_reads_right_to_left(overlay, page):
    """Each caption gets its own direction from its first strong letter (dir=auto). A Hebrew or Arabic
    caption once laid out in the page's left-to-right paragraph: its final '!' was drawn at its
    right, that is before its first word for a reader of Hebrew; a caption after it was not isolated."""
    page.goto(overlay.url)
    wait_connected(page, "ws")
    overlay.on_caption(Caption(0, 1, "שלום עולם!"))
    overlay.on_caption(Caption(1, 2, "مرحبا 2024!"))
    overlay.on_caption(Caption(2, 3, "Score 2"))
    wait_js(page, "document.body.dataset.count === '3'")
    lefts = page.evaluate("""(() => [...document.querySelectorAll('#box .cap')].map(s => {
        const t = s.firstChild, r = document.createRange(), xs = {};
        for (let i = 0; i < t.length; i++) { r.setStart(t, i); r.setEnd(t, i + 1); xs[i] = r.getBoundingClientRect().left; }
        return [t.data, xs]; }))()""")
    (he, he_x), (ar, ar_x), (en, en_x) = lefts
    assert he_x[str(he.index("!"))] < he_x[str(he.index("ם", 5))] < he_x[str(he.index("ש"))]  # ! ... עולם ... שלום
    assert ar_x[str(ar.index("!"))] < ar_x[str(ar.index("م"))]
    assert en_x[str(en.index("S"))] < en_x[str(en.index("2"))]
    assert page.eval_on_selector_all("#box .cap", "els => els.map(e => e.dir)") == ["auto", "auto", "auto"]
