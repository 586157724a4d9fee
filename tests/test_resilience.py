"""Failure behaviour against a real RabbitMQ: down at start, restarts, cut links, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import aiohttp
import pytest

from notifyd.broker import close_channel, open_connection, scratch_channel
from notifyd.devbroker import RabbitNode

from .conftest import (
    ServerFactory,
    ServerProcess,
    collect_ids,
    expect_close,
    free_port,
    new_user,
    receive_json,
    receive_until,
    token,
)


async def _metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    async with http.get(base + "/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def _publish_reliably(url: str, routing_key: str, ids: list[str]) -> None:
    """Publish with confirms; retry what RabbitMQ did not confirm (same message_id)."""
    pending = list(ids)
    connection: Any = None
    deadline = time.monotonic() + 90
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} messages never confirmed"
        try:
            if connection is None or connection.is_closed:
                # One that cannot be opened (the broker is down) is closed there, not
                # left to its finalizer (an un-awaited close coroutine).
                connection = await open_connection(url)
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange("notifyd")
            batch = pending[:50]
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            json.dumps({"data": i}).encode(), message_id=i, delivery_mode=2
                        ),
                        routing_key,
                    )
                    for i in batch
                )
            )
            del pending[: len(batch)]
        except (TimeoutError, aio_pika.exceptions.AMQPError, OSError, RuntimeError):
            if connection is not None:
                # Closed here, not left to its finalizer (an un-awaited close coroutine).
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)
            connection = None
            await asyncio.sleep(0.3)
    if connection is not None:
        await connection.close()


async def test_broker_down_at_start_serves_not_ready_then_recovers(
    make_server: ServerFactory,
) -> None:
    node = RabbitNode(amqp_port=free_port())
    server = await make_server(wait_ready=False, url=node.amqp_url, amqp={"reconnect_max": 1.0})
    async with server.http.get(server.base + "/healthz") as response:
        assert response.status == 200
    async with server.http.get(server.base + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["broker"] is False
    # Sockets are still served; what needs the broker says so instead of failing silently.
    user = new_user()
    ws, _ = await server.connect(user)
    await ws.send_json({"type": "send", "event": "position", "data": {}, "ref": 1})
    refused = await receive_json(ws)
    assert (refused["type"], refused["code"], refused["ref"]) == ("error", "broker_unavailable", 1)

    await asyncio.to_thread(node.start)
    try:
        await server.wait_ready(timeout=30)
        connection = await aio_pika.connect(node.amqp_url)
        channel = await connection.channel()
        exchange = await channel.get_exchange("notifyd")
        await exchange.publish(aio_pika.Message(b'{"data":"after start"}'), f"user.{user}")
        assert (await receive_until(ws, "notification", timeout=10))["data"] == "after start"
        await connection.close()
    finally:
        await asyncio.to_thread(node.cleanup)


async def test_broker_restart_mid_traffic_delivers_each_exactly_once(
    make_server: ServerFactory, rabbit: RabbitNode
) -> None:
    server = await make_server(amqp={"reconnect_max": 1.0})
    user = new_user()
    ws, _ = await server.connect(user)
    ids = [f"{user}-{n}" for n in range(10_000)]
    publisher = asyncio.create_task(_publish_reliably(rabbit.amqp_url, f"user.{user}", ids))
    while server.gateway.hub.last_seq < 2000 and not publisher.done():
        await asyncio.sleep(0.05)
    await asyncio.to_thread(rabbit.restart)
    await publisher
    received = await collect_ids(ws, len(ids), timeout=60)
    assert len(received) == len(set(received)), "duplicates delivered"
    assert set(received) == set(ids), f"{len(set(ids) - set(received))} lost"
    assert not ws.closed, "the socket must survive the broker restart"
    assert await _metric(server.http, server.base, "notifyd_broker_reconnects_total") >= 1


async def test_replica_link_cut_for_3s_loses_nothing(
    make_server: ServerFactory, rabbit: RabbitNode
) -> None:
    # reconnect_min=3: the replica stays away ~3 s while traffic keeps flowing.
    server = await make_server(amqp={"reconnect_min": 3.0, "reconnect_max": 3.0})
    user = new_user()
    ws, _ = await server.connect(user)
    ids = [f"{user}-{n}" for n in range(600)]

    async def cut_midway() -> None:
        while server.gateway.hub.last_seq < 100:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(rabbit.close_connections, "link cut by test")

    outage = asyncio.create_task(_outage_seconds(server.gateway))
    cutter = asyncio.create_task(cut_midway())
    publisher = asyncio.create_task(_publish_slowly(rabbit.amqp_url, f"user.{user}", ids))
    await cutter
    await publisher
    received = await collect_ids(ws, len(ids), timeout=30)
    # Timed from the gateway itself: rabbitmqctl returns well after the cut happened.
    assert await asyncio.wait_for(outage, 30) >= 2.5
    assert received == ids  # all of them, once, in publish order


async def _outage_seconds(gateway: Any) -> float:
    """How long the gateway is not ready, from when it stops being ready."""
    while gateway.ready:
        await asyncio.sleep(0.01)
    down = time.monotonic()
    while not gateway.ready:
        await asyncio.sleep(0.01)
    return time.monotonic() - down


async def _publish_slowly(url: str, routing_key: str, ids: list[str]) -> None:
    """~200/s through a connection of its own (re-opened if the cut hits it too)."""
    for start in range(0, len(ids), 10):
        await _publish_reliably(url, routing_key, ids[start : start + 10])
        await asyncio.sleep(0.05)


async def test_sigterm_drains_1k_sockets_with_1001_spread_over_the_window(
    processes: Callable[..., ServerProcess],
) -> None:
    server = processes(NOTIFYD_SERVER_DRAIN_SECONDS="2", NOTIFYD_WS_HEARTBEAT="0")
    await server.wait()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        sockets = await asyncio.gather(
            *(
                http.ws_connect(
                    server.ws_url, headers={"Authorization": f"Bearer {token(new_user())}"}
                )
                for _ in range(1000)
            )
        )
        for ws in sockets:
            assert (await receive_json(ws, timeout=15))["type"] == "welcome"
        closed_at: list[float] = []

        async def watch(ws: aiohttp.ClientWebSocketResponse) -> int:
            code = await expect_close(ws, timeout=25)
            closed_at.append(time.monotonic())
            return code

        watchers = [asyncio.create_task(watch(ws)) for ws in sockets]
        sent_at = time.monotonic()
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        # Readiness fails at once, while the listener still answers.
        async with http.get(server.base + "/readyz") as response:
            assert response.status == 503
            assert (await response.json())["draining"] is True
        codes = await asyncio.gather(*watchers)
        assert set(codes) == {1001}
        code = await asyncio.to_thread(server.process.wait, 30)
    assert code == 0, server.log()
    spread = max(closed_at) - min(closed_at)
    assert 1.0 <= spread <= 4.0, spread
    assert time.monotonic() - sent_at < 30


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_cleanly_without_sockets(
    processes: Callable[..., ServerProcess], sig: int
) -> None:
    server = processes()
    await server.wait()
    code, seconds = await asyncio.to_thread(server.stop, sig)
    assert code == 0, server.log()
    assert seconds < 10


async def test_two_processes_share_rabbitmq_and_split_the_traffic(
    processes: Callable[..., ServerProcess], amqp_url: str
) -> None:
    replica_a, replica_b = processes(), processes()
    await asyncio.gather(replica_a.wait(), replica_b.wait())
    alice = new_user("alice")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            replica_a.ws_url, headers={"Authorization": f"Bearer {token(alice)}"}
        )
        assert (await receive_json(ws))["type"] == "welcome"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "notifyd", "publish", "--user", alice, "--data", '{"n": 1}',
            "--event", "ping", "--amqp-url", amqp_url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        assert process.returncode == 0
        message = await receive_until(ws, "notification")
        assert (message["id"], message["data"]) == (out.decode().strip(), {"n": 1})
        user_kind = 'notifyd_notifications_received_total{kind="user"}'
        assert await _metric(http, replica_a.base, user_kind) == 1
        assert await _metric(http, replica_b.base, user_kind) == 0


async def test_a_channel_closed_mid_consume_leaves_its_connection_working(amqp_url: str) -> None:
    """aiormq stops reading a channel it closes but keeps it registered until
    RabbitMQ's Close-Ok; a stream read cancelled mid-consume used to fill that
    channel's buffer with late deliveries and stop every channel of the connection
    (a replica hung at shutdown). close_channel discards them."""
    connection = await aio_pika.connect(amqp_url)
    try:
        stream = f"test.stream.{uuid.uuid4().hex[:8]}"
        async with scratch_channel(connection, publisher_confirms=True) as channel:
            await channel.declare_queue(stream, durable=True, arguments={"x-queue-type": "stream"})
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(aio_pika.Message(b"x" * 64), stream)
                    for _ in range(300)
                )
            )

        async def ignore(_: object) -> None:
            pass

        for attempt in range(30):
            channel = await connection.channel(publisher_confirms=False)
            raw = await channel.get_underlay_channel()
            await raw.basic_qos(prefetch_count=1000)
            consume = asyncio.ensure_future(
                raw.basic_consume(stream, ignore, arguments={"x-stream-offset": "first"})
            )
            # Cancelled at different points of the Consume round trip.
            for _ in range(attempt % 6):
                await asyncio.sleep(0)
            if attempt % 6 == 5:
                await asyncio.sleep(0.002)
            consume.cancel()
            await asyncio.gather(consume, return_exceptions=True)
            await asyncio.wait_for(close_channel(channel), 10)
            async with scratch_channel(connection) as probe:
                await asyncio.wait_for(probe.declare_queue(stream, passive=True), 5)
        async with scratch_channel(connection) as channel:
            await channel.queue_delete(stream)
    finally:
        await connection.close()
