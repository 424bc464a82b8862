"""``kquant``: the operator and the command-line tools around it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence


def _operator(args: argparse.Namespace) -> int:
    import kopf
    from kquant.operator import handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    namespaces = args.namespace or []
    asyncio.run(kopf.operator(
        clusterwide=not namespaces, namespaces=namespaces,
        standalone=args.peering is None, peering_name=args.peering,
        liveness_endpoint=args.liveness,
    ))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kquant", description="kquant: quantized LLMs on Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True)
    op = sub.add_parser("operator", help="run the operator against the current kubeconfig or in-cluster")
    op.add_argument("-n", "--namespace", action="append",
                    help="watch only this namespace (repeatable); all namespaces when unset")
    op.add_argument("--liveness", default=None,
                    help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--peering", default=None,
                    help="kopf peering object name; with several replicas only one is active")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(run=_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
