"""The churn floor: the least a WebSocket server can do per socket, as a bare asyncio protocol.

No aiohttp, no RabbitMQ, no hub: an upgrade request (anything ending in a blank line
with ``Upgrade: websocket``) is answered with a ``101`` and a welcome text frame in one
write; a client text frame whose payload is a ``{"type":"ping","ref":N}`` is answered
with ``{"type":"pong","ref":N}``; anything else is read and ignored. A peer's EOF closes
the socket. With ``--jwt`` the upgrade's bearer token is verified with PyJWT (HS256),
as every other server does. ``--loop asyncio`` runs the stdlib event loop instead of
uvloop.

The churn scenario against it (``run.py --scenarios churn --only bare bare-asyncio``)
is the same load generator, waves and pinger as against notifyd: what remains of a
stall here is the event loop's and the kernel's, not the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal

from benchmarks import lift_fd_limit
from notifyd.app import LISTEN_BACKLOG

_REF = re.compile(rb'"ref":\s*([0-9]+)')
_TOKEN = re.compile(rb"Authorization: Bearer ([^\r\n]+)", re.I)
_WELCOME = b'{"type":"welcome"}'
_UPGRADE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: x\r\n\r\n" + bytes([0x81, len(_WELCOME)]) + _WELCOME
)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Bare(asyncio.Protocol):
    """One socket: the upgrade, then pings answered; nothing kept but the transport."""

    __slots__ = ("buffer", "transport", "upgraded")
    secret: str | None = None

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            head, buffer = buffer[:end], buffer[end + 4 :]
            transport = self.transport
            assert transport is not None
            if b"upgrade: websocket" not in head.lower():
                transport.write(_NOT_FOUND)
                transport.close()
                return
            if self.secret is not None and not self._verified(head):
                transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                transport.close()
                return
            self.upgraded = True
            transport.write(_UPGRADE)
        offset, size = 0, len(buffer)
        while size - offset >= 6:  # client frames: masked, payloads under 126 bytes here
            length = buffer[offset + 1] & 0x7F
            if length >= 126:
                self.transport.close()  # type: ignore[union-attr]
                return
            start = offset + 6
            end = start + length
            if end > size:
                break
            opcode = buffer[offset] & 0x0F
            if opcode == 0x1:
                mask = buffer[offset + 2 : start]
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buffer[start:end]))
                match = _REF.search(payload)
                if b'"ping"' in payload and match:
                    pong = b'{"type":"pong","ref":%s}' % match.group(1)
                    self.transport.write(bytes([0x81, len(pong)]) + pong)  # type: ignore[union-attr]
            elif opcode == 0x8:
                self.transport.close()  # type: ignore[union-attr]
                return
            offset = end
        self.buffer = buffer[offset:]

    def _verified(self, head: bytes) -> bool:
        import jwt

        match = _TOKEN.search(head)
        if match is None or self.secret is None:
            return False
        try:
            jwt.decode(match.group(1).decode(), self.secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return False
        return True

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Bare, "127.0.0.1", port, backlog=LISTEN_BACKLOG)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp-url", help="ignored: nothing is consumed")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--jwt", action="store_true", help="verify the bearer token (HS256)")
    args = parser.parse_args()
    lift_fd_limit()
    if args.jwt:
        Bare.secret = args.secret
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
