"""``livecc run SOURCE``: the command line of the live pipeline (the pipeline itself is ``app.py``)."""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger("livecc.run")

RUN_EPILOG = """\
examples:
  livecc run rtmp://127.0.0.1/live/match --config configs/sports.yaml --sink burnin:rtmp://a.rtmp.youtube.com/live2/KEY
  livecc run v4l2:/dev/video0 --config configs/webcam-narration.yaml
  livecc run srt://0.0.0.0:9000?mode=listener --sink overlay --sink srt:match.srt
  livecc run match.mp4 --sink jsonl:events.jsonl --set engine.repetition_penalty=1.15

control API, metrics and the overlay page: http://127.0.0.1:8765 (/api/status, /metrics, /overlay)
"""


def add_parser(sub) -> None:
    from .cli import _engine_args

    p = sub.add_parser("run", help="caption a live stream (RTMP, RTSP, SRT, HLS, webcam, file)",
                       description="Caption a live stream: capture -> 2 fps sampler -> LiveCC -> sinks.",
                       epilog=RUN_EPILOG, formatter_class=_Formatter)
    p.add_argument("source", nargs="?", help="rtmp://..., rtsp://..., srt://..., https://.../x.m3u8, "
                   "v4l2:/dev/video0, lavfi:testsrc2, a file (default: capture.source of the config)")
    p.add_argument("-c", "--config", help="YAML config (a path, or a preset name: sports, esports, "
                   "webcam-narration, obs-overlay, restream)")
    p.add_argument("--sink", action="append", default=[], metavar="KIND[:TARGET]",
                   help="add a sink (repeatable): console, jsonl:FILE, srt:FILE, vtt:FILE, burnin:URL|FILE, "
                        "overlay[:PORT], twitch:#channel, webhook:URL; none at all: console")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE",
                   help="override any config key, e.g. --set engine.max_new_tokens=32 --set sinks[0].fps=25")
    p.add_argument("--host", help="HTTP server address (default 127.0.0.1; elsewhere needs a token)")
    p.add_argument("--port", type=int, help="HTTP server port (default 8765)")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--status", choices=["auto", "rich", "plain", "off"],
                   help="live status: rich on a terminal, plain log lines otherwise (default auto)")
    _engine_args(p)
    p.set_defaults(func=cmd_run)


class _Formatter(__import__("argparse").RawDescriptionHelpFormatter):
    pass


def _engine_overrides(args) -> dict:
    return dict(model=args.model, device=args.device, dtype=args.dtype, query=args.query, greedy=args.greedy,
                max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                positions=args.positions, seed=args.seed, quantize=args.quantize)


def cmd_run(args) -> int:
    from . import config

    overrides = list(args.overrides)
    for key, value in (("server.host", args.host), ("server.port", args.port), ("log.format", args.log_format),
                       ("log.level", args.log_level), ("status.mode", args.status)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = config.load(args.config, overrides=overrides, sinks=args.sink, engine=_engine_overrides(args),
                      source=args.source)
    return execute(cfg, verbose=args.verbose)


def execute(cfg, *, verbose: bool = False, model=None, on_started=None) -> int:
    """Run a validated config until the source ends or SIGINT/SIGTERM; the process's exit status."""
    from .app import Pipeline, PipelineError
    from .cli import UserError
    from .status import StatusDisplay, setup_logging

    setup_logging(cfg.log.format, "debug" if verbose else cfg.log.level)
    if cfg.log.format == "json" or not sys.stderr.isatty():
        _quiet_progress_bars()  # keep stderr one log record per line
    try:
        pipeline = Pipeline(cfg, model=model)
    except PipelineError as e:
        raise UserError(str(e)) from None
    restore = _install_signals(pipeline)
    status = None
    try:
        try:
            pipeline.start()
        except PipelineError as e:
            pipeline.stop()
            raise UserError(str(e)) from None
        if on_started is not None:
            on_started(pipeline)
        mode = cfg.status.mode
        if mode == "auto" and cfg.log.format == "json":
            mode = "plain"  # JSON logs are for machines: status as JSON records, not a table
        status = StatusDisplay(pipeline.snapshot, mode, cfg.status.interval_s,
                               cfg.status.refresh_hz) if mode != "off" else None
        if status is not None:
            status.start()
        # in slices, not one blocking wait: the signal handler runs only when the main thread runs Python
        # code, and a lock wait is not always woken by a signal (one delivered to another thread is not)
        restore.hits["waiting"] = True
        while not pipeline.wait(0.25) and not restore.signal_name:
            pass
        if restore.signal_name:
            pipeline.request_stop()
            log.warning("%s: stopping (finishing the turn in progress, closing sinks; again to quit at once)",
                        restore.signal_name)
    finally:
        if status is not None:
            status.stop()
        final = pipeline.stop()
        restore()
    snap = pipeline.snapshot()
    log.info("done: %d turns, %d clips dropped, sinks: %s", snap["turns"], snap["queue"].get("dropped", 0),
             ", ".join(f"{n} {v.get('state')}" for n, v in final.items()))
    if pipeline.error:
        print(f"livecc: error: {pipeline.error}", file=sys.stderr)
        return 1
    lost = [f"{n} ({v['state']}: {v.get('last_error')})" for n, v in final.items() if v.get("state") in ("failed", "hung")]
    if lost:  # the run went on without it (or abandoned it at the end): its output is incomplete
        print(f"livecc: error: sink lost data: {'; '.join(lost)}", file=sys.stderr)
        return 1
    return 0


def _install_signals(pipeline):
    """SIGINT / SIGTERM: a graceful stop; a second one: exit at once (status 130)."""
    hits = {"n": 0}

    def handler(signum, frame):
        hits["n"] += 1
        if hits["n"] > 1:
            os.write(2, b"livecc: stopping now\n")
            os._exit(130)
        hits["name"] = signal.Signals(signum).name
        if not hits.get("waiting"):  # loading / starting: start nothing more. Not once the main thread
            pipeline.request_stop()  # waits: Event.set takes a lock the interrupted Event.wait may hold

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (embedded use): the caller handles signals
        return _Restore(None, hits)
    return _Restore(old, hits)


class _Restore:
    def __init__(self, old, hits):
        self.old, self.hits = old, hits

    @property
    def signal_name(self) -> str | None:
        return self.hits.get("name")

    def __call__(self) -> None:
        for s, h in (self.old or {}).items():
            signal.signal(s, h)


def _quiet_progress_bars() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # an older or absent transformers: nothing to quiet
        pass
