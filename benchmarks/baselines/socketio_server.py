"""Baseline (b): python-socketio with AsyncAioPikaManager, the closest Python peer.

Clients join a room named after the JWT's subject; the harness emits through a
write-only AsyncAioPikaManager (socket.io's own RabbitMQ path) to a room or to all.
"""

from __future__ import annotations

import argparse
import resource

import jwt
import socketio
from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    manager = socketio.AsyncAioPikaManager(args.amqp_url, channel="notifyd-bench")
    server = socketio.AsyncServer(
        async_mode="aiohttp", client_manager=manager, cors_allowed_origins="*"
    )

    @server.event
    async def connect(sid: str, environ: dict[str, str], auth: object = None) -> bool:
        token = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ")
        try:
            user = jwt.decode(token, args.secret, algorithms=["HS256"])["sub"]
        except jwt.InvalidTokenError:
            return False
        await server.enter_room(sid, f"user.{user}")
        return True

    app = web.Application()
    server.attach(app)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=args.port, backlog=4096, access_log=None, print=None)


if __name__ == "__main__":
    main()
