"""Baseline servers for the benchmarks, run the way notifyd runs (uvloop, same backlog)."""

from __future__ import annotations

import argparse
import contextlib
import resource

from aiohttp import web


def arguments(*extra: tuple[str, dict[str, object]]) -> argparse.Namespace:
    """The options every baseline takes; also lifts the file-descriptor limit."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--secret", required=True)
    for name, options in extra:
        parser.add_argument(name, **options)  # type: ignore[arg-type]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return parser.parse_args()


def serve(app: web.Application, port: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, backlog=4096, access_log=None, print=None)
