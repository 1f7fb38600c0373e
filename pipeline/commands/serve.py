"""``livecc serve STREAMS.yaml``: many live streams in one process, batched on one GPU (``pipeline/serve.py``)."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("livecc.serve")

EXAMPLE = """\
example streams file (the sections of a livecc run config, shared, plus streams:):

  engine: {model: chenjoya/LiveCC-7B-Instruct, max_streams: 16}
  sinks: [console]
  streams:
    - {id: court1, source: "rtmp://127.0.0.1/live/court1", sinks: ["jsonl:court1.jsonl", overlay]}
    - {id: court2, source: "rtmp://127.0.0.1/live/court2", query: "Who scores?"}

add and remove streams while it runs:
  curl -X POST localhost:8765/api/streams -H 'Content-Type: application/json' \\
       -d '{"id": "court3", "source": "rtmp://127.0.0.1/live/court3"}'
  curl -X DELETE localhost:8765/api/streams/court3
"""


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="caption many live streams in one process (one model, batched on the GPU)",
                       description="Caption many live streams with one model: every stream's turns are batched "
                                   "on the GPU; streams can be added and removed through the HTTP API.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("streams_file", metavar="STREAMS.yaml", help="streams file (see the example below)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY.PATH=VALUE",
                   help="override a shared key, e.g. --set engine.max_streams=8")
    p.add_argument("--host", help="HTTP server address (default 127.0.0.1; elsewhere needs a token)")
    p.add_argument("--port", type=int, help="HTTP server port (default 8765)")
    p.add_argument("--status", choices=["auto", "rich", "plain", "off"], help="live status (default auto)")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="spread the streams over the GPUs of a Ray cluster: ray://HOST:PORT, HOST:PORT, or auto "
                        "(needs pip install 'livecc-pipeline[cluster]'; docs/cluster.md)")
    p.add_argument("--worker-resource", default="GPU", metavar="NAME",
                   help="with --cluster: the Ray resource one engine worker takes (default GPU: one per GPU)")
    p.set_defaults(func=main)


def main(args) -> int:
    from .. import config
    from ..app import PipelineError
    from ..errors import UserError
    from ..serve import Service
    from ..status import StatusDisplay, setup_logging
    from .run import _install_signals

    data = config.read_yaml(args.streams_file)
    for key, value in (("server.host", args.host), ("server.port", args.port), ("log.format", args.log_format),
                       ("log.level", args.log_level), ("status.mode", args.status)):
        if value is not None:
            config.set_path(data, key, value)
    for item in args.overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise config.ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        config.set_path(data, key.strip(), config.parse_value(value))
    streams = data.pop("streams", None) or []
    if not isinstance(streams, list):
        raise config.ConfigError(f"{args.streams_file}: streams: must be a list")
    if args.cluster:
        service = _cluster_service(data, streams, args)
    else:
        service = Service(data, streams, where=args.streams_file)  # every stream checked before the model loads
    cfg = service.cfg
    setup_logging(cfg.log.format, "debug" if args.verbose else cfg.log.level)
    restore = _install_signals(service)
    status = None
    try:
        try:
            service.start()
        except PipelineError as e:
            raise UserError(str(e)) from None
        mode = "plain" if cfg.status.mode == "auto" and cfg.log.format == "json" else cfg.status.mode
        if mode != "off":
            status = StatusDisplay(service.snapshot, mode, cfg.status.interval_s, cfg.status.refresh_hz).start()
        restore.hits["waiting"] = True
        while not service.wait(0.25) and not restore.signal_name:
            pass
        if restore.signal_name:
            log.warning("%s: stopping every stream (finishing turns in progress, closing sinks)", restore.signal_name)
    finally:
        if status is not None:
            status.stop()
        final = service.stop()
        restore()
    lost = [f"{sid}/{n} ({v['state']}: {v.get('last_error')})" for sid, sinks in final.items()
            for n, v in sinks.items() if v.get("state") in ("failed", "hung")]
    ended = service.ended
    earlier = ended.dropped_lost
    log.info("done: %d streams", len(final) + ended.dropped_clean + earlier)
    if lost or earlier:
        more = f" (and {earlier} earlier streams, no longer listed)" if earlier else ""
        print(f"livecc: error: sink lost data: {'; '.join(lost)}{more}", file=sys.stderr)
        return 1
    return 0


def _cluster_service(data: dict, streams: list, args):
    """The Ray form of ``Service`` (``pipeline/cluster/``); ray is imported only here."""
    from ..errors import UserError

    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--cluster needs Ray: pip install 'livecc-pipeline[cluster]'") from None
    from ..cluster.service import ClusterService

    return ClusterService(data, streams, address=args.cluster, resource=args.worker_resource,
                          where=args.streams_file)
