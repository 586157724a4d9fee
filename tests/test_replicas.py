"""Several replicas on one RabbitMQ: routing isolation, topics across replicas, resume anywhere."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pika
import pytest

from .conftest import (
    AmqpPublisher,
    ServerFactory,
    expect_silence,
    new_user,
    receive_json,
    receive_until,
    stream_replicas,
)


async def test_each_replica_gets_only_its_own_users_traffic(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    replica_a, replica_b = await make_server(), await make_server()
    alice, bob = new_user("alice"), new_user("bob")
    ws_alice, _ = await replica_a.connect(alice)
    ws_bob, _ = await replica_b.connect(bob)
    received_before = replica_b.gateway.hub.last_seq

    for n in range(20):
        await amqp.send(f"user.{alice}", {"data": n})
    for n in range(20):
        assert (await receive_until(ws_alice, "notification"))["data"] == n
    await amqp.send("broadcast", {"data": "all"})
    assert (await receive_until(ws_alice, "notification"))["data"] == "all"
    assert (await receive_until(ws_bob, "notification"))["data"] == "all"
    # Replica B's queue saw the broadcast and nothing of Alice's.
    assert replica_b.gateway.hub.last_seq - received_before == 1
    assert f"user.{alice}" not in replica_b.gateway.broker.bindings.bound
    assert f"user.{alice}" in replica_a.gateway.broker.bindings.bound


async def test_chat_through_a_topic_across_two_replicas(make_server: ServerFactory) -> None:
    replica_a, replica_b = await make_server(), await make_server()
    room = f"room{new_user()}"
    alice, bob = new_user("alice"), new_user("bob")
    ws_alice, _ = await replica_a.connect(alice, topics=[room], publish=[room])
    ws_bob, _ = await replica_b.connect(bob, topics=[room], publish=[room])
    await ws_alice.send_json({"type": "publish", "channel": f"topic:{room}", "data": "hi bob"})
    message = await receive_until(ws_bob, "notification")
    assert (message["from"], message["data"]) == (alice, "hi bob")
    await ws_bob.send_json({"type": "publish", "channel": f"topic:{room}", "data": "hi alice"})
    message = await receive_until(ws_alice, "notification", timeout=5)
    while message["data"] != "hi alice":  # alice also gets her own message back
        message = await receive_until(ws_alice, "notification")
    assert message["from"] == bob


async def test_resume_on_another_replica_from_the_shared_stream(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    replica_a, replica_b = await stream_replicas(make_server)
    user = new_user()
    ws, _ = await replica_a.connect(user)
    await amqp.send(f"user.{user}", {"data": 0}, message_id=f"{user}-0")
    last = await receive_until(ws, "notification")
    await ws.close()
    for n in range(1, 11):
        await amqp.send(f"user.{user}", {"data": n}, message_id=f"{user}-{n}")
    await asyncio.sleep(0.2)

    ws, welcome = await replica_b.connect(user, since=last["id"], since_ts=last["ts"])
    assert welcome["resumed"] is True
    await amqp.send(f"user.{user}", {"data": 11}, message_id=f"{user}-11")
    got = [(await receive_until(ws, "notification"))["data"] for _ in range(11)]
    assert got == list(range(1, 12))
    await expect_silence(ws, 0.3)


async def test_resume_storm_is_served_by_few_stream_reads(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server(history={"backend": "stream"})
    marker = new_user()
    marked_at = int(time.time() * 1000)
    await amqp.send(f"user.{marker}", {"data": "x"}, message_id=f"{marker}-since")
    users = [new_user() for _ in range(200)]
    for user in users:
        await amqp.send(f"user.{user}", {"data": user}, message_id=f"{user}-missed")
    await asyncio.sleep(0.2)
    # 200 sockets resume at once from a point before their missed notification.
    results = await asyncio.gather(
        *(server.connect(u, since=f"{marker}-since", since_ts=marked_at) for u in users)
    )
    for user, (ws, welcome) in zip(users, results, strict=True):
        assert welcome["resumed"] is True
        message = await receive_until(ws, "notification")
        assert (message["id"], message["data"]) == (f"{user}-missed", user)
    reads = server.sample("notifyd_history_reads_total")
    assert 1 <= reads <= 20, reads


async def test_unknown_resume_point_on_the_stream_is_not_resumed(
    make_server: ServerFactory,
) -> None:
    server = await make_server(history={"backend": "stream"})
    ws, welcome = await server.connect(
        new_user(), since="never-published-id", since_ts=int(time.time() * 1000)
    )
    assert welcome["resumed"] is False
    await ws.send_json({"type": "ping"})
    assert await receive_json(ws) == {"type": "pong"}


def publish_plain(url: str, routing_key: str, bodies: list[Any]) -> None:
    """Publish as the plainest backend does: pika's ``basic_publish`` with no
    properties at all (no message_id, no timestamp), confirms on."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(
                exchange="notifyd", routing_key=routing_key, body=json.dumps(body)
            )
    finally:
        connection.close()


@pytest.mark.parametrize("with_ts", [False, True], ids=["since only", "since and since_ts"])
async def test_resume_on_another_replica_after_plain_publishes(
    make_server: ServerFactory, amqp_url: str, with_ts: bool
) -> None:
    """Notifications without message_id have content ids: replica B finds the last one
    a client saw on replica A in the stream, and replays exactly what followed."""
    replica_a, replica_b = await stream_replicas(make_server)
    user = new_user()
    key = f"user.{user}"
    ws, _ = await replica_a.connect(user)
    await asyncio.to_thread(publish_plain, amqp_url, key, [{"data": 0}, {"data": 1}])
    seen = [await receive_until(ws, "notification") for _ in range(2)]
    assert [m["data"] for m in seen] == [0, 1]
    last = seen[-1]
    await ws.close()
    missed: list[Any] = [{"data": 2}, {"data": "same"}, {"data": "same"}, {"data": 3}]
    await asyncio.to_thread(publish_plain, amqp_url, key, missed)
    await asyncio.sleep(0.2)

    reads = replica_b.sample("notifyd_history_reads_total")
    ws, welcome = await replica_b.connect(
        user, since=last["id"], since_ts=last["ts"] if with_ts else None
    )
    assert welcome["resumed"] is True
    assert replica_b.sample("notifyd_history_reads_total") == reads + 1
    live: list[Any] = [{"data": "live"}, {"data": "live"}, {"data": 4}]
    await asyncio.to_thread(publish_plain, amqp_url, key, live)
    got = [await receive_until(ws, "notification") for _ in range(7)]
    assert [m["data"] for m in got] == [2, "same", "same", 3, "live", "live", 4]
    ids = [m["id"] for m in seen + got]
    assert len(set(ids)) == len(ids)  # a client dropping repeated ids loses nothing
    await expect_silence(ws, 0.3)
    await ws.close()

    # Back on replica A from a replayed notification (as if the later ones were lost):
    # its content id is found as well.
    await asyncio.to_thread(publish_plain, amqp_url, key, [{"data": 5}])
    replayed = got[3]
    ws, welcome = await replica_a.connect(
        user, since=replayed["id"], since_ts=replayed["ts"] if with_ts else None
    )
    assert welcome["resumed"] is True
    again = [await receive_until(ws, "notification") for _ in range(4)]
    assert [m["data"] for m in again] == ["live", "live", 4, 5]
    await expect_silence(ws, 0.3)


async def test_plain_publishes_during_a_resume_reach_the_socket_once(
    make_server: ServerFactory, amqp_url: str
) -> None:
    """While replica B reads the stream for a resume, plain publishes keep coming: each
    arrives live (held) and in the stream under another content id. Shown once each."""
    replica_a, replica_b = await stream_replicas(make_server)
    user = new_user()
    key = f"user.{user}"
    ws, _ = await replica_a.connect(user)
    await asyncio.to_thread(publish_plain, amqp_url, key, [{"data": -1}])
    last = await receive_until(ws, "notification")
    await ws.close()
    count = 400
    # Confirms make each publish a round trip: ~1 ms apart, spanning the resume.
    publishing = asyncio.create_task(
        asyncio.to_thread(publish_plain, amqp_url, key, [{"data": n} for n in range(count)])
    )
    await asyncio.sleep(0.1)
    resumes = [await replica_b.connect(user, since=last["id"]) for _ in range(3)]
    await publishing
    for ws, welcome in resumes:
        assert welcome["resumed"] is True
        got = [(await receive_until(ws, "notification"))["data"] for _ in range(count)]
        assert got == list(range(count))
        await expect_silence(ws, 0.3)
        await ws.close()
