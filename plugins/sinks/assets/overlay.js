// livecc caption overlay for OBS Browser Source. Captions are inserted with textContent only.
(function () {
  "use strict";
  var cfg = {};
  try { cfg = JSON.parse(document.getElementById("livecc-config").textContent) || {}; } catch (e) { cfg = {}; }
  var params = new URLSearchParams(location.search);
  // a value from the URL, else this sink's config, else the built-in default: the first that is valid
  function pick(name, dflt, ok) {
    var tries = [];
    if (params.has(name)) tries.push(params.get(name));
    if (cfg[name] !== undefined && cfg[name] !== null) tries.push(String(cfg[name]));
    for (var i = 0; i < tries.length; i++) if (ok(tries[i])) return tries[i];
    return dflt;
  }
  function num(name, dflt, lo, hi) {
    var v = parseFloat(pick(name, dflt, function (s) { return isFinite(parseFloat(s)); }));
    return Math.min(hi, Math.max(lo, v));
  }
  var FLAGS = ["1", "true", "yes", "0", "false", "no"];
  function flag(name, dflt) { return FLAGS.indexOf(pick(name, dflt, function (s) { return FLAGS.indexOf(s) >= 0; })) < 3; }
  function css(prop) { return function (s) { return !!(window.CSS && CSS.supports(prop, s)); }; }
  function colour(name, dflt) { return pick(name, dflt, css("color")); }
  function oneOf(name, dflt, allowed) { return pick(name, dflt, function (s) { return allowed.indexOf(s) >= 0; }); }

  var wrap = document.getElementById("wrap");
  var box = document.getElementById("box");
  var position = oneOf("position", "bottom", ["bottom", "top", "middle"]);
  var align = oneOf("align", "center", ["center", "left", "right"]);
  var mode = oneOf("mode", "rollup", ["rollup", "replace"]);
  var keep = mode === "replace" ? 1 : Math.round(num("keep", "3", 1, 50));
  var ttl = num("ttl", "10", 0, 86400);
  var fade = Math.round(num("fade", "300", 0, 10000));
  var transport = oneOf("transport", "auto", ["auto", "ws", "sse"]);
  wrap.className = "pos-" + position + " align-" + align;
  box.style.fontFamily = pick("font", "\"DejaVu Sans\", \"Segoe UI\", Arial, sans-serif", css("font-family"));
  box.style.fontSize = num("size", "42", 6, 300) + "px";
  box.style.color = colour("color", "#ffffff");
  var boxed = flag("box", "1");
  box.style.backgroundColor = boxed ? colour("background", "rgba(0,0,0,0.6)") : "transparent";
  box.style.setProperty("--fade", fade + "ms");
  box.classList.toggle("nobox", !boxed);
  box.classList.toggle("shadow", flag("shadow", "1"));
  box.classList.add("empty");

  var hideTimer = null;
  var lastText = null;
  function show(c) {
    if (!c || typeof c.text !== "string") return;
    var text = c.text.trim();
    if (!text || text === "...") return; // silence: keep what is shown
    var span = document.createElement("span");
    span.className = "cap new" + (c.kind === "answer" ? " answer" : "");
    span.dir = "auto"; // its own direction (Arabic, Hebrew: right to left), isolated from its neighbours
    span.textContent = (box.childNodes.length ? " " : "") + text; // text, never HTML
    box.appendChild(span);
    while (box.childNodes.length > keep) box.removeChild(box.firstChild);
    if (box.firstChild && box.firstChild.textContent.charAt(0) === " ") {
      box.firstChild.textContent = box.firstChild.textContent.slice(1);
    }
    fit();
    requestAnimationFrame(function () { span.classList.remove("new"); });
    box.classList.remove("empty", "expired");
    lastText = text;
    document.body.dataset.count = String((parseInt(document.body.dataset.count || "0", 10)) + 1);
    if (hideTimer) clearTimeout(hideTimer);
    if (ttl > 0) hideTimer = setTimeout(function () { box.classList.add("expired"); }, ttl * 1000);
  }
  // the box is at most 88vh high (overlay.css): what does not fit goes from the start, whole
  // captions first, then the start of the oldest one left (binary search: a few layouts, not one per character)
  function fits() { return box.scrollHeight <= box.clientHeight + 1; }
  function fit() {
    if (fits()) return;
    while (box.childNodes.length > 1) { // drop the oldest captions while the rest still overflows
      var oldest = box.removeChild(box.firstChild);
      if (fits()) { box.insertBefore(oldest, box.firstChild); break; }
    }
    var first = box.firstChild;
    var full = first.textContent, lo = 1, hi = full.length;
    while (lo < hi) {
      var mid = (lo + hi) >> 1;
      first.textContent = "\u2026" + full.slice(mid);
      if (fits()) hi = mid; else lo = mid + 1;
    }
    // do not start inside a character: a low surrogate, a combining mark, a joiner or a variation selector
    while (lo < full.length && /[\udc00-\udfff\u0300-\u036f\u200c\u200d\ufe00-\ufe0f]/.test(full.charAt(lo))) lo++;
    first.textContent = "\u2026" + full.slice(lo).replace(/^\s+/, "");
  }
  function clear() { while (box.firstChild) box.removeChild(box.firstChild); box.classList.add("empty"); }

  function handle(raw) {
    var msg;
    try { msg = JSON.parse(raw); } catch (e) { return; }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "caption") show(msg.caption);
    else if (msg.type === "hello" && Array.isArray(msg.recent) && !box.childNodes.length) {
      msg.recent.slice(-keep).forEach(show);
    } else if (msg.type === "clear") clear();
  }

  function setState(kind, connected) {
    document.body.dataset.transport = kind;
    document.body.dataset.connected = connected ? "1" : "0";
  }

  // this page's data routes (a named overlay lives under /overlay/NAME); the page's own ?token=
  // goes on to them: off loopback they need it, and EventSource / WebSocket cannot send headers
  var prefix = typeof cfg.prefix === "string" ? cfg.prefix : "";
  var query = params.has("token") ? "?token=" + encodeURIComponent(params.get("token")) : "";

  var wsFailures = 0;
  var delay = 500;
  var sseDelay = 1000;
  function connectSSE() {
    setState("sse", false);
    var es = new EventSource(prefix + "/events" + query);
    es.onopen = function () { sseDelay = 1000; setState("sse", true); };
    es.onmessage = function (ev) { handle(ev.data); };
    es.onerror = function () {
      setState("sse", false);
      // a dropped stream or a server that is down: EventSource reconnects by itself. An answer that
      // is not a stream (503 too many clients, 401, a proxy's 502) closes it for good: retry here
      if (es.readyState === 2) {
        setTimeout(connectSSE, sseDelay);
        sseDelay = Math.min(5000, sseDelay * 2);
      }
    };
  }
  function connectWS() {
    var ws;
    try {
      ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + prefix + "/ws" + query);
    } catch (e) { wsFailures++; return retry(); }
    var opened = false;
    ws.onopen = function () { opened = true; wsFailures = 0; delay = 500; setState("ws", true); };
    ws.onmessage = function (ev) { handle(ev.data); };
    ws.onclose = function () {
      setState("ws", false);
      if (!opened) wsFailures++;
      retry();
    };
  }
  function retry() {
    if (transport === "auto" && wsFailures >= 3) { connectSSE(); return; } // fall back to SSE
    setTimeout(connectWS, delay);
    delay = Math.min(5000, delay * 2);
  }
  if (transport === "sse" || !("WebSocket" in window)) connectSSE(); else connectWS();
})();
