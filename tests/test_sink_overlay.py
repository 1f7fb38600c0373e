"""OBS overlay in a real headless Chromium (Debian chromium driven by Playwright)."""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pipeline.plugins import make_sink
from pipeline.types import Caption
from plugins.sinks.overlay import OverlayServer

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
DOCS = Path(__file__).resolve().parent.parent / "docs"

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


def wait_js(page, expr: str, timeout: float = 5.0) -> None:
    """Poll a JS expression from here (page.wait_for_function uses eval, which our CSP forbids)."""
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
    overlay.server.drop_clients()
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
    # routes mounted after start (the control API's way in); request bodies are capped
    from aiohttp import web

    async def echo(request):
        return web.json_response({"n": len(await request.read())})

    overlay.server.add_route("POST", "/api/echo", echo)
    with urllib.request.urlopen(urllib.request.Request(base + "/api/echo", data=b"x" * 1000)) as r:
        assert json.load(r) == {"n": 1000}
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(urllib.request.Request(base + "/api/echo", data=b"x" * 200_000))
    assert ei.value.code == 413


def test_shared_server_is_one_per_address():
    a = OverlayServer.shared("127.0.0.1", 48765)
    b = OverlayServer.shared("127.0.0.1", 48765)
    assert a is b
    s1 = make_sink("overlay:127.0.0.1:48766")
    s2 = make_sink({"overlay": {"listen": 48766}})
    s1.start(), s2.start()
    assert s1.server is s2.server and s1.server.running
    s1.stop()
    assert s2.server.running  # still used by the other
    srv = s2.server
    s2.stop()
    assert not srv.running


def test_readme_screenshot(overlay, page, tmp_path):
    """docs/overlay.png: the overlay composited over a sample frame (the page itself is transparent).

    Written to docs/ when missing or with LIVECC_UPDATE_DOCS=1; otherwise to a temp folder.
    """
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
    target = DOCS / "overlay.png"
    if target.exists() and os.environ.get("LIVECC_UPDATE_DOCS") != "1":
        target = tmp_path / "overlay.png"
    target.parent.mkdir(exist_ok=True)
    out.save(target, optimize=True)
    assert target.stat().st_size < 200_000
