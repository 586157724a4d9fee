"""Limits against hostile or broken clients: each bounded, refused and counted."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from .conftest import (
    ServerFactory,
    expect_close,
    new_user,
    receive_json,
    token,
    upgrade_request,
)


async def open_from(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection from ``source`` (another loopback address: another client)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def status_of(reader: asyncio.StreamReader) -> int:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return int(head.split(b" ", 2)[1])


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    return True


async def test_a_request_head_over_16_kib_gets_431(make_server: ServerFactory) -> None:
    server = await make_server()
    reader, writer = await open_from(server.port)
    padding = "".join(f"X-Pad-{i}: {'p' * 4000}\r\n" for i in range(5))
    writer.write(upgrade_request(headers=padding))
    assert await status_of(reader) == 431
    writer.close()


async def test_connections_that_never_finish_their_request_are_cut_off(
    make_server: ServerFactory,
) -> None:
    server = await make_server(server={"handshake_timeout": 0.5})
    port = server.port
    silent_reader, silent = await open_from(port)
    dribble_reader, dribbler = await open_from(port)
    dribbler.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()

    async def dribble() -> None:
        with pytest.raises(ConnectionError):
            for _ in range(40):
                dribbler.write(b"X")  # one header byte at a time, never a whole request
                await dribbler.drain()
                await asyncio.sleep(0.1)

    dribbling = asyncio.create_task(dribble())
    assert await closed_within(silent_reader, 3)
    assert await closed_within(dribble_reader, 3)
    assert time.monotonic() - started < 3
    dribbling.cancel()
    silent.close()
    dribbler.close()


async def test_unauthenticated_sockets_are_capped_per_address_and_in_total(
    make_server: ServerFactory,
) -> None:
    server = await make_server(
        ws={"max_pending_per_address": 3, "max_pending": 5}, auth={"auth_timeout": 30}
    )
    port = server.port
    sockets = server.gateway.sockets
    idle = []
    for _ in range(3):
        reader, writer = await open_from(port)
        writer.write(upgrade_request())
        assert await status_of(reader) == 101
        idle.append(writer)
    reader, writer = await open_from(port)
    writer.write(upgrade_request())
    assert await status_of(reader) == 503  # a fourth from the same address
    writer.close()
    # Another client is not locked out by the first one's idle sockets.
    reader, writer = await open_from(port, "127.0.0.2")
    writer.write(upgrade_request(token(new_user())))
    assert await status_of(reader) == 101
    assert b'"welcome"' in await reader.readuntil(b'"welcome"')
    assert sockets.pending == 3  # an authenticated socket is no longer pending
    for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
        extra_reader, extra = await open_from(port, source)
        extra.write(upgrade_request())
        expected = 101 if sockets.pending < 5 else 503
        assert await status_of(extra_reader) == expected
        idle.append(extra)
    assert sockets.pending == 5
    refused = server.sample("notifyd_connection_attempts_total", {"outcome": "pending_limit"})
    assert refused == 2
    for idle_writer in idle:
        idle_writer.transport.abort()
    deadline = time.monotonic() + 5
    while sockets.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sockets.pending == 0
    writer.close()


async def test_pings_and_binary_frames_count_against_the_rate_limit(
    make_server: ServerFactory,
) -> None:
    server = await make_server(ws={"rate_limit": 5, "rate_burst": 5, "heartbeat": 0})
    ws, _ = await server.connect(new_user())
    for _ in range(20):
        await ws.ping()
    assert await expect_close(ws) == 4029
    ws, _ = await server.connect(new_user())
    for _ in range(20):
        await ws.send_bytes(b"\x00")
    assert await expect_close(ws) == 4029


async def test_topics_per_socket_are_capped(make_server: ServerFactory) -> None:
    server = await make_server(ws={"max_topics": 3, "heartbeat": 0})
    ws, _ = await server.connect(new_user(), topics=["room.*"])
    for name in ("a", "b", "c"):
        await ws.send_json({"type": "subscribe", "channel": f"topic:room.{name}"})
        assert (await receive_json(ws))["type"] == "subscribed"
    await ws.send_json({"type": "subscribe", "channel": "topic:room.d", "ref": 7})
    answer = await receive_json(ws)
    assert (answer["type"], answer["code"], answer["ref"]) == ("error", "too_many_topics", 7)
    assert server.sample("notifyd_client_errors_total", {"code": "too_many_topics"}) == 1
    await ws.send_json({"type": "unsubscribe", "channel": "topic:room.a"})
    assert (await receive_json(ws))["type"] == "unsubscribed"
    await ws.send_json({"type": "subscribe", "channel": "topic:room.d"})
    assert (await receive_json(ws))["type"] == "subscribed"


async def test_topics_per_user_are_capped_over_all_their_sockets(
    make_server: ServerFactory,
) -> None:
    server = await make_server(ws={"max_topics": 3, "max_topics_per_user": 4, "heartbeat": 0})
    user = new_user()
    first, _ = await server.connect(user, topics=["room.*"])
    second, _ = await server.connect(user, topics=["room.*"])
    for ws, names in ((first, "abc"), (second, "a")):
        for name in names:
            await ws.send_json({"type": "subscribe", "channel": f"topic:room.{name}"})
            assert (await receive_json(ws))["type"] == "subscribed"
    # room.a is shared: the user reads 3 topics. One more is allowed, then none.
    await second.send_json({"type": "subscribe", "channel": "topic:room.d"})
    assert (await receive_json(second))["type"] == "subscribed"
    await second.send_json({"type": "subscribe", "channel": "topic:room.e", "ref": "x"})
    answer = await receive_json(second)
    assert (answer["type"], answer["code"], answer["ref"]) == ("error", "too_many_topics", "x")
    assert "room.e" not in server.gateway.hub.topics_of(user)
    # A topic the user already reads costs nothing more.
    await second.send_json({"type": "subscribe", "channel": "topic:room.b"})
    assert (await receive_json(second))["type"] == "subscribed"
