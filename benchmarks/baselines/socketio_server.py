"""Baseline (b): python-socketio with AsyncAioPikaManager, the closest Python peer.

Clients join a room named after the JWT's subject; the harness emits through a
write-only AsyncAioPikaManager (socket.io's own RabbitMQ path) to a room or to all.
"""

from __future__ import annotations

import jwt
import socketio
from aiohttp import web

from benchmarks.baselines import arguments, serve


def main() -> None:
    args = arguments()
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
    serve(app, args.port)


if __name__ == "__main__":
    main()
