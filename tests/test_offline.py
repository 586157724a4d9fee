"""The offline hook (issue 16, part 1): what no replica holds goes to ``notifyd.offline``.

Against the real RabbitMQ node, two replicas where it matters: routing through
``notifyd`` → ``notifyd.route`` (alternate exchange ``notifyd.unrouted``), one replica
at a time sending on ``notifyd.unrouted``, the linger split with in-memory history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aio_pika
import aiormq
import pytest

from notifyd.amqp import (
    EXCHANGE,
    OFFLINE_EXCHANGE,
    OFFLINE_HEADER,
    OFFLINE_QUEUE,
    RECEIPTS_EXCHANGE,
    ROUTE_EXCHANGE,
    UNROUTED_QUEUE,
)
from notifyd.hub import Hub

from .conftest import (
    AmqpPublisher,
    ServerFactory,
    ServerProcess,
    expect_silence,
    new_user,
    receive_until,
)
from .test_hub import FakeBindings, FakeSocket

# --- helpers ---------------------------------------------------------------------------


@dataclass
class Watch:
    """Messages arriving on an exchange for some routing keys, with when they arrived."""

    messages: asyncio.Queue[tuple[float, aio_pika.abc.AbstractIncomingMessage]] = field(
        default_factory=asyncio.Queue
    )

    async def next(self, timeout: float = 5) -> aio_pika.abc.AbstractIncomingMessage:
        return (await asyncio.wait_for(self.messages.get(), timeout))[1]

    async def timed(self, timeout: float = 5) -> tuple[float, aio_pika.abc.AbstractIncomingMessage]:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def silent(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self.messages.empty(), [m.body for _, m in self.messages._queue]  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def watch(url: str, exchange: str, *keys: str) -> AsyncIterator[Watch]:
    """A private queue bound to ``exchange`` with ``keys`` (the exchange declared as the
    gateway declares it, so that the watch may start first)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        target = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in keys:
            await queue.bind(target, key)
        seen = Watch()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            seen.messages.put_nowait((time.monotonic(), message))

        await queue.consume(on_message)
        yield seen
    finally:
        await connection.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- the hub's linger split (no I/O) ---------------------------------------------------


async def test_a_key_moves_to_the_history_binding_after_the_grace() -> None:
    route, history = FakeBindings(), FakeBindings()
    hub = Hub(route, linger=0.05, retain=0.2, retained=history)
    socket = FakeSocket("u")
    hub.add(socket)
    hub.remove(socket)
    await asyncio.sleep(0.09)
    assert route.calls == [("want", "user.u"), ("release", "user.u")]
    assert history.calls == [("want", "user.u")]
    hub.add(FakeSocket("u"))  # back within the retention window: bound for routing again
    assert route.calls[-1] == ("want", "user.u")
    await asyncio.sleep(0.2)
    assert history.calls == [("want", "user.u"), ("release", "user.u")]
    hub.close()


async def test_without_a_longer_retention_there_is_no_history_binding() -> None:
    route, history = FakeBindings(), FakeBindings()
    hub = Hub(route, linger=0.05, retain=0.05, retained=history)
    socket = FakeSocket("u")
    hub.add(socket)
    hub.remove(socket)
    await asyncio.sleep(0.09)
    assert route.calls == [("want", "user.u"), ("release", "user.u")]
    assert history.calls == []


async def test_with_no_grace_the_history_binding_is_wanted_at_once() -> None:
    route, history = FakeBindings(), FakeBindings()
    hub = Hub(route, linger=0, retain=0.05, retained=history)
    socket = FakeSocket("u")
    hub.add(socket)
    hub.remove(socket)
    assert history.calls == [("want", "user.u")]
    await asyncio.sleep(0.08)
    assert history.calls == [("want", "user.u"), ("release", "user.u")]


# --- against RabbitMQ ------------------------------------------------------------------


async def test_an_offline_users_notification_goes_to_notifyd_offline_once(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    replica_a, replica_b = await make_server(), await make_server()
    user = new_user("away")
    message_id = f"{user}-1"
    async with watch(amqp_url, OFFLINE_EXCHANGE, f"user.{user}") as seen:
        started = time.monotonic()
        await amqp.send(
            f"user.{user}",
            {"event": "order.shipped", "data": {"order": 1}},
            message_id=message_id,
            headers={"x-k": "v", "notifyd-published-ms": int(time.time() * 1000)},
            content_type="application/json",
            expiration=60,
        )
        arrived, message = await seen.timed(5)
        latency = arrived - started
        print(f"offline hook latency: {latency * 1000:.1f} ms")
        assert latency < 5
        assert message.routing_key == f"user.{user}"
        assert message.exchange == OFFLINE_EXCHANGE
        assert json.loads(message.body) == {"event": "order.shipped", "data": {"order": 1}}
        assert message.message_id == message_id
        assert message.content_type == "application/json"
        assert message.expiration == 60  # as published (aio-pika reads the ms in seconds)
        headers = message.headers
        assert headers[OFFLINE_HEADER] is True and headers["x-k"] == "v"
        assert "notifyd-published-ms" in headers
        await seen.silent(1.0)  # once, though two replicas are running
    for replica in (replica_a, replica_b):
        assert f"user.{user}" not in replica.gateway.broker.bindings.bound


async def test_the_default_queue_keeps_it(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    await make_server()
    user = new_user("away")
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(OFFLINE_QUEUE, passive=True)
        # The queue is shared by the whole session: what earlier tests left there
        # could take longer than the deadline to read past.
        await queue.purge()
        await amqp.send(f"user.{user}", {"data": 1}, message_id=f"{user}-q")
        found = None
        deadline = time.monotonic() + 5
        while found is None and time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            elif message.message_id == f"{user}-q":
                found = message
        assert found is not None and found.headers[OFFLINE_HEADER] is True
    finally:
        await connection.close()


async def test_a_deleted_offline_queue_is_declared_again(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    server = await make_server()
    await wait_for(lambda: server.gateway.offline.consuming)
    user = new_user("away")
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(OFFLINE_QUEUE)
        # Returned for want of a queue: handed back, the queue declared again, sent.
        await amqp.send(f"user.{user}", {"data": 1}, message_id=f"{user}-again")
        deadline = time.monotonic() + 10
        found = None
        while found is None and time.monotonic() < deadline:
            try:
                queue = await channel.declare_queue(OFFLINE_QUEUE, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()
                await asyncio.sleep(0.1)
                continue
            try:
                message = await queue.get(no_ack=True, fail=False)
            except aiormq.exceptions.ConnectionInternalError:
                # Declared again a moment ago, the quorum queue may have no process yet:
                # RabbitMQ then closes the whole connection over a get (541 noproc).
                with contextlib.suppress(Exception):
                    await connection.close()
                connection = await aio_pika.connect(amqp_url)
                channel = await connection.channel()
                await asyncio.sleep(0.1)
                continue
            if message is None:
                await asyncio.sleep(0.1)
            elif message.message_id == f"{user}-again":
                found = message
        assert found is not None
    finally:
        await connection.close()


async def test_a_user_online_on_either_replica_never_produces_one(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    replica_a, replica_b = await make_server(), await make_server()
    alice, bob = new_user("alice"), new_user("bob")
    ws_alice, _ = await replica_a.connect(alice)
    ws_bob, _ = await replica_b.connect(bob)
    async with watch(amqp_url, OFFLINE_EXCHANGE, f"user.{alice}", f"user.{bob}") as seen:
        for n in range(5):
            await amqp.send(f"user.{alice}", {"data": n})
            await amqp.send(f"user.{bob}", {"data": n})
        for n in range(5):
            assert (await receive_until(ws_alice, "notification"))["data"] == n
            assert (await receive_until(ws_bob, "notification"))["data"] == n
        await seen.silent(1.0)


async def test_a_user_who_left_is_offline_once_the_grace_is_over(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    settings = {"ws": {"binding_grace": 1.0}, "history": {"backend": "off"}}
    replica_a, _ = await make_server(**settings), await make_server(**settings)
    user = new_user()
    key = f"user.{user}"
    async with watch(amqp_url, OFFLINE_EXCHANGE, key) as seen:
        ws, _ = await replica_a.connect(user)
        await ws.close()
        await asyncio.sleep(0.2)
        await amqp.send(key, {"data": "during the grace"}, message_id=f"{user}-grace")
        await seen.silent(0.5)
        await wait_for(lambda: key not in replica_a.gateway.broker.bindings.bound, 3)
        left = time.monotonic()
        await amqp.send(key, {"data": "after"}, message_id=f"{user}-after")
        message = await seen.next(5)
        assert message.message_id == f"{user}-after"
        print(f"offline {time.monotonic() - left:.2f}s after the binding went")
        await seen.silent(0.5)


async def test_with_memory_history_a_user_is_offline_after_the_grace_and_resumes(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    """The key leaves notifyd.route after binding_grace, but stays bound on notifyd for
    the history's window: offline notifications go to notifyd.offline AND into this
    replica's history, so a resume here still replays them."""
    settings = {"ws": {"binding_grace": 1.0}, "history": {"backend": "memory", "max_age": 600}}
    replica_a, _ = await make_server(**settings), await make_server(**settings)
    user = new_user()
    key = f"user.{user}"
    broker = replica_a.gateway.broker
    async with watch(amqp_url, OFFLINE_EXCHANGE, key) as seen:
        ws, _ = await replica_a.connect(user)
        await amqp.send(key, {"data": 0}, message_id=f"{user}-0")
        last = await receive_until(ws, "notification")
        await ws.close()
        await wait_for(lambda: key not in broker.bindings.bound, 3)
        await wait_for(lambda: key in broker.history_bindings.bound, 1)
        for n in (1, 2):
            await amqp.send(key, {"data": n}, message_id=f"{user}-{n}")
        got = [(await seen.next(5)).message_id for _ in range(2)]
        assert got == [f"{user}-1", f"{user}-2"]
        await seen.silent(0.3)
        # Back on the same replica: resumed from its history.
        ws, welcome = await replica_a.connect(user, since=last["id"])
        assert welcome["resumed"] is True
        replayed = [(await receive_until(ws, "notification"))["data"] for _ in range(2)]
        assert replayed == [1, 2]
        assert key in broker.bindings.bound
        await amqp.send(key, {"data": 3}, message_id=f"{user}-3")
        assert (await receive_until(ws, "notification"))["data"] == 3
        await seen.silent(0.5)  # online again: none
        await ws.close()


async def test_topics_and_broadcasts_nobody_holds_never_produce_one(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    await make_server()
    room = f"room{new_user()}"
    async with watch(amqp_url, OFFLINE_EXCHANGE, f"topic.{room}", "broadcast") as seen:
        await amqp.send(f"topic.{room}", {"data": 1})
        await amqp.send("broadcast", {"data": 2})
        await seen.silent(1.0)


async def test_a_receipt_for_an_offline_user_says_online_false(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    replica_a, replica_b = await make_server(), await make_server()
    replicas = {replica_a.gateway.broker.replica_id, replica_b.gateway.broker.replica_id}
    user = new_user()
    async with watch(amqp_url, RECEIPTS_EXCHANGE, f"user.{user}") as receipts:
        await amqp.send(
            f"user.{user}", {"data": 1}, message_id=f"{user}-r", headers={"notifyd-receipt": True}
        )
        receipt = json.loads((await receipts.next(5)).body)
        assert receipt["id"] == f"{user}-r" and receipt["channel"] == f"user:{user}"
        assert (receipt["delivered"], receipt["online"]) == (0, False)
        assert receipt["replica"] in replicas
        await receipts.silent(0.5)  # one, from the replica that sent it on


async def test_old_replicas_bound_on_notifyd_still_get_their_traffic(
    make_server: ServerFactory, amqp_url: str, amqp: AmqpPublisher
) -> None:
    """A rolling upgrade: an older replica binds on notifyd itself and still gets what
    it holds; a newer replica's queue gets it once, through notifyd.route."""
    server = await make_server()
    user = new_user()
    async with watch(amqp_url, EXCHANGE, f"user.{user}") as old_replica:
        ws, _ = await server.connect(user)
        await amqp.send(f"user.{user}", {"data": 1}, message_id=f"{user}-u")
        assert (await old_replica.next()).message_id == f"{user}-u"
        assert (await receive_until(ws, "notification"))["data"] == 1
        await expect_silence(ws, 0.3)


async def test_topology(make_server: ServerFactory, amqp_url: str) -> None:
    await make_server()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.get_exchange(ROUTE_EXCHANGE)  # passive: exists
        deadline = time.monotonic() + 5
        while True:  # the hook starts in the background once the replica is connected
            queue = await channel.declare_queue(UNROUTED_QUEUE, passive=True)
            if queue.declaration_result.consumer_count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert queue.declaration_result.consumer_count == 1
        # Internal: nothing publishes to notifyd.route but notifyd.
        confirming = await connection.channel(publisher_confirms=True)
        exchange = await confirming.get_exchange(ROUTE_EXCHANGE, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await exchange.publish(aio_pika.Message(b"{}"), "broadcast")
    finally:
        await connection.close()


# --- one replica at a time, and the next one takes over ---------------------------------


async def test_when_the_active_replica_dies_another_takes_over_losing_nothing(
    processes: Callable[..., ServerProcess], amqp_url: str, amqp: AmqpPublisher
) -> None:
    first = processes(NOTIFYD_AMQP_REPLICA_ID=f"first-{uuid.uuid4().hex[:6]}")
    await first.wait()
    second = processes(NOTIFYD_AMQP_REPLICA_ID=f"second-{uuid.uuid4().hex[:6]}")
    await second.wait()
    first_id, second_id = (
        first.env["NOTIFYD_AMQP_REPLICA_ID"],
        second.env["NOTIFYD_AMQP_REPLICA_ID"],
    )
    users = [new_user("gone") for _ in range(4)]
    keys = [f"user.{u}" for u in users]
    async with (
        watch(amqp_url, OFFLINE_EXCHANGE, *keys) as seen,
        watch(amqp_url, RECEIPTS_EXCHANGE, *keys) as receipts,
    ):
        # The first replica to consume notifyd.unrouted is the active one.
        await amqp.send(
            keys[0], {"data": -1}, message_id="probe", headers={"notifyd-receipt": True}
        )
        assert json.loads((await receipts.next(5)).body)["replica"] == first_id
        assert (await seen.next()).message_id == "probe"
        sent: list[str] = []
        killed = False
        for n in range(300):
            message_id = f"{users[n % 4]}-{n}"
            await amqp.send(keys[n % 4], {"data": n}, message_id=message_id)
            sent.append(message_id)
            if n == 150:
                first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
                killed = True
            await asyncio.sleep(0.005)
        assert killed
        got: list[str] = []
        deadline = time.monotonic() + 15
        while set(got) != set(sent) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                got.append((await seen.next(1)).message_id or "")
        missing = set(sent) - set(got)
        assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:5]}"
        duplicates = len(got) - len(set(got))
        print(f"after SIGKILL of the active replica: {duplicates} sent twice (same message_id)")
        assert duplicates <= 200  # at most what was unacknowledged (prefetch)
        await amqp.send(
            keys[1], {"data": 1}, message_id="probe2", headers={"notifyd-receipt": True}
        )
        receipt = json.loads((await receipts.next(5)).body)
        while receipt["id"] != "probe2":
            receipt = json.loads((await receipts.next(5)).body)
        assert receipt["replica"] == second_id
    second.stop()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_the_offline_queues_are_bounded_unless_told_not_to_be(queue_type: str) -> None:
    from notifyd.broker import offline_queue_arguments, unrouted_queue_arguments
    from notifyd.config import AmqpSettings

    bounded = AmqpSettings(queue_type=queue_type, offline_max_length=5)
    for arguments in (offline_queue_arguments(bounded), unrouted_queue_arguments(bounded)):
        assert arguments["x-max-length"] == 5
        assert ("x-queue-type" in arguments) == (queue_type == "quorum")
    assert unrouted_queue_arguments(bounded)["x-single-active-consumer"] is True
    unbounded = AmqpSettings(queue_type=queue_type, offline_max_length=0)
    assert "x-max-length" not in offline_queue_arguments(unbounded)
    assert "x-max-length" not in unrouted_queue_arguments(unbounded)
