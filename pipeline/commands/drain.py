"""``livecc drain NODE``: ask a running ``livecc serve --cluster`` to move a Ray node's streams away (before
the node is shut down). Sends ``POST /api/nodes/NODE/drain`` to the head's HTTP API."""

from __future__ import annotations

import json
import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("drain", help="move a cluster node's streams to other nodes (livecc serve --cluster)",
                       description="Move every stream of a Ray node to other GPU workers and end the node's "
                                   "workers, so the node can be shut down. NODE: a node id (or a prefix of one) "
                                   "or a node name, as GET /api/nodes lists them.")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--url", default="http://127.0.0.1:8765", help="the head's HTTP API (default %(default)s)")
    p.add_argument("--token", help="the server's token (default: $LIVECC_API_TOKEN, as the server)")
    p.set_defaults(func=main)


def main(args) -> int:
    import requests

    from ..config import TOKEN_ENV  # (not at the top: the parser imports no third-party package, not even yaml)
    from ..errors import UserError

    # the server reads its token from $LIVECC_API_TOKEN (TOKEN_ENV); $LIVECC_TOKEN, which this command read
    # before, still works
    token = args.token or os.environ.get(TOKEN_ENV) or os.environ.get("LIVECC_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.post(f"{args.url.rstrip('/')}/api/nodes/{args.node}/drain", headers=headers, timeout=120)
    except requests.RequestException as e:
        raise UserError(f"{args.url}: {type(e).__name__}: {e} (is `livecc serve --cluster` running there? "
                        "--url gives the head's address)") from None
    try:
        body = r.json()
    except ValueError:
        body = {"error": r.text[:200]}
    if r.status_code >= 400 and "moved" not in body:
        raise UserError(f"drain {args.node}: HTTP {r.status_code}: {body.get('error', body)}")
    print(json.dumps(body, indent=2))
    if body.get("stuck"):
        print(f"livecc: error: no room elsewhere for {', '.join(body['stuck'])}", file=sys.stderr)
        return 1
    return 0
