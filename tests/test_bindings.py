"""Batched writes to RabbitMQ and the pacing of what a batch of bindings wakes.

:class:`notifyd.broker.BindingTable` without a broker; :func:`notifyd.broker.send_frames`
and :func:`notifyd.broker.call_frames`, with frames from :mod:`notifyd.frames`, against
a real RabbitMQ node.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pika
import pytest
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp import frame
from pamqp.commands import Queue

from notifyd import frames
from notifyd.amqp import EXCHANGE, PUBLISHED_AT_HEADER
from notifyd.broker import (
    _UNBIND_BATCH,
    WAKE_BATCH,
    BindingTable,
    Broker,
    call_frames,
    channel_number,
    max_content_size,
    send_frames,
)

from .conftest import settings_for


async def test_a_batch_of_bindings_wakes_its_waiters_a_few_per_pass() -> None:
    """Thousands of sockets waiting for their binding (a connect storm) would all run
    in the pass that RabbitMQ's confirm arrives in; they are woken WAKE_BATCH a pass,
    in the order they started waiting, and every one of them is woken."""
    table = BindingTable(always=())
    keys = [f"user.{i}" for i in range(5 * WAKE_BATCH + 3)]
    for key in keys:
        table.want(key)
    woken: list[str] = []

    async def wait(key: str) -> None:
        assert await table.wait_bound(key, timeout=5)
        woken.append(key)

    waiters = [asyncio.create_task(wait(key)) for key in keys]
    await asyncio.sleep(0)  # every waiter is waiting
    table.applied(keys, [])
    seen = []
    while len(woken) < len(keys):
        await asyncio.sleep(0)
        seen.append(len(woken))
    # One batch per pass (each waiter steps in the pass after its wake-up).
    assert all(b - a <= WAKE_BATCH for a, b in zip([0, *seen], seen, strict=False))
    assert len([n for n in seen if n]) >= len(keys) // WAKE_BATCH
    assert woken == keys
    await asyncio.gather(*waiters)


def test_a_key_wanted_again_while_its_unbind_is_under_way_is_bound_anew() -> None:
    """A user back while the unbind of their key is on its way to RabbitMQ: their
    socket must not count as routable (the unbind would take the binding away after
    its welcome), and the key is bound again once the unbind is confirmed."""
    table = BindingTable(always=())
    table.want("user.a")
    table.applied(*table.pending())
    assert table.is_bound("user.a")
    table.release("user.a")
    to_bind, to_unbind = table.pending()
    assert (to_bind, to_unbind) == ([], ["user.a"])
    table.want("user.a")  # back during the unbind
    assert not table.is_bound("user.a")
    assert table.pending() == ([], [])  # no bind before the unbind is confirmed
    table.applied([], to_unbind)
    assert not table.is_bound("user.a")
    assert table.pending() == (["user.a"], [])
    table.applied(["user.a"], [])
    assert table.is_bound("user.a")
    assert table.pending() == ([], [])


def test_a_key_released_while_its_bind_is_under_way_is_unbound_after() -> None:
    """A user gone before RabbitMQ confirmed their bind: once it is confirmed, the key
    is unbound (not left bound for a user who is not here)."""
    table = BindingTable(always=())
    table.want("user.a")
    to_bind, to_unbind = table.pending()
    assert (to_bind, to_unbind) == (["user.a"], [])
    table.release("user.a")  # gone during the bind
    assert table.pending() == ([], [])
    table.applied(to_bind, [])
    assert not table.is_bound("user.a")
    assert table.pending() == ([], ["user.a"])


def test_a_disconnect_wave_is_unbound_in_batches_with_new_binds_first() -> None:
    """Thousands of keys to unbind and a few new ones to bind: every batch carries the
    binds that came, each key is handed out once, and all are unbound in the end."""
    table = BindingTable(always=())
    left = [f"user.left-{i}" for i in range(5 * _UNBIND_BATCH + 7)]
    for key in left:
        table.want(key)
    while batch := table.pending()[0]:
        table.applied(batch, [])
    for key in left:
        table.release(key)
    handed: list[str] = []
    arrived: list[str] = []
    while True:
        to_bind, to_unbind = table.pending()
        if not (to_bind or to_unbind):
            break
        assert len(to_unbind) <= _UNBIND_BATCH
        assert to_bind == arrived[-1:]  # the one that came since the last batch
        handed.extend(to_unbind)
        table.applied(to_bind, to_unbind)
        if to_unbind:
            arrived.append(f"user.new-{len(arrived)}")
            table.want(arrived[-1])
    assert sorted(handed) == sorted(left)
    assert table.bound == set(arrived)


async def test_new_users_are_bound_before_the_unbinds_of_those_who_left(amqp_url: str) -> None:
    """A reconnect wave on a real RabbitMQ: the keys of users who left are unbound
    (a round trip each) while new users arrive. A new user's bind is confirmed, and
    their socket woken, before the first batch of unbinds is through; then every
    unbind is done."""
    broker = Broker(settings_for(amqp_url).amqp, lambda _: None, lambda _: None)
    runner = asyncio.create_task(broker.run())
    try:
        await asyncio.wait_for(broker.connected.wait(), 10)
        table = broker.bindings
        tag = uuid.uuid4().hex[:8]
        left = {f"user.left-{tag}-{i}" for i in range(3 * _UNBIND_BATCH)}
        for key in left:
            table.want(key)
        for key in left:
            assert await table.wait_bound(key, 10)
        for key in left:
            table.release(key)
        arrived = f"user.new-{tag}"
        table.want(arrived)
        assert await table.wait_bound(arrived, 10)
        assert len(table.bound & left) > len(left) - _UNBIND_BATCH
        for _ in range(500):
            if not table.bound & left:
                break
            await asyncio.sleep(0.02)
        assert not table.bound & left and not table.unbinding
        assert table.is_bound(arrived)
    finally:
        await broker.close()
        await runner


def publish_until(url: str, routing_keys: list[str], stop: threading.Event) -> tuple[int, str]:
    """Publish with confirms (pika's blocking client, as a backend would) to each of
    ``routing_keys`` in turn until ``stop``: how many were confirmed, and the error
    that ended it early ('' if none)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    published = 0
    try:
        while not stop.is_set():
            for key in routing_keys:
                channel.basic_publish(EXCHANGE, key, b'{"data": 1}')
                published += 1
    except pika.exceptions.AMQPError as exc:
        return published, repr(exc)
    connection.close()
    return published, ""


async def test_a_replica_going_away_does_not_cut_off_the_publishers_of_its_users(
    amqp_url: str,
) -> None:
    """A backend publishing with confirms to a replica's user and to ``broadcast``
    while the replica shuts down keeps its connection. RabbitMQ 3.10 closes it (541
    INTERNAL_ERROR) when a message is routed to a quorum queue as it is deleted; the
    replica unbinds every key before it deletes its queue."""
    broker = Broker(settings_for(amqp_url).amqp, lambda _: None, lambda _: None)
    runner = asyncio.create_task(broker.run())
    stop = threading.Event()
    user_key = f"user.leaving-{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.wait_for(broker.connected.wait(), 10)
        broker.bindings.want(user_key)
        assert await broker.bindings.wait_bound(user_key, 10)
        publishing = asyncio.ensure_future(
            asyncio.to_thread(publish_until, amqp_url, [user_key, "broadcast"], stop)
        )
        await asyncio.sleep(0.3)
    finally:
        await broker.close()
        await runner
        await asyncio.sleep(0.3)  # publishing on after the queue is gone
        stop.set()  # whatever happened: the thread must end for the run to end
    published, error = await asyncio.wait_for(publishing, 10)
    assert error == ""
    assert published > 10
    assert not broker.bindings.bound and not broker.history_bindings.bound


async def test_a_batch_of_publishes_arrives_whole_and_in_order(amqp_url: str) -> None:
    """Many publishes in one write: every message, in order, bodies intact (one of
    them larger than a frame, so split into several body frames)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        queue = f"test.frames.{uuid.uuid4().hex}"
        await raw.queue_declare(queue, exclusive=True)
        frame_max = raw.connection.connection_tune.frame_max
        bodies = [f"message {i}".encode() for i in range(40)]
        bodies[17] = b"x" * (3 * frame_max + 5)
        number, size = channel_number(raw), max_content_size(raw)
        payload = b"".join(
            frames.publish(
                number, "", queue, body, message_id=str(i), published_ms=i, max_content_size=size
            )
            for i, body in enumerate(bodies)
        )
        await send_frames(raw, payload)
        received: list[tuple[object, ...]] = []
        done = asyncio.get_running_loop().create_future()

        def on_message(message: DeliveredMessage) -> None:
            properties = message.header.properties
            received.append(
                (
                    properties.message_id,
                    properties.content_type,
                    properties.delivery_mode,
                    properties.headers,
                    message.body,
                )
            )
            if len(received) == len(bodies) and not done.done():
                done.set_result(None)

        await raw.basic_consume(queue, on_message, no_ack=True)  # type: ignore[arg-type]
        await asyncio.wait_for(done, 10)
        assert received == [
            (str(i), "application/json", 1, {PUBLISHED_AT_HEADER: i}, body)
            for i, body in enumerate(bodies)
        ]
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def exchange_and_queue(amqp_url: str) -> AsyncIterator[tuple[RawChannel, str, str]]:
    """A channel without confirms, a direct exchange and an exclusive queue of the test's
    own (its connection closed after)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        exchange, queue = f"test.x.{uuid.uuid4().hex}", f"test.q.{uuid.uuid4().hex}"
        await raw.exchange_declare(exchange, exchange_type="direct", auto_delete=True)
        await raw.queue_declare(queue, exclusive=True)
        yield raw, exchange, queue
    finally:
        await connection.close()


async def test_batched_binds_are_in_effect_after_a_barrier(amqp_url: str) -> None:
    """``nowait`` binds written together, then one synchronous call: every bind is in
    effect once it answers (the channel processes methods in order)."""
    async with exchange_and_queue(amqp_url) as (raw, exchange, queue):
        keys = [f"user.{i}" for i in range(50)]
        number = channel_number(raw)
        await send_frames(raw, b"".join(frames.bind(number, queue, exchange, k) for k in keys))
        await raw.exchange_declare(exchange, exchange_type="direct", passive=True)
        for key in keys:
            await raw.basic_publish(key.encode(), exchange=exchange, routing_key=key)
        declared = await raw.queue_declare(queue, passive=True)
        for _ in range(100):
            if declared.message_count == len(keys):
                break
            await asyncio.sleep(0.02)
            declared = await raw.queue_declare(queue, passive=True)
        assert declared.message_count == len(keys)


async def test_unbinds_sent_together_are_each_answered_and_in_effect(amqp_url: str) -> None:
    """Many ``queue.unbind`` in a few writes, their replies awaited in order, while
    another call on the same channel waits its turn: each gets its own reply, the
    unbound keys no longer route, the others still do, and the channel is usable."""
    async with exchange_and_queue(amqp_url) as (raw, exchange, queue):
        keys = [f"user.{i}" for i in range(120)]
        for key in keys:
            await raw.queue_bind(queue, exchange, routing_key=key)
        gone, kept = keys[:100], keys[100:]
        number = channel_number(raw)
        unbinds = call_frames(
            raw, [frames.unbind(number, queue, exchange, k) for k in gone], Queue.UnbindOk
        )
        declare = raw.queue_declare(queue, passive=True)  # its reply is not an unbind's
        _, declared = await asyncio.wait_for(asyncio.gather(unbinds, declare), 10)
        assert isinstance(declared, aiormq.spec.Queue.DeclareOk)
        for key in keys:
            await raw.basic_publish(key.encode(), exchange=exchange, routing_key=key)
        got: list[bytes] = []
        for _ in range(200):
            message = await raw.basic_get(queue, no_ack=True)
            if message.body:
                got.append(message.body)
            elif len(got) >= len(kept):
                break
            else:
                await asyncio.sleep(0.02)
        assert sorted(got) == sorted(k.encode() for k in kept)


async def test_a_failing_call_raises_instead_of_waiting_forever(amqp_url: str) -> None:
    """A call RabbitMQ refuses (a bind to an exchange that does not exist) closes the
    channel: the caller gets the error at once, and the connection stays usable."""
    connection = await aio_pika.connect(amqp_url)
    try:
        raw = await (await connection.channel(publisher_confirms=False)).get_underlay_channel()
        queue = str((await raw.queue_declare("", exclusive=True)).queue)
        missing = f"test.none.{uuid.uuid4().hex}"
        number = channel_number(raw)
        requests = [
            frames.unbind(number, queue, "amq.direct", "k"),
            frame.marshal(Queue.Bind(queue=queue, exchange=missing, routing_key="k"), number),
            frames.unbind(number, queue, "amq.direct", "k"),
        ]
        with pytest.raises(aiormq.exceptions.AMQPError):
            await asyncio.wait_for(call_frames(raw, requests, Queue.UnbindOk), 10)
        assert raw.is_closed
        other = await (await connection.channel()).get_underlay_channel()
        await other.queue_declare("", exclusive=True)
    finally:
        await connection.close()


async def test_a_confirm_channel_or_a_closed_one_is_refused(amqp_url: str) -> None:
    """A confirm channel counts delivery tags per publish, which a batch would skip;
    a closed channel's frames would be a protocol error on the shared connection."""
    connection = await aio_pika.connect(amqp_url)
    try:
        confirming = await (await connection.channel()).get_underlay_channel()
        with pytest.raises(ValueError, match="confirm"):
            await send_frames(confirming, frames.bind(channel_number(confirming), "q", "x", "k"))
        channel = await connection.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        await channel.close()
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            await send_frames(raw, frames.bind(channel_number(raw), "q", "x", "k"))
        # The connection is still fine.
        other = await (await connection.channel()).get_underlay_channel()
        await other.queue_declare("", exclusive=True)
    finally:
        await connection.close()
