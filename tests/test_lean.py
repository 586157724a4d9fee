"""A closed socket of every kind is freed by reference counting: no cyclic garbage.

The collector policy freezes long-lived objects and never runs a full collection
after churn, so anything a closed socket left in a reference cycle would stay in
memory for good. Here every way a socket can end is exercised with the cycle
collector off; afterwards no server-side object of those sockets may remain, and
a collection must find none of them in its garbage either.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from notifyd.connection import PARSE_BATCH, Connection, _FirstBytes
from notifyd.protocol import Channel, Notification
from notifyd.websocket import text_frame

from .conftest import (
    Server,
    ServerFactory,
    expect_close,
    new_user,
    raw_upgrade,
    receive_json,
    token,
)

REPEAT = 8
#: Where a socket's own code runs (frames of other modules are not a socket's).
SOCKET_MODULES = ("connection", "session", "websocket", "hub", "heartbeat", "auth")


def server_side(obj: object) -> str | None:
    """What a server-side socket's object is, or None for anything else."""
    if isinstance(obj, Connection | RequestHandler | BaseRequest | _FirstBytes):
        return type(obj).__name__
    if isinstance(obj, asyncio.Transport) and getattr(obj, "_server", None) is not None:
        return "server transport"
    if type(obj).__name__ in ("coroutine", "frame") and any(
        f"notifyd/{module}.py" in repr(obj) for module in SOCKET_MODULES
    ):
        return type(obj).__name__
    return None


def server_objects() -> Counter[str]:
    """Objects of server-side sockets the cycle collector can see, by type."""
    return Counter(kind for obj in gc.get_objects() if (kind := server_side(obj)) is not None)


class RawClient:
    """A socket that says and reads exactly what it is told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls,
        port: int,
        headers: str = "",
        version: int = 13,
        receive_buffer: int | None = None,
    ) -> RawClient:
        reader, writer = await raw_upgrade(port, None, receive_buffer, headers, version)
        return cls(reader, writer)

    async def status(self) -> int:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        return int(head.split(b" ", 2)[1])

    def drop(self) -> None:
        self.writer.transport.abort()

    async def until_closed(self, timeout: float = 5) -> None:
        """Read (and discard) until the server closes the connection."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass
        self.writer.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def normal_close(server: Server) -> None:
    ws, _ = await server.connect(new_user())
    await ws.close()


async def client_drop(server: Server) -> None:
    client = await RawClient.open(server.port, f"Authorization: Bearer {token(new_user())}\r\n")
    assert await client.status() == 101
    await client.reader.readuntil(b'"welcome"')
    client.drop()


async def never_authenticated(server: Server) -> None:
    client = await RawClient.open(server.port)
    assert await client.status() == 101
    client.drop()


async def held_in_a_burst(server: Server) -> None:
    # Eight of these at once send more upgrade requests in one pass than are parsed
    # per pass: some wait their turn with reading paused (SocketServer.pace_requests).
    clients = await asyncio.gather(
        *(RawClient.open(server.port) for _ in range(PARSE_BATCH // 2 + 1))
    )
    assert [await client.status() for client in clients] == [101] * len(clients)
    for client in clients:
        client.drop()


async def upgrade_refused(server: Server) -> None:
    client = await RawClient.open(server.port, version=8)
    assert await client.status() == 426
    client.drop()


async def unauthorized(server: Server) -> None:
    ws = await server.ws("not-a-token")
    assert await expect_close(ws) == 4001


async def auth_timeout(server: Server) -> None:
    ws = await server.ws()
    assert await expect_close(ws) == 4008


async def per_user_limit(server: Server) -> None:
    user = new_user()
    held, _ = await server.connect(user)
    ws = await server.ws(token(user))
    assert await expect_close(ws) == 4003
    await held.close()


async def rate_limited(server: Server) -> None:
    ws, _ = await server.connect(new_user())
    for _ in range(30):
        await ws.send_json({"type": "ping"})
    assert await expect_close(ws) == 4029


async def too_big(server: Server) -> None:
    ws, _ = await server.connect(new_user())
    await ws.send_str(json.dumps({"type": "ping", "pad": "x" * 5000}))
    assert await expect_close(ws) == 1009


async def protocol_error(server: Server) -> None:
    ws, _ = await server.connect(new_user())
    await ws._writer.send_frame(b"x", 0x3)  # a reserved opcode
    assert await expect_close(ws) == 1002


async def token_expired(server: Server) -> None:
    ws, _ = await server.connect(new_user(), ttl=2)
    assert (await receive_json(ws))["type"] == "refresh_required"
    assert await expect_close(ws) == 4010


async def slow_consumer(server: Server) -> None:
    user = new_user()
    client = await RawClient.open(
        server.port,
        f"Authorization: Bearer {token(user)}\r\n",
        receive_buffer=4096,
    )
    assert await client.status() == 101
    await client.reader.readuntil(b'"welcome"')
    frame = text_frame(b'{"type":"notification","data":"' + b"y" * 30_000 + b'"}')
    notification = Notification("n", Channel("user", user), frame, 0)
    hub = server.gateway.hub
    for _ in range(2000):
        if not hub.connections_of(user):
            break  # closing with 4009
        hub.deliver(notification)
        await asyncio.sleep(0.001)
    assert not hub.connections_of(user)
    client.drop()


async def heartbeat_cut_off(server: Server) -> None:
    client = await RawClient.open(server.port, f"Authorization: Bearer {token(new_user())}\r\n")
    assert await client.status() == 101
    await client.until_closed()  # reads the pings, never answers them


KINDS: list[Callable[[Server], Awaitable[None]]] = [
    normal_close,
    client_drop,
    never_authenticated,
    held_in_a_burst,
    upgrade_refused,
    unauthorized,
    auth_timeout,
    per_user_limit,
    rate_limited,
    too_big,
    protocol_error,
    token_expired,
    slow_consumer,
    heartbeat_cut_off,
]


@pytest.fixture
async def collector_off() -> AsyncIterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_every_kind_of_closed_socket_is_freed_by_reference_counting(
    make_server: ServerFactory, collector_off: None
) -> None:
    server = await make_server(
        ws={
            "max_message_size": 4096,
            "rate_limit": 5,
            "rate_burst": 10,
            "max_connections_per_user": 1,
            "send_buffer_bytes": 64 * 1024,
            "heartbeat": 0.3,
            "refresh_before": 0.5,
        },
        auth={"auth_timeout": 0.3, "leeway": 0},
    )
    sockets = server.gateway.sockets
    before = server_objects()
    for kind in KINDS:
        await asyncio.gather(*(kind(server) for _ in range(REPEAT)))
    # The drain closes whatever is open with 1001.
    drained = [(await server.connect(new_user()))[0] for _ in range(REPEAT)]
    # Reading at once: the client answers the heartbeat's pings only while it reads.
    codes = asyncio.gather(*(expect_close(ws) for ws in drained))
    await sockets.drain(0.1)
    assert await codes == [1001] * REPEAT
    for ws in drained:
        await ws.close()
    await wait_until(lambda: not sockets.connections and not len(server.gateway.hub))
    await asyncio.sleep(0.3)  # aiohttp's handler tasks end, transports call connection_lost

    left = server_objects() - before
    assert not left, f"closed sockets not freed by reference counting: {left}"
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    garbage = Counter(repr(obj)[:120] for obj in gc.garbage if server_side(obj) is not None)
    assert not garbage, f"cyclic garbage left by closed sockets: {garbage}"


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):  # noqa: SIM115
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_waves_of_sockets_that_never_authenticate_leave_rss_flat(
    processes: Callable[..., Any],
) -> None:
    """Three waves of sockets with large headers that never authenticate, in a real
    ``notifyd serve``: memory after the last wave is where it was after the first."""
    server = processes(NOTIFYD_AUTH_AUTH_TIMEOUT="0.5", NOTIFYD_WS_MAX_PENDING_PER_ADDRESS="0")
    await server.wait()
    assert server.process is not None
    headers = "".join(f"X-Pad-{i}: {'p' * 3000}\r\n" for i in range(5))
    after_wave = []
    for _ in range(3):
        clients = await asyncio.gather(*(RawClient.open(server.port, headers) for _ in range(150)))
        assert [await c.status() for c in clients] == [101] * 150
        await asyncio.gather(*(c.until_closed(5) for c in clients))  # 4008 after 0.5 s
        await asyncio.sleep(1.0)
        after_wave.append(rss_mib(server.process.pid))
    assert after_wave[2] - after_wave[0] < 8, after_wave
