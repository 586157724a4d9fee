"""Baseline servers for the benchmarks, run the way notifyd runs (uvloop, same backlog)."""

from __future__ import annotations

import argparse

from aiohttp import web

from benchmarks import lift_fd_limit
from notifyd.app import LISTEN_BACKLOG, install_uvloop


def arguments(*extra: tuple[str, dict[str, object]]) -> argparse.Namespace:
    """The options every baseline takes; also lifts the file-descriptor limit."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--secret", required=True)
    for name, options in extra:
        parser.add_argument(name, **options)  # type: ignore[arg-type]
    lift_fd_limit()
    return parser.parse_args()


def serve(app: web.Application, port: int) -> None:
    install_uvloop()
    web.run_app(
        app, host="127.0.0.1", port=port, backlog=LISTEN_BACKLOG, access_log=None, print=None
    )
