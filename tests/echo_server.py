"""A test-only WebSocket echo endpoint on notifyd's own parser and adapter.

The Autobahn TestSuite (run by ``kosoku``) needs a server that echoes every
message. This one is notifyd's :class:`~notifyd.connection.Connection` with two
changes: it starts open (no auth, no deadlines) and it echoes TEXT and BINARY
messages. Everything else — the handshake, frame parsing, ping/pong, the close
handshake, protocol errors and their close codes — is the code every ``/ws``
socket runs.

Standalone, for a manual run::

    python -m tests.echo_server --port 9001
    kosoku -m fuzzingclient -x '12.*' -x '13.*' ws://127.0.0.1:9001/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
from typing import Any

from aiohttp import web

from notifyd.auth import TokenVerifier
from notifyd.config import Settings, from_mapping
from notifyd.connection import Connection, SocketServer
from notifyd.hub import Hub
from notifyd.protocol import Channel
from notifyd.session import State
from notifyd.websocket import OP_BINARY, OP_TEXT, binary_frame, text_frame

SECRET = "echo-server-test-secret-long-enough-for-hs256!"
#: Autobahn's largest messages are 16 MiB (cases 9.1.6, 9.2.6).
MAX_MESSAGE_SIZE = 32 * 1024 * 1024


class EchoConnection(Connection):
    """A socket that is open from the start and sends every message back."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = State.OPEN
        self.close_at = math.inf  # no auth timeout

    def _frame(self, opcode: int, payload: bytes, now: float) -> None:
        if self.state is State.OPEN and opcode == OP_TEXT:
            self._queue(text_frame(payload))
        elif self.state is State.OPEN and opcode == OP_BINARY:
            self._queue(binary_frame(payload))
        else:  # ping, pong, close, and anything after our close frame
            super()._frame(opcode, payload, now)


class EchoServer(SocketServer):
    connection_class = EchoConnection


class _NoBindings:
    def want(self, routing_key: str) -> None:
        pass

    def release(self, routing_key: str) -> None:
        pass


class _NoUpstream:
    async def publish(
        self, channel: Channel, event: str | None, data: Any, sender: str | None = None
    ) -> str:
        raise AssertionError("the echo endpoint publishes nothing")

    async def send_upstream(self, user: str, session: str, event: str, data: Any) -> None:
        raise AssertionError("the echo endpoint sends nothing upstream")


def echo_settings() -> Settings:
    return from_mapping(
        {
            "auth": {"secret": SECRET},
            "ws": {
                "max_message_size": MAX_MESSAGE_SIZE,
                "heartbeat": 0,
                "rate_limit": 1e9,
                "rate_burst": 1_000_000_000,
                "send_buffer_bytes": 1 << 30,
            },
        },
        source="echo",
    )


def echo_app() -> web.Application:
    """An aiohttp app with the echo endpoint at ``/``."""
    settings = echo_settings()
    server = EchoServer(
        settings,
        Hub(_NoBindings(), linger=0),
        TokenVerifier(settings.auth),
        _NoUpstream(),
        replay=None,
    )
    app = web.Application()
    app.router.add_get("/", server.handle)

    async def close_sockets(_: web.Application) -> None:
        await server.close()

    app.on_shutdown.append(close_sockets)
    return app


async def start(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve the echo app; returns the runner (``await runner.cleanup()``) and the port."""
    runner = web.AppRunner(echo_app(), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound: int = runner.addresses[0][1]
    return runner, bound


async def _serve(host: str, port: int) -> None:
    runner, bound = await start(host, port)
    print(f"echo server on ws://{host}:{bound}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="notifyd's WebSocket echo endpoint (tests)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0: any free port")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
