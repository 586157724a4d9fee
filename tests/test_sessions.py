"""Token lifecycle, slow clients, client publish/send, resume (single process)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aio_pika
import aiohttp

from .conftest import (
    AmqpPublisher,
    Server,
    ServerFactory,
    expect_close,
    expect_silence,
    new_user,
    raw_upgrade,
    receive_json,
    receive_until,
    token,
)

# --- token lifecycle ---------------------------------------------------------------------


async def test_refresh_required_then_4010_without_refresh(make_server: ServerFactory) -> None:
    server = await make_server(ws={"refresh_before": 1.0, "heartbeat": 0}, auth={"leeway": 0})
    ws, welcome = await server.connect(new_user(), ttl=2)
    required = await receive_json(ws, timeout=3)
    assert required == {"type": "refresh_required", "expires_at": welcome["expires_at"]}
    assert await expect_close(ws, timeout=4) == 4010


async def test_nothing_is_delivered_after_expiry(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server(ws={"refresh_before": 0, "heartbeat": 0}, auth={"leeway": 0})
    user = new_user()
    ws, _ = await server.connect(user, ttl=1)
    await asyncio.sleep(1.2)
    await amqp.send(f"user.{user}", {"data": "too late"})
    received = []
    while True:
        msg = await ws.receive(timeout=3)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        received.append(json.loads(msg.data)["type"])
    assert "notification" not in received
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 4010)


async def test_refresh_swaps_the_token_in_place(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server(ws={"refresh_before": 1.0, "heartbeat": 0}, auth={"leeway": 0})
    user = new_user()
    ws, _ = await server.connect(user, ttl=2)
    assert (await receive_json(ws, timeout=3))["type"] == "refresh_required"
    await ws.send_json({"type": "refresh", "token": token(user, ttl=60)})
    refreshed = await receive_json(ws)
    assert refreshed["type"] == "refreshed" and refreshed["expires_at"] > time.time() + 30
    await asyncio.sleep(2.5)  # past the first token's expiry
    await amqp.send(f"user.{user}", {"data": "still here"})
    assert (await receive_until(ws, "notification"))["data"] == "still here"


async def test_refresh_with_another_users_token_closes_4003(server: Server) -> None:
    ws, _ = await server.connect(new_user())
    await ws.send_json({"type": "refresh", "token": token(new_user())})
    assert await expect_close(ws) == 4003


async def test_invalid_refresh_token_is_an_error_not_a_close(server: Server) -> None:
    ws, _ = await server.connect(new_user())
    await ws.send_json({"type": "refresh", "token": "garbage-token", "ref": "r1"})
    answer = await receive_json(ws)
    assert (answer["type"], answer["code"], answer["ref"]) == ("error", "invalid_token", "r1")


async def test_every_socket_of_a_disconnected_user_reads_4003_not_a_reset(
    server: Server, amqp: AmqpPublisher
) -> None:
    # A close notifyd starts is a full close handshake for each client, while each
    # socket is waiting for client messages. (aiohttp's ws.close() called from
    # another task closes the connection without waiting for the client's answer;
    # an aiohttp client then sometimes reported 1006 here instead of 4003.)
    user = new_user()
    sockets = [(await server.connect(user))[0] for _ in range(20)]
    await amqp.send("control", {"action": "disconnect", "user": user})
    codes = await asyncio.gather(*(expect_close(ws) for ws in sockets))
    assert codes == [4003] * 20


async def test_backend_disconnects_a_user_and_revokes_a_token(
    server: Server, amqp: AmqpPublisher
) -> None:
    user, other = new_user(), new_user()
    ws1, _ = await server.connect(user)
    ws2, _ = await server.connect(other, jti="token-42")
    bystander, _ = await server.connect(new_user())
    await amqp.send("control", {"action": "disconnect", "user": user})
    assert await expect_close(ws1) == 4003
    await amqp.send("control", {"action": "revoke", "jti": ["token-42"]})
    assert await expect_close(ws2) == 4001
    again = await server.ws(token(other, jti="token-42"))
    assert await expect_close(again) == 4001
    await bystander.send_json({"type": "ping"})
    assert await receive_json(bystander) == {"type": "pong"}


# --- slow clients --------------------------------------------------------------------------


async def test_a_client_that_never_reads_is_cut_off_and_others_are_unaffected(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server(ws={"send_buffer_bytes": 256 * 1024, "heartbeat": 0})
    user = new_user()
    # A raw socket that completes the upgrade and then never reads.
    reader, writer = await raw_upgrade(server.port, token(user))
    healthy, _ = await server.connect(user)
    chunk = {"data": "x" * 60_000}
    published = 0
    # ~50 MB offered to the stuck socket; the healthy one keeps reading.
    sender = asyncio.create_task(_publish_many(amqp, f"user.{user}", chunk, 850))
    while not sender.done() or published < 850:
        message = await receive_until(healthy, "notification", timeout=20)
        published += 1
        if published == 850:
            break
    await sender
    assert published == 850
    for _ in range(100):  # the stuck socket gets a 2 s grace to read its 4009
        if len(server.gateway.hub) == 1:
            break
        await asyncio.sleep(0.05)
    assert len(server.gateway.hub) == 1, "the stuck socket should have been dropped"
    async with server.http.get(server.base + "/metrics") as response:
        text = await response.text()
    # The server's own registry: no other test counts in it.
    assert "notifyd_slow_consumer_disconnects_total 1.0" in text
    writer.close()
    del message, reader


async def _publish_many(amqp: AmqpPublisher, key: str, body: dict[str, Any], count: int) -> None:
    payload = json.dumps(body).encode()
    for _ in range(count):
        await amqp.exchange.publish(aio_pika.Message(payload), key)


# --- client publish and send ---------------------------------------------------------------


async def test_client_publish_to_a_topic_needs_the_publish_claim(server: Server) -> None:
    room = f"room{new_user()}"
    alice, bob, eve = new_user("alice"), new_user("bob"), new_user("eve")
    ws_alice, _ = await server.connect(alice, topics=[room], publish=[room])
    ws_bob, _ = await server.connect(bob, topics=[room])
    ws_eve, _ = await server.connect(eve, topics=[room])

    await ws_alice.send_json(
        {
            "type": "publish",
            "channel": f"topic:{room}",
            "event": "chat",
            "data": {"text": "hi"},
            "ref": 7,
        }
    )
    # The sender gets both its answer and the notification, in either order.
    answers = {m["type"]: m for m in [await receive_json(ws_alice), await receive_json(ws_alice)]}
    ack = answers["published"]
    assert ack["ref"] == 7 and ack["channel"] == f"topic:{room}" and ack["id"]
    for message in (
        answers["notification"],
        *[await receive_until(ws, "notification") for ws in (ws_bob, ws_eve)],
    ):
        assert (
            message["from"] == alice
            and message["data"] == {"text": "hi"}
            and message["id"] == ack["id"]
        )

    # Eve may read but not publish; a forged "from" is ignored.
    await ws_eve.send_json(
        {"type": "publish", "channel": f"topic:{room}", "data": "x", "from": alice, "ref": "e"}
    )
    refused = await receive_until(ws_eve, "error")
    assert (refused["code"], refused["ref"]) == ("forbidden", "e")
    await expect_silence(ws_bob, 0.3)


async def test_send_reaches_backends_with_the_server_stamped_user(
    server: Server, amqp_url: str
) -> None:
    user = new_user()
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    upstream = await channel.declare_exchange(
        "notifyd.upstream", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(upstream, f"user.{user}")

    ws, welcome = await server.connect(user)
    await ws.send_json(
        {
            "type": "send",
            "event": "position",
            "data": {"lat": 1.5, "lng": 2.5},
            "user": "mallory",
            "ref": 1,
        }
    )
    assert await receive_until(ws, "sent") == {"type": "sent", "ref": 1}
    message = await queue.get(timeout=5)
    body = json.loads(message.body)
    assert body["user"] == user and body["session"] == welcome["session"]
    assert body["event"] == "position" and body["data"] == {"lat": 1.5, "lng": 2.5}
    assert message.routing_key == f"user.{user}" and message.headers["notifyd-user"] == user
    await connection.close()


# --- resume (in-memory history) ------------------------------------------------------------


async def test_resume_after_reconnect_gets_the_gap_in_order_without_duplicates(
    server: Server, amqp: AmqpPublisher
) -> None:
    user = new_user()
    ws, _ = await server.connect(user)
    await amqp.send(f"user.{user}", {"data": 0}, message_id=f"{user}-0")
    last = await receive_until(ws, "notification")
    await ws.close()
    for n in range(1, 6):
        await amqp.send(f"user.{user}", {"data": n}, message_id=f"{user}-{n}")
    await amqp.send("broadcast", {"data": "b"}, message_id=f"{user}-b")
    await asyncio.sleep(0.3)

    ws, welcome = await server.connect(user, since=last["id"])
    assert welcome["resumed"] is True
    await amqp.send(f"user.{user}", {"data": 6}, message_id=f"{user}-6")
    got: list[dict[str, Any]] = []
    while len(got) < 7:
        message = await receive_until(ws, "notification")
        if message["id"].startswith(user):
            got.append(message["data"])
    assert got == [1, 2, 3, 4, 5, "b", 6]
    await expect_silence(ws, 0.3)


async def test_resume_with_a_gap_older_than_retention_says_so(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server(history={"max_per_user": 3, "max_total": 10})
    user = new_user()
    ws, _ = await server.connect(user)
    await amqp.send(f"user.{user}", {"data": 0})
    last = await receive_until(ws, "notification")
    await ws.close()
    for n in range(1, 6):
        await amqp.send(f"user.{user}", {"data": n})
    await asyncio.sleep(0.3)
    ws, welcome = await server.connect(user, since=last["id"])
    assert welcome["resumed"] is False
    await expect_silence(ws, 0.3)  # no silent partial replay


async def test_resume_message_mid_session(server: Server, amqp: AmqpPublisher) -> None:
    user = new_user()
    ws, _ = await server.connect(user)
    await amqp.send(f"user.{user}", {"data": 1})
    first = await receive_until(ws, "notification")
    await ws.close()
    await amqp.send(f"user.{user}", {"data": 2})
    await asyncio.sleep(0.2)
    ws, _ = await server.connect(user)
    await ws.send_json({"type": "resume", "since": first["id"], "ref": "x"})
    answer = await receive_until(ws, "resumed")
    assert answer == {"type": "resumed", "resumed": True, "count": 1, "ref": "x"}
    assert (await receive_until(ws, "notification"))["data"] == 2


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return head[0] & 0x0F, await reader.readexactly(length)


async def test_a_stalled_client_that_reads_again_sees_4009(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server(ws={"send_buffer_bytes": 64 * 1024, "heartbeat": 0})
    user = new_user()
    # Little kernel buffering, so the server's own buffer fills quickly.
    reader, writer = await raw_upgrade(server.port, token(user), receive_buffer=16 * 1024)
    await reader.readuntil(b"\r\n\r\n")
    before = len(server.gateway.hub)
    publisher = asyncio.create_task(
        _publish_many(amqp, f"user.{user}", {"data": "y" * 20_000}, 300)
    )
    for _ in range(400):
        if server.sample("notifyd_slow_consumer_disconnects_total"):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the stalled socket never overflowed")
    # Read again within the close grace period: the frames, then a 4009 close.
    opcode, payload = await _read_frame(reader)
    while opcode != 0x8:
        opcode, payload = await asyncio.wait_for(_read_frame(reader), 5)
    assert int.from_bytes(payload[:2], "big") == 4009
    assert before >= 1
    await publisher
    writer.close()


async def test_delivery_receipts_and_acks(
    server: Server, amqp: AmqpPublisher, amqp_url: str
) -> None:
    user, offline = new_user(), new_user()
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    receipts = await channel.declare_exchange(
        "notifyd.receipts", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(receipts, f"user.{user}")
    await queue.bind(receipts, "broadcast")

    ws1, _ = await server.connect(user)
    ws2, _ = await server.connect(user)
    await amqp.send(
        f"user.{user}", {"data": 1}, message_id=f"{user}-r", headers={"notifyd-receipt": True}
    )
    await amqp.send(f"user.{offline}", {"data": 2}, headers={"notifyd-receipt": True})
    # basic.get does not wait: poll until the receipt is in the queue.
    deadline = time.monotonic() + 5
    while (message := await queue.get(fail=False)) is None:
        assert time.monotonic() < deadline, "no receipt within 5 s"
        await asyncio.sleep(0.02)
    receipt = json.loads(message.body)
    assert (receipt["id"], receipt["delivered"], receipt["online"]) == (f"{user}-r", 2, True)
    assert receipt["channel"] == f"user:{user}"

    for ws in (ws1, ws2):
        notification = await receive_until(ws, "notification")
        await ws.send_json({"type": "ack", "id": notification["id"]})
    await ws1.send_json({"type": "ping"})
    await receive_until(ws1, "pong")
    await ws2.send_json({"type": "ping"})
    await receive_until(ws2, "pong")
    assert server.sample("notifyd_client_acks_total") == 2
    await connection.close()


async def test_upstream_cli_prints_what_clients_send(server: Server, amqp_url: str) -> None:
    user = new_user()
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "notifyd", "upstream", "--user", user, "--amqp-url", amqp_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert tail.stderr is not None and tail.stdout is not None
        assert b"listening" in await asyncio.wait_for(tail.stderr.readline(), 15)
        ws, _ = await server.connect(user)
        await ws.send_json(
            {"type": "send", "event": "position", "data": {"lat": 48.85, "lng": 2.35}}
        )
        await receive_until(ws, "sent")
        line = json.loads(await asyncio.wait_for(tail.stdout.readline(), 10))
        assert (line["user"], line["event"], line["data"]) == (
            user,
            "position",
            {"lat": 48.85, "lng": 2.35},
        )
    finally:
        tail.terminate()
        await tail.wait()
