"""Batched writes to RabbitMQ and the pacing of what a batch of bindings wakes.

:class:`notifyd.broker.BindingTable` without a broker; :func:`notifyd.broker.send_frames`
and :func:`notifyd.broker.publish_frames` against a real RabbitMQ node.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic, Queue

from notifyd.broker import (
    _UNBIND_BATCH,
    WAKE_BATCH,
    BindingTable,
    Broker,
    publish_frames,
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
        frames = []
        for index, body in enumerate(bodies):
            properties = Basic.Properties(message_id=str(index), content_type="text/plain")
            frames.extend(publish_frames(raw, "", queue, body, properties))
        await send_frames(raw, frames)
        received: list[tuple[str | None, bytes]] = []
        done = asyncio.get_running_loop().create_future()

        def on_message(message: DeliveredMessage) -> None:
            received.append((message.header.properties.message_id, message.body))
            if len(received) == len(bodies) and not done.done():
                done.set_result(None)

        await raw.basic_consume(queue, on_message, no_ack=True)  # type: ignore[arg-type]
        await asyncio.wait_for(done, 10)
        assert received == [(str(i), body) for i, body in enumerate(bodies)]
    finally:
        await connection.close()


async def test_batched_binds_are_in_effect_after_a_barrier(amqp_url: str) -> None:
    """``nowait`` binds written together, then one synchronous call: every bind is in
    effect once it answers (the channel processes methods in order)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        queue = f"test.binds.{uuid.uuid4().hex}"
        exchange = f"test.binds.{uuid.uuid4().hex}"
        await raw.exchange_declare(exchange, exchange_type="direct", auto_delete=True)
        await raw.queue_declare(queue, exclusive=True)
        keys = [f"user.{i}" for i in range(50)]
        await send_frames(
            raw,
            [Queue.Bind(queue=queue, exchange=exchange, routing_key=k, nowait=True) for k in keys],
        )
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
    finally:
        await connection.close()


async def test_a_confirm_channel_or_a_closed_one_is_refused(amqp_url: str) -> None:
    """A confirm channel counts delivery tags per publish, which a batch would skip;
    a closed channel's frames would be a protocol error on the shared connection."""
    connection = await aio_pika.connect(amqp_url)
    try:
        confirming = await (await connection.channel()).get_underlay_channel()
        with pytest.raises(ValueError, match="confirm"):
            publish_frames(confirming, "", "q", b"x", Basic.Properties())
        channel = await connection.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        await channel.close()
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            await send_frames(raw, [Queue.Bind(queue="q", exchange="x", nowait=True)])
        # The connection is still fine.
        other = await (await connection.channel()).get_underlay_channel()
        await other.queue_declare("", exclusive=True)
    finally:
        await connection.close()
