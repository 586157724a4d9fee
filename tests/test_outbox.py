"""Corked writes: a burst of frames leaves each socket in one write, in order."""

from __future__ import annotations

import asyncio
from typing import Any

from notifyd.auth import NO_GRANTS, Identity
from notifyd.connection import Outbox, Session
from notifyd.protocol import text_frame


class CountingTransport:
    """A real transport that counts the writes made to it."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class Received(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


async def test_a_burst_leaves_in_one_write_per_socket_in_order() -> None:
    loop = asyncio.get_running_loop()
    receivers: list[Received] = []
    server = await loop.create_server(
        lambda: receivers.append(Received()) or receivers[-1], "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    outbox = Outbox()
    sessions, transports = [], []
    for user in ("ada", "bob"):
        real, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        transport = CountingTransport(real)
        identity = Identity(user, loop.time() + 60, NO_GRANTS, NO_GRANTS)
        sessions.append(Session(None, transport, identity, 1 << 20, 0.0, outbox))  # type: ignore[arg-type]
        transports.append(transport)
    frames = [text_frame(f'{{"n":{i}}}'.encode()) for i in range(5)]
    for frame in frames:
        for session in sessions:
            assert session.write(frame, 0)
    assert [t.writes for t in transports] == [0, 0]  # nothing written until the loop turns
    for _ in range(50):
        await asyncio.sleep(0.01)
        if all(len(r.data) == len(b"".join(frames)) for r in receivers):
            break
    assert [t.writes for t in transports] == [1, 1]
    assert [r.data for r in receivers] == [b"".join(frames)] * 2
    # The next pass starts a new batch.
    sessions[0].write(frames[0], 0)
    await asyncio.sleep(0.01)
    assert transports[0].writes == 2
    for transport in transports:
        transport.close()
    server.close()
    await server.wait_closed()


class ClosingSession(Session):
    """Records the close instead of running the WebSocket close handshake."""

    __slots__ = ("closed_with",)

    def close_soon(self, code: int, reason: str, grace: float = 5.0) -> None:
        self.closed_with = code


async def test_queued_bytes_count_against_the_send_buffer() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    real, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    identity = Identity("ada", loop.time() + 60, NO_GRANTS, NO_GRANTS)
    frame = text_frame(b"x" * 100)
    session = ClosingSession(None, real, identity, 3 * len(frame), 0.0, Outbox())  # type: ignore[arg-type]
    assert session.write(frame) and session.write(frame) and session.write(frame)
    assert not session.write(frame)  # a fourth would pass the limit before any write
    assert session.closed_with == 4009
    real.close()
    server.close()
    await server.wait_closed()
