"""The main path with a real RabbitMQ and real sockets: auth, channels, fan-out, limits."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import aiohttp
import pika
import pytest
import websockets

from notifyd.auth import mint_token
from notifyd.publisher import Publisher
from notifyd.session import Session

from .conftest import (
    SECRET,
    SERVICE_KEY,
    AmqpPublisher,
    Server,
    ServerFactory,
    expect_close,
    expect_silence,
    new_user,
    receive_json,
    receive_until,
    token,
)


async def test_user_notification_reaches_every_socket_of_that_user_only(
    server: Server, amqp: AmqpPublisher
) -> None:
    alice, bob = new_user("alice"), new_user("bob")
    tab1, welcome = await server.connect(alice)
    tab2, _ = await server.connect(alice)
    other, _ = await server.connect(bob)
    assert welcome["user"] == alice and welcome["session"] and welcome["expires_at"] > time.time()
    assert tab1.protocol == "notifyd.v1"

    await amqp.send(
        f"user.{alice}", {"event": "order.shipped", "data": {"order": 7}}, message_id="m-1"
    )
    for ws in (tab1, tab2):
        message = await receive_until(ws, "notification")
        assert message == {
            "type": "notification",
            "id": "m-1",
            "channel": f"user:{alice}",
            "event": "order.shipped",
            "data": {"order": 7},
            "ts": message["ts"],
        }
        assert abs(message["ts"] / 1000 - time.time()) < 5
    await expect_silence(other)


def _pika_publish(amqp_url: str, routing_key: str, bodies: list[bytes]) -> None:
    """Publish with pika's blocking client and no message_id, as a plain backend would."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("notifyd", routing_key, body)
    finally:
        connection.close()


async def test_generated_ids_are_time_ordered_to_the_millisecond(
    server: Server, amqp_url: str
) -> None:
    """Ids of messages without message_id are content ids: the receive time (ms, the
    first 10 characters) then a digest, so ids within one millisecond sort by digest."""
    user = new_user()
    ws, _ = await server.connect(user)
    bodies = [json.dumps({"data": n}).encode() for n in range(5)]
    await asyncio.to_thread(_pika_publish, amqp_url, f"user.{user}", bodies)
    received = [await receive_until(ws, "notification") for _ in range(5)]
    assert [m["data"] for m in received] == [0, 1, 2, 3, 4]
    ids = [m["id"] for m in received]
    times = [i[:10] for i in ids]
    assert times == sorted(times) and len(set(ids)) == 5


async def test_topics_need_permission_and_broadcast_reaches_everyone(
    server: Server, amqp: AmqpPublisher
) -> None:
    reader, outsider = new_user(), new_user()
    topic = f"news{new_user()}"
    ws_reader, _ = await server.connect(reader, topics=[topic, "sport.*"])
    ws_outsider, _ = await server.connect(outsider)

    # Exact grants are joined at connect; prefix grants on request.
    await amqp.send(f"topic.{topic}", {"data": "headline"})
    assert (await receive_until(ws_reader, "notification"))["channel"] == f"topic:{topic}"

    await ws_outsider.send_json({"type": "subscribe", "channel": f"topic:{topic}", "ref": 1})
    refused = await receive_json(ws_outsider)
    assert refused == {
        "type": "error",
        "code": "forbidden",
        "message": refused["message"],
        "ref": 1,
    }

    await ws_reader.send_json({"type": "subscribe", "channel": "topic:sport.tennis"})
    assert await receive_json(ws_reader) == {"type": "subscribed", "channel": "topic:sport.tennis"}
    await amqp.send("topic.sport.tennis", {"data": "ace"})
    assert (await receive_until(ws_reader, "notification"))["data"] == "ace"
    await ws_reader.send_json({"type": "unsubscribe", "channel": "topic:sport.tennis"})
    assert await receive_json(ws_reader) == {
        "type": "unsubscribed",
        "channel": "topic:sport.tennis",
    }
    await amqp.send("topic.sport.tennis", {"data": "fault"})
    await expect_silence(ws_reader)
    await expect_silence(ws_outsider, 0.1)

    await amqp.send("broadcast", {"event": "maintenance", "data": {"at": "22:00"}})
    for ws in (ws_reader, ws_outsider):
        message = await receive_until(ws, "notification")
        assert (message["channel"], message["event"]) == ("broadcast", "maintenance")


async def test_another_websocket_library_speaks_the_protocol(
    server: Server, amqp: AmqpPublisher
) -> None:
    """First-message auth with the `websockets` library, as a browser would do it."""
    user = new_user()
    async with websockets.connect(server.ws_url, subprotocols=["notifyd.v1"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "notifyd.v1"
        await ws.send(json.dumps({"type": "auth", "token": token(user)}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome" and welcome["user"] == user
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
        await amqp.send(f"user.{user}", {"data": {"x": 1}})
        assert json.loads(await ws.recv())["data"] == {"x": 1}


@pytest.mark.parametrize(
    ("make_token", "code"),
    [
        (lambda u: "not-a-jwt", 4001),
        (lambda u: mint_token("another-secret-another-secret-123456", u), 4001),
        (lambda u: token(u, ttl=-60), 4010),
        (lambda u: token("#"), 4001),
    ],
    ids=["garbage", "wrong-secret", "expired", "wildcard-subject"],
)
async def test_bad_tokens_are_closed_with_their_code(
    server: Server, make_token: Callable[[str], str], code: int
) -> None:
    user = new_user()
    ws = await server.ws(make_token(user))
    assert await expect_close(ws) == code
    ws = await server.ws()
    await ws.send_json({"type": "auth", "token": make_token(user)})
    assert await expect_close(ws) == code


async def test_first_message_must_be_auth(server: Server) -> None:
    ws = await server.ws()
    await ws.send_json({"type": "ping"})
    assert await expect_close(ws) == 4001  # a valid message, but no token
    ws = await server.ws()
    await ws.send_str("{nonsense")
    assert await expect_close(ws) == 4000  # not the protocol at all
    ws = await server.ws()
    await ws.send_bytes(b"\x00")
    assert await expect_close(ws) == 4000


async def test_an_internal_error_closes_1011_and_the_server_lives(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug cannot be produced for real: a handler is made to fail on purpose.
    def broken(session: object, message: object, now: float) -> None:
        raise RuntimeError("simulated bug")

    victim, _ = await server.connect(new_user())
    monkeypatch.setattr(Session, "_handle", broken)
    await victim.send_json({"type": "ping"})
    assert await expect_close(victim) == 1011
    monkeypatch.undo()
    ws, _ = await server.connect(new_user())
    await ws.send_json({"type": "ping"})
    assert await receive_json(ws) == {"type": "pong"}


async def test_auth_timeout_closes_4008(make_server: ServerFactory) -> None:
    server = await make_server(auth={"auth_timeout": 0.3})
    ws = await server.ws()
    started = time.monotonic()
    assert await expect_close(ws) == 4008
    assert time.monotonic() - started < 3


async def test_query_token_is_off_by_default_and_never_logged_when_on(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    user = new_user()
    off = await make_server()
    async with off.http.ws_connect(f"{off.ws_url}?token={token(user)}") as ws:
        assert await expect_close(ws) == 4001

    on = await make_server(auth={"query_token": True})
    secret_token = token(user)
    with caplog.at_level("DEBUG"):
        async with on.http.ws_connect(f"{on.ws_url}?token={secret_token}") as ws:
            assert (await receive_json(ws))["type"] == "welcome"
    assert secret_token not in caplog.text
    # aiohttp's access log would print the query string: it must not.
    assert "token=" not in caplog.text


async def test_origin_allow_list_refuses_before_upgrade(make_server: ServerFactory) -> None:
    server = await make_server(ws={"allowed_origins": ["https://app.example"], "heartbeat": 0})
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await server.http.ws_connect(server.ws_url, headers={"Origin": "https://evil.example"})
    assert refused.value.status == 403
    ws = await server.ws(token(new_user()), headers={"Origin": "https://app.example"})
    assert (await receive_json(ws))["type"] == "welcome"


async def test_oversize_message_closes_1009(make_server: ServerFactory) -> None:
    server = await make_server(ws={"max_message_size": 1024, "heartbeat": 0})
    ws, _ = await server.connect(new_user())
    await ws.send_str(json.dumps({"type": "ping", "pad": "x" * 2000}))
    assert await expect_close(ws) == 1009


async def test_bad_client_messages_get_errors_and_the_socket_lives(server: Server) -> None:
    ws, _ = await server.connect(new_user())
    cases = [
        ("not json", "bad_json"),
        ("[1,2]", "bad_message"),
        ('{"type":"dance"}', "unknown_type"),
        ('{"type":"subscribe","channel":"topic:a b"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"topic:#"}', "invalid_channel"),
        ('{"type":"unsubscribe","channel":"topic:never"}', "not_subscribed"),
        ('{"type":"publish","channel":"user:bob","data":1}', "invalid_channel"),
        ('{"type":"auth","token":"xxxxxxxx"}', "already_authenticated"),
    ]
    for text, code in cases:
        await ws.send_str(text)
        answer = await receive_json(ws)
        assert (answer["type"], answer["code"]) == ("error", code), text
    await ws.send_bytes(b"\x00\x01")
    assert (await receive_json(ws))["code"] == "bad_message"
    await ws.send_json({"type": "ping"})
    assert await receive_json(ws) == {"type": "pong"}


async def test_per_user_connection_limit_closes_4003(make_server: ServerFactory) -> None:
    server = await make_server(ws={"max_connections_per_user": 2, "heartbeat": 0})
    user = new_user()
    held = [await server.connect(user), await server.connect(user)]
    ws = await server.ws(token(user))
    assert await expect_close(ws) == 4003
    assert not any(socket.closed for socket, _ in held)
    await server.connect(new_user())  # others are not affected


async def test_server_connection_limit_closes_1013(make_server: ServerFactory) -> None:
    server = await make_server(server={"max_connections": 2, "drain_seconds": 0.1})
    held = [await server.connect(new_user()), await server.connect(new_user())]
    ws = await server.ws(token(new_user()))
    assert await expect_close(ws) == 1013
    assert not any(socket.closed for socket, _ in held)


async def test_rate_limit_closes_4029(make_server: ServerFactory) -> None:
    server = await make_server(ws={"rate_limit": 5, "rate_burst": 5, "heartbeat": 0})
    ws, _ = await server.connect(new_user())
    for _ in range(20):
        await ws.send_json({"type": "ping"})
    assert await expect_close(ws) == 4029


async def test_poison_messages_are_dead_lettered_and_the_consumer_lives(
    server: Server, amqp: AmqpPublisher, amqp_url: str
) -> None:
    user = new_user()
    ws, _ = await server.connect(user)
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    dead = await channel.declare_queue("notifyd.dead", passive=True)  # bounded by notifyd
    await dead.purge()

    await amqp.send(f"user.{user}", b"\xff not json", message_id="poison-1")
    await amqp.send(f"user.{user}", {"no": "data key"}, message_id="poison-2")
    await amqp.send(f"user.{user}", {"data": "x" * 300_000}, message_id="poison-3")
    await amqp.send(f"user.{user}", {"data": "still alive"})
    assert (await receive_until(ws, "notification"))["data"] == "still alive"

    reasons: dict[str | None, Any] = {}
    deadline = time.monotonic() + 5
    while len(reasons) < 3 and time.monotonic() < deadline:
        message = await dead.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        reasons[message.message_id] = message.headers["notifyd-reason"]
        assert message.headers["notifyd-routing-key"] == f"user.{user}"
    assert reasons == {"poison-1": "not_json", "poison-2": "bad_body", "poison-3": "too_big"}
    await connection.close()

    async with server.http.get(server.base + "/metrics") as response:
        text = await response.text()
    assert 'notifyd_dead_lettered_total{reason="not_json"}' in text


async def test_duplicate_message_ids_are_delivered_once(
    server: Server, amqp: AmqpPublisher
) -> None:
    user = new_user()
    ws, _ = await server.connect(user)
    await amqp.send(f"user.{user}", {"data": 1}, message_id="dup-1")
    await amqp.send(f"user.{user}", {"data": 2}, message_id="dup-1")
    await amqp.send(f"user.{user}", {"data": 3}, message_id="dup-2")
    assert (await receive_until(ws, "notification"))["id"] == "dup-1"
    assert (await receive_until(ws, "notification"))["id"] == "dup-2"


async def test_expired_messages_are_not_delivered(server: Server, amqp: AmqpPublisher) -> None:
    user = new_user()
    ws, _ = await server.connect(user)
    stale_ms = int((time.time() - 60) * 1000)
    await amqp.send(
        f"user.{user}", {"data": "old"}, expiration=30, headers={"notifyd-published-ms": stale_ms}
    )
    await amqp.send(f"user.{user}", {"data": "fresh"}, expiration=30)
    assert (await receive_until(ws, "notification"))["data"] == "fresh"


async def test_http_publish_goes_through_rabbitmq(server: Server) -> None:
    user = new_user()
    ws, _ = await server.connect(user)
    url = server.base + "/api/publish"
    body = {"channel": f"user:{user}", "event": "hello", "data": {"a": 1}}
    async with server.http.post(url, json=body) as response:
        assert response.status == 401
    async with server.http.post(
        url, json=body, headers={"Authorization": "Bearer wrong-key-123"}
    ) as response:
        assert response.status == 401
    auth = {"Authorization": f"Bearer {SERVICE_KEY}"}
    for bad in ({"channel": "user:#", "data": 1}, {"channel": f"user:{user}"}, [1]):
        async with server.http.post(url, json=bad, headers=auth) as response:
            assert response.status == 400, bad
            assert "error" in await response.json()
    async with server.http.post(url, json=body, headers=auth) as response:
        assert response.status == 202
        published = await response.json()
    message = await receive_until(ws, "notification")
    assert (message["id"], message["event"], message["data"]) == (
        published["id"],
        "hello",
        {"a": 1},
    )


async def test_http_publish_to_a_user_who_is_offline_is_accepted(server: Server) -> None:
    body = {"channel": f"user:{new_user()}", "event": "hello", "data": {"a": 1}}
    auth = {"Authorization": f"Bearer {SERVICE_KEY}"}
    async with server.http.post(server.base + "/api/publish", json=body, headers=auth) as response:
        assert response.status == 202, await response.text()
        assert (await response.json())["id"]


async def test_health_readiness_and_metrics(server: Server) -> None:
    async with server.http.get(server.base + "/healthz") as response:
        assert response.status == 200
    async with server.http.get(server.base + "/readyz") as response:
        assert response.status == 200
        assert await response.json() == {"ready": True, "broker": True, "draining": False}
    _connected = await server.connect(new_user())
    async with server.http.get(server.base + "/metrics") as response:
        text = await response.text()
    for name in (
        "notifyd_connections",
        "notifyd_users_online",
        "notifyd_connection_attempts_total",
        "notifyd_broker_connected 1.0",
        "notifyd_delivery_latency_seconds_bucket",
        "notifyd_notifications_dropped_total",
    ):
        assert name in text, name
    assert "alice" not in text and "user=" not in text


async def test_publisher_helper_confirms_and_cli_token(server: Server, amqp_url: str) -> None:
    user = new_user()
    ws, _ = await server.connect(user)
    async with Publisher(amqp_url) as publisher:
        notification_id = await publisher.publish({"k": "v"}, user=user, event="e1")
        with pytest.raises(ValueError, match="invalid user"):
            await publisher.publish({}, user="a.*")
        # Nobody online for that user: RabbitMQ drops it, which is not an error.
        assert await publisher.publish({"k": "v"}, user=new_user())
    message = await receive_until(ws, "notification")
    assert (message["id"], message["data"]) == (notification_id, {"k": "v"})

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "notifyd",
        "token",
        "--user",
        user,
        "--secret",
        SECRET,
        "--topics",
        "a,b",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    ws2 = await server.ws(out.decode().strip())
    assert (await receive_json(ws2))["user"] == user
