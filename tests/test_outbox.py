"""Corked writes: a burst of frames leaves each socket in one write, in order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from notifyd.connection import Connection
from notifyd.protocol import Channel, Notification
from notifyd.websocket import OP_TEXT, text_frame

from .conftest import ServerFactory, new_user, raw_upgrade, token
from .test_errors import client


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


async def test_a_burst_leaves_in_one_write_per_socket_in_order(
    make_server: ServerFactory,
) -> None:
    server = await make_server()
    hub = server.gateway.hub
    users = [new_user(), new_user()]
    readers, writers = [], []  # the writers are kept: a collected one closes its socket
    for user in users:
        reader, writer = await raw_upgrade(server.port, token(user))
        await reader.readuntil(b"\r\n\r\n")
        head = await reader.readexactly(2)
        assert head[0] == 0x81 and head[1] < 126, head
        assert b'"welcome"' in await reader.readexactly(head[1])
        readers.append(reader)
        writers.append(writer)
    connections: list[Connection] = [hub.sockets_of(user)[0] for user in users]
    counters = []
    for connection in connections:
        counter = CountingTransport(connection.transport)
        connection.transport = counter  # type: ignore[assignment]
        counters.append(counter)
    frames = [text_frame(f'{{"n":{i}}}'.encode()) for i in range(5)]
    for index, frame in enumerate(frames):
        for user in users:
            notification = Notification(f"{user}-{index}", Channel("user", user), frame, 0)
            assert hub.deliver(notification) == 1
    assert [c.writes for c in counters] == [0, 0]  # nothing written until the loop turns
    for reader in readers:
        received = await asyncio.wait_for(reader.readexactly(len(b"".join(frames))), 5)
        assert received == b"".join(frames)
    assert [c.writes for c in counters] == [1, 1]
    # The next pass starts a new batch.
    hub.deliver(Notification("again", Channel("user", users[0]), frames[0], 0))
    await asyncio.wait_for(readers[0].readexactly(len(frames[0])), 5)
    assert counters[0].writes == 2
    for writer in writers:
        writer.close()


async def test_the_answer_to_a_client_message_is_written_where_it_is_read(
    make_server: ServerFactory,
) -> None:
    """A pong does not wait for the outbox's next pass (behind that pass's reaping and
    admissions in a reconnect wave): it is written before ``data_received`` returns."""
    server = await make_server()
    user = new_user()
    reader, writer = await raw_upgrade(server.port, token(user))
    await reader.readuntil(b"\r\n\r\n")
    head = await reader.readexactly(2)
    assert b'"welcome"' in await reader.readexactly(head[1])
    connection: Connection = server.gateway.hub.sockets_of(user)[0]
    counter = CountingTransport(connection.transport)
    connection.transport = counter  # type: ignore[assignment]
    connection.data_received(client(OP_TEXT, b'{"type":"ping","ref":7}'))
    assert counter.writes == 1  # no turn of the event loop in between
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    assert json.loads(await reader.readexactly(head[1])) == {"type": "pong", "ref": 7}
    writer.close()
