"""``livecc run SOURCE``: the command line of the live pipeline (the pipeline itself is ``pipeline/app.py``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..errors import UserError
from .options import add_engine_args, check_model, engine_overrides, quiet_progress_bars, set_cpu_threads

log = logging.getLogger("livecc.run")

RUN_EPILOG = """\
examples:
  livecc run rtmp://127.0.0.1/live/match --config sports --sink overlay
  export LIVECC_RESTREAM_URL=rtmp://...   # the stream key stays out of the command line and shell history
  livecc run rtmp://127.0.0.1/live/match --config restream
  livecc run v4l2:/dev/video0 --config configs/webcam-narration.yaml
  livecc run srt://0.0.0.0:9000?mode=listener --sink overlay --sink srt:match.srt
  livecc run match.mp4 --sink jsonl:events.jsonl --set engine.repetition_penalty=1.15

control API, metrics and the overlay page: http://127.0.0.1:8765 (/api/status, /metrics, /overlay)
"""


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="caption a live stream (RTMP, RTSP, SRT, HLS, webcam, file)",
                       description="Caption a live stream: capture -> 2 fps sampler -> LiveCC -> sinks.",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="rtmp://..., rtsp://..., srt://..., https://.../x.m3u8, "
                   "v4l2:/dev/video0, lavfi:testsrc2, a file (default: capture.source of the config)")
    p.add_argument("-c", "--config", help="YAML config (a path, or a preset name: sports, esports, "
                   "webcam-narration, obs-overlay, restream)")
    p.add_argument("--sink", action="append", default=[], metavar="KIND[:TARGET]",
                   help="add a sink (repeatable): console, jsonl:FILE, srt:FILE, vtt:FILE, burnin:URL|FILE, "
                        "restream:URL|FILE, youtube, obs[:ws://HOST:PORT], overlay[:PORT], twitch:#channel, "
                        "webhook:URL, subtitles:FILE (docs/sinks.md); none at all: console")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE",
                   help="override any config key, e.g. --set engine.max_new_tokens=32 --set sinks[0].fps=25")
    p.add_argument("--host", help="HTTP server address (default 127.0.0.1; elsewhere needs a token)")
    p.add_argument("--port", type=int, help="HTTP server port (default 8765)")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--status", choices=["auto", "rich", "plain", "off"],
                   help="live status: rich on a terminal, plain log lines otherwise (default auto)")
    add_engine_args(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from .. import config

    overrides = list(args.overrides)
    for key, value in (("server.host", args.host), ("server.port", args.port), ("log.format", args.log_format),
                       ("log.level", args.log_level), ("status.mode", args.status)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = config.load(args.config, overrides=overrides, sinks=args.sink, engine=engine_overrides(args),
                      source=args.source)
    return execute(cfg, verbose=args.verbose, threads=args.threads)


def execute(cfg, *, verbose: bool = False, model=None, on_started=None, threads: int | None = None) -> int:
    """Run a validated config until the source ends or SIGINT/SIGTERM/SIGHUP; the process's exit status.

    ``threads``: torch's CPU thread count (``set_cpu_threads``; None: its default)."""
    from ..app import Pipeline, PipelineError
    from ..status import StatusDisplay, setup_logging

    setup_logging(cfg.log.format, "debug" if verbose else cfg.log.level)
    set_cpu_threads(threads)
    if model is None:
        check_model(cfg.engine.model)  # seconds, not a minute of Hub retries
    if cfg.log.format == "json" or not sys.stderr.isatty():
        quiet_progress_bars()  # keep stderr one log record per line
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
        try:
            final = pipeline.stop()
        finally:
            if status is not None:
                status.stop()  # after the pipeline: the table's last frame shows "stopped", not "running"
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


#: the signals that ask a run to stop cleanly (SIGINT first: a second one quits at once)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


def _install_signals(pipeline):
    """SIGINT / SIGTERM / SIGHUP: a graceful stop; a second SIGINT (Ctrl-C again): exit at once (status 130).

    SIGHUP is what a closed terminal (a dropped ssh session) sends: its default action killed the run
    with its files unfinalised (a plain MP4 without its index).

    More SIGTERMs are the same stop request: ``timeout``, systemd and Docker send SIGTERM to the process
    and to its process group, so one ``timeout`` expiry arrives twice (GNU coreutils ``timeout.c``:
    ``send_sig(monitored_pid, sig)`` then ``send_sig(0, sig)``); only a person presses Ctrl-C twice."""
    hits = {"interrupts": 0}

    def handler(signum, frame):
        if signum == signal.SIGINT:
            hits["interrupts"] += 1
            if hits["interrupts"] > 1:
                os.write(2, b"livecc: stopping now\n")
                os._exit(130)
        if hits.get("name"):  # a stop is already under way
            return
        hits["name"] = signal.Signals(signum).name
        if not hits.get("waiting"):  # loading / starting: start nothing more. Not once the main thread
            pipeline.request_stop()  # waits: Event.set takes a lock the interrupted Event.wait may hold

    try:
        old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
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
        if self.signal_name and self.old:  # the process is on its way out: a repeated SIGTERM (timeout and
            # systemd send it twice) must not kill it while it finishes (Python resets its own handlers to the
            # default at exit, which kills; it keeps SIG_IGN)
            for s in STOP_SIGNALS[1:]:  # SIGTERM, SIGHUP
                signal.signal(s, signal.SIG_IGN)
                self.old.pop(s, None)
        for s, h in (self.old or {}).items():
            signal.signal(s, h)
