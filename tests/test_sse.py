"""Server-Sent Events (issue 17 part 1): GET /sse, POST /api/sse-ticket, POST /api/messages.

The event stream is read with a small parser written here from the SSE spec (the
WHATWG "event stream interpretation"), not with anything from notifyd: the stream
must be readable by clients this project did not write.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import aiohttp
import pytest

from notifyd.auth import Grants, Identity
from notifyd.errors import AuthError
from notifyd.sse import event_for_frame
from notifyd.tickets import Redeemed, Tickets, derive_key
from notifyd.websocket import PING_FRAME, close_frame, text_frame

from .conftest import (
    SERVICE_KEY,
    AmqpPublisher,
    Server,
    ServerFactory,
    ServerProcess,
    expect_close,
    new_user,
    receive_json,
    stream_replicas,
    token,
)


class EventStream:
    """Reads events from an open ``text/event-stream`` response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.retry: int | None = None
        self.comments: list[str] = []
        self.last_id: str | None = None

    async def next(self, timeout: float = 5) -> dict[str, Any] | None:
        """The next event (``event``, ``id``, ``data`` parsed as JSON); None at the end."""
        event, event_id = "message", None
        data: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if data:
                        if event_id is not None:
                            self.last_id = event_id
                        return {"event": event, "id": event_id, "data": json.loads("\n".join(data))}
                    event, event_id, data = "message", None, []
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    event_id = value
                elif name == "retry":
                    self.retry = int(value)

    async def until(self, event: str, timeout: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = await self.next(max(0.01, deadline - time.monotonic()))
            assert got is not None, f"stream ended before {event!r}"
            if got["event"] == event:
                return got

    async def close(self) -> None:
        self.response.close()


async def open_stream(
    server: Server,
    auth_token: str | None = None,
    params: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[EventStream, dict[str, Any]]:
    """An open stream and its welcome's data."""
    headers = dict(headers or {})
    if auth_token is not None:
        headers["Authorization"] = f"Bearer {auth_token}"
    response = await server.http.get(server.base + "/sse", params=params, headers=headers)
    assert response.status == 200, (response.status, await response.text())
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    stream = EventStream(response)
    first = await stream.next()
    assert first is not None and first["event"] == "welcome", first
    return stream, first["data"]


async def get_ticket(server: Server, auth_token: str) -> str:
    response = await server.http.post(
        server.base + "/api/sse-ticket", headers={"Authorization": f"Bearer {auth_token}"}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["expires_in"] == 30
    assert isinstance(body["ticket"], str)
    ticket: str = body["ticket"]
    return ticket


async def refused(server: Server, params: Any = None, **headers: str) -> tuple[int, Any]:
    response = await server.http.get(server.base + "/sse", params=params, headers=headers)
    assert response.headers["Content-Type"].startswith("application/json")
    return response.status, await response.json()


async def post_message(
    server: Server, auth_token: str | None, body: Any
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await server.http.post(server.base + "/api/messages", data=data, headers=headers)
    answer: dict[str, Any] = await response.json()
    return response.status, answer


async def poll(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- pure parts -------------------------------------------------------------------------


def _identity(user: str = "alice", expires_at: float = 2e9) -> Identity:
    return Identity(
        user,
        expires_at,
        Grants.parse(["room", "chat.*"], "topics"),
        Grants.parse(["room"], "publish"),
        "jti-1",
        frozenset({"bob"}),
    )


def test_ticket_round_trip_keeps_the_identity() -> None:
    tickets = Tickets(derive_key("k"), 30)
    opened = tickets.open(tickets.issue(_identity(), 1000.0), 1010.0)
    assert opened.identity == _identity()
    assert opened.expires_at == 1030.0
    assert opened.identity.topics.allows("chat.x") and not opened.identity.topics.allows("x")


def test_ticket_refusals() -> None:
    tickets = Tickets(derive_key("k"), 30)
    ticket = tickets.issue(_identity(), 1000.0)
    with pytest.raises(AuthError) as caught:
        tickets.open(ticket, 1031.0)
    assert caught.value.reason == "expired"
    with pytest.raises(AuthError) as caught:
        Tickets(derive_key("other"), 30).open(ticket, 1000.0)
    assert caught.value.reason == "invalid"
    tampered = ticket[:-3] + ("A" if ticket[-3] != "A" else "B") + ticket[-2:]
    for bad in (tampered, "", "!!!", "a" * 20_000):
        with pytest.raises(AuthError) as caught:
            tickets.open(bad, 1000.0)
        assert caught.value.reason == "invalid"
    # The token expires before the ticket: refused too.
    short = tickets.issue(_identity(expires_at=1005.0), 1000.0)
    with pytest.raises(AuthError):
        tickets.open(short, 1006.0)
    # Opaque: nothing of the identity is readable in it.
    assert "alice" not in ticket and "room" not in ticket


def test_redeemed_is_single_use_and_bounded() -> None:
    redeemed = Redeemed(limit=3)
    assert redeemed.redeem("a", 10.0, 0.0)
    assert not redeemed.redeem("a", 10.0, 1.0)
    for name in "bcde":
        assert redeemed.redeem(name, 10.0, 1.0)
    assert len(redeemed) <= 3
    assert redeemed.redeem("x", 30.0, 11.0)  # the others expired
    assert len(redeemed) == 1


def test_frames_become_events() -> None:
    payload = b'{"type":"notification","id":"n1","channel":"user:a","data":1,"ts":5}'
    data, shared = event_for_frame(text_frame(payload))
    assert shared
    assert data == b"id: n1\nevent: notification\ndata: " + payload + b"\n\n"
    big = b'{"type":"error","code":"x","message":"' + b"y" * 70_000 + b'"}'
    data, shared = event_for_frame(text_frame(big))
    assert not shared and data == b"event: error\ndata: " + big + b"\n\n"
    data, _ = event_for_frame(close_frame(4010, "token expired"))
    assert data == b'event: close\ndata: {"type":"close","code":4010,"reason":"token expired"}\n\n'
    assert event_for_frame(PING_FRAME)[0] == b": ping\n\n"
    welcome = b'{"type":"welcome","user":"a","session":"s","expires_at":1,"heartbeat":25.0}'
    data, _ = event_for_frame(text_frame(welcome))
    assert json.loads(data.split(b"data: ")[1])["transport"] == "sse"


# --- auth ------------------------------------------------------------------------------


async def test_header_auth_welcome_then_notifications_with_ids(
    server: Server, amqp: AmqpPublisher
) -> None:
    user = new_user()
    stream, welcome = await open_stream(server, token(user))
    assert welcome["type"] == "welcome" and welcome["user"] == user
    assert welcome["transport"] == "sse" and welcome["session"]
    assert welcome["heartbeat"] == server.gateway.settings.ws.heartbeat
    assert isinstance(welcome["expires_at"], int) and "resumed" not in welcome
    assert stream.retry == 2000
    assert server.sample("notifyd_sse_connections") == 1
    for n in range(3):
        await amqp.send(f"user.{user}", {"event": "e", "data": n}, message_id=f"{user}-{n}")
    for n in range(3):
        event = await stream.until("notification")
        assert event["id"] == f"{user}-{n}" == event["data"]["id"]
        assert event["data"]["type"] == "notification"
        assert event["data"]["data"] == n and event["data"]["channel"] == f"user:{user}"
    await stream.close()


async def test_ticket_flow_and_single_use(server: Server, amqp: AmqpPublisher) -> None:
    user = new_user()
    ticket = await get_ticket(server, token(user))
    stream, welcome = await open_stream(server, params={"ticket": ticket})
    assert welcome["user"] == user
    await amqp.send(f"user.{user}", {"data": "hi"})
    assert (await stream.until("notification"))["data"]["data"] == "hi"
    status, body = await refused(server, {"ticket": ticket})
    assert status == 401 and body["error"] == "unauthorized"
    assert "used" in body["message"]
    assert server.sample("notifyd_sse_tickets_total", {"outcome": "reused"}) == 1
    assert server.sample("notifyd_sse_tickets_total", {"outcome": "redeemed"}) == 1
    await stream.close()


async def test_refused_before_the_stream(make_server: ServerFactory) -> None:
    server = await make_server(sse={"ticket_ttl": 0.3})
    user = new_user()
    ticket = await get_ticket_any_ttl(server, token(user))
    await asyncio.sleep(0.5)
    status, body = await refused(server, {"ticket": ticket})
    assert status == 401 and body["message"] == "ticket expired"
    status, body = await refused(server, {"ticket": "garbage"})
    assert status == 401 and body["error"] == "unauthorized"
    status, body = await refused(server)
    assert status == 401
    status, body = await refused(server, Authorization=f"Bearer {token(user, ttl=-60)}")
    assert status == 401
    status, body = await refused(server, {"lastEventId": "x" * 500}, Authorization="Bearer x")
    assert status == 401  # auth first
    response = await server.http.post(
        server.base + "/api/sse-ticket", headers={"Authorization": "Bearer nope"}
    )
    assert response.status == 401
    assert (await response.json())["error"] == "unauthorized"
    response = await server.http.post(server.base + "/api/sse-ticket")
    assert response.status == 401


async def get_ticket_any_ttl(server: Server, auth_token: str) -> str:
    response = await server.http.post(
        server.base + "/api/sse-ticket", headers={"Authorization": f"Bearer {auth_token}"}
    )
    assert response.status == 200
    ticket: str = (await response.json())["ticket"]
    return ticket


async def test_ticket_from_one_replica_is_redeemed_on_another(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    replica_a = await make_server()
    replica_b = await make_server()
    user = new_user()
    ticket = await get_ticket(replica_a, token(user, topics=["news"]))
    stream, welcome = await open_stream(replica_b, params={"ticket": ticket})
    assert welcome["user"] == user
    await amqp.send("topic.news", {"data": "extra"})
    event = await stream.until("notification")
    assert event["data"]["channel"] == "topic:news"  # the token's grants came along
    await stream.close()
    # Redeemed on B, announced on the cluster link: refused on A too.
    await poll(lambda: len(replica_a.gateway.sse.redeemed) == 1)
    status, body = await refused(replica_a, {"ticket": ticket})
    assert status == 401 and body["message"] == "ticket already used"


# --- resume --------------------------------------------------------------------------


async def test_last_event_id_resumes_on_another_replica_exactly_once(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    replica_a, replica_b = await stream_replicas(make_server)
    user = new_user()
    stream, _ = await open_stream(replica_a, token(user))
    await amqp.send(f"user.{user}", {"data": 0}, message_id=f"{user}-0")
    last = await stream.until("notification")
    await stream.close()
    for n in range(1, 11):
        await amqp.send(f"user.{user}", {"data": n}, message_id=f"{user}-{n}")
    await asyncio.sleep(0.2)

    stream, welcome = await open_stream(
        replica_b,
        token(user),
        params={"since_ts": str(last["data"]["ts"])},
        headers={"Last-Event-ID": last["id"]},
    )
    assert welcome["resumed"] is True
    await amqp.send(f"user.{user}", {"data": 11}, message_id=f"{user}-11")
    got = [(await stream.until("notification"))["data"]["data"] for _ in range(11)]
    assert got == list(range(1, 12))
    with pytest.raises(TimeoutError):
        await stream.until("notification", timeout=0.4)
    assert stream.last_id == f"{user}-11"
    await stream.close()


async def test_last_event_id_query_and_header_wins(server: Server, amqp: AmqpPublisher) -> None:
    user = new_user()
    stream, _ = await open_stream(server, token(user))
    for n in range(3):
        await amqp.send(f"user.{user}", {"data": n}, message_id=f"{user}-q{n}")
    ids = [(await stream.until("notification"))["id"] for _ in range(3)]
    await stream.close()
    # The JS client's own reconnect: a fresh ticket and lastEventId in the query.
    ticket = await get_ticket(server, token(user))
    stream, welcome = await open_stream(server, params={"ticket": ticket, "lastEventId": ids[0]})
    assert welcome["resumed"] is True
    assert [(await stream.until("notification"))["id"] for _ in range(2)] == ids[1:]
    await stream.close()
    # Header over query.
    stream, welcome = await open_stream(
        server, token(user), params={"lastEventId": ids[0]}, headers={"Last-Event-ID": ids[1]}
    )
    assert welcome["resumed"] is True
    assert (await stream.until("notification"))["id"] == ids[2]
    with pytest.raises(TimeoutError):
        await stream.until("notification", timeout=0.3)
    await stream.close()


# --- subscriptions ------------------------------------------------------------------


async def test_subscribe_query_allowed_and_refused(server: Server, amqp: AmqpPublisher) -> None:
    user = new_user()
    topic = f"room{user}"
    registry = server.metrics.registry
    refusals = {"code": "forbidden"}
    before = registry.get_sample_value("notifyd_client_errors_total", refusals) or 0
    stream, _ = await open_stream(
        server,
        token(user, topics=["games.*"]),
        params=[("subscribe", f"topic:games.{topic}"), ("subscribe", "topic:secret")],
    )
    subscribed = await stream.next()
    assert subscribed is not None and subscribed["event"] == "subscribed"
    assert subscribed["data"]["channel"] == f"topic:games.{topic}"
    refusal = await stream.next()
    assert refusal is not None and refusal["event"] == "error"
    assert refusal["data"] == {
        "type": "error",
        "code": "forbidden",
        "message": "token does not allow topic:secret",
        "channel": "topic:secret",  # no ref to match on a stream: the channel says which
    }
    assert registry.get_sample_value("notifyd_client_errors_total", refusals) == before + 1
    await amqp.send("topic.secret", {"data": "no"})
    await amqp.send(f"topic.games.{topic}", {"data": "yes"})
    event = await stream.until("notification")
    assert event["data"]["data"] == "yes"  # the stream went on, with the allowed topic
    await stream.close()


async def test_presence_subscribe_query(make_server: ServerFactory) -> None:
    server = await make_server(ws={"binding_grace": 0.2})
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    stream, _ = await open_stream(
        server,
        token(alice, presence=[bob]),
        params=[("subscribe", f"presence:{carol}"), ("subscribe", f"presence:{bob}")],
    )
    refusal = await stream.next()
    assert refusal is not None and refusal["event"] == "error"
    assert refusal["data"]["code"] == "forbidden"
    assert refusal["data"]["channel"] == f"presence:{carol}"
    subscribed = await stream.until("subscribed")
    assert subscribed["data"] == {"type": "subscribed", "channel": f"presence:{bob}"}
    ws, _ = await server.connect(bob)
    online = await stream.until("notification", timeout=10)
    assert online["data"]["channel"] == f"presence:{bob}"
    assert online["data"]["data"]["online"] is True and online["id"] == online["data"]["id"]
    await ws.close()
    await stream.close()


# --- POST /api/messages ----------------------------------------------------------------


async def test_post_messages(make_server: ServerFactory, amqp_url: str) -> None:
    server = await make_server(ws={"rate_limit": 0.01, "rate_burst": 6})
    user = new_user()
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    upstream = await channel.declare_exchange(
        "notifyd.upstream", aio_pika.ExchangeType.TOPIC, durable=True
    )
    backend = await channel.declare_queue(exclusive=True)
    await backend.bind(upstream, f"user.{user}")
    room = f"r{user}"
    jwt = token(user, topics=[room], publish=[room])
    stream, _ = await open_stream(server, jwt)

    status, body = await post_message(server, jwt, {"type": "ping", "ref": 7})
    assert (status, body) == (200, {"type": "pong", "ref": 7})
    status, body = await post_message(
        server, jwt, {"type": "publish", "channel": f"topic:{room}", "data": "hello", "ref": "p"}
    )
    assert status == 200 and body["type"] == "published" and body["ref"] == "p"
    assert body["channel"] == f"topic:{room}"
    event = await stream.until("notification")
    assert event["id"] == body["id"] and event["data"]["from"] == user
    status, body = await post_message(
        server, jwt, {"type": "publish", "channel": "topic:other", "data": 1, "ref": 2}
    )
    assert status == 403 and body["code"] == "forbidden" and body["ref"] == 2
    assert body["type"] == "error"
    status, body = await post_message(server, jwt, {"type": "send", "event": "pos", "data": [1]})
    assert (status, body) == (200, {"type": "sent"})
    sent = json.loads((await backend.get(timeout=5)).body)
    assert sent["user"] == user and sent["event"] == "pos" and sent["data"] == [1]
    await connection.close()
    status, body = await post_message(server, jwt, b"{not json")
    assert status == 400 and body["code"] == "bad_json"
    status, body = await post_message(server, jwt, {"type": "subscribe", "channel": "topic:x"})
    assert status == 400 and body["code"] == "bad_message"
    # The burst of 6 is used up (a refused token costs nothing): rate limited now.
    status, body = await post_message(server, jwt, {"type": "ping"})
    assert status == 429 and body["code"] == "rate_limited"
    status, body = await post_message(server, None, {"type": "ping"})
    assert status == 401 and body["code"] == "unauthorized"
    assert server.sample("notifyd_sse_messages_total", {"type": "ping", "status": "200"}) == 1
    await stream.close()


async def test_post_history(server: Server, amqp: AmqpPublisher) -> None:
    user = new_user()
    jwt = token(user)
    stream, _ = await open_stream(server, jwt)
    for n in range(3):
        await amqp.send(f"user.{user}", {"data": n}, message_id=f"{user}-h{n}")
    for _ in range(3):
        await stream.until("notification")
    message = {"type": "history", "channel": f"user:{user}", "limit": 2, "ref": "h"}
    status, body = await post_message(server, jwt, message)
    assert status == 200 and body["type"] == "history" and body["ref"] == "h"
    assert [n["id"] for n in body["notifications"]] == [f"{user}-h2", f"{user}-h1"]
    assert body["next_before"] == f"{user}-h1"
    status, body = await post_message(server, jwt, {**message, "channel": "user:someone-else"})
    assert status == 403 and body["code"] == "forbidden" and body["ref"] == "h"
    await stream.close()


async def test_post_message_too_big(make_server: ServerFactory) -> None:
    server = await make_server(ws={"max_message_size": 1000})
    jwt = token(new_user())
    status, body = await post_message(server, jwt, {"type": "send", "data": "x" * 2000})
    assert status == 413 and body["code"] == "too_big"


# --- expiry, drain, limits ------------------------------------------------------------


async def test_expiry_refresh_required_then_close_4010(make_server: ServerFactory) -> None:
    server = await make_server(auth={"leeway": 0}, ws={"refresh_before": 1})
    user = new_user()
    stream, welcome = await open_stream(server, token(user, ttl=3))
    refresh = await stream.until("refresh_required", timeout=5)
    assert refresh["data"]["expires_at"] == welcome["expires_at"]
    close = await stream.until("close", timeout=5)
    assert close["data"] == {"type": "close", "code": 4010, "reason": "token expired"}
    assert await stream.next() is None  # then the stream ends
    assert server.sample("notifyd_closes_total", {"code": "4010"}) == 1


async def test_drain_closes_streams_with_1001(server: Server) -> None:
    user = new_user()
    stream, _ = await open_stream(server, token(user))
    drain = asyncio.create_task(server.gateway.drain())
    close = await stream.until("close")
    assert close["data"]["code"] == 1001
    assert await stream.next() is None
    await drain
    status, body = await refused(server, Authorization=f"Bearer {token(user)}")
    assert status == 503 and body["error"] == "unavailable"


async def test_a_client_gone_is_noticed_without_a_write(server: Server) -> None:
    """No heartbeat here and nothing published: the stream still leaves the hub as
    soon as its client closes the connection (a closed browser tab)."""
    user = new_user()
    stream, _ = await open_stream(server, token(user))
    hub = server.gateway.hub
    assert hub.connections_of(user) == 1
    await stream.close()
    await poll(lambda: hub.connections_of(user) == 0, timeout=2)
    assert server.gateway.settings.ws.heartbeat == 0  # nothing else could have noticed


async def test_sigterm_drains_streams_with_1001(
    processes: Callable[..., ServerProcess],
) -> None:
    """The real process: SIGTERM sends `event: close` 1001, then the stream ends."""
    process = processes(NOTIFYD_SERVER_DRAIN_SECONDS="0.5")
    await process.wait()
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token(new_user())}"}
        response = await http.get(process.base + "/sse", headers=headers)
        assert response.status == 200
        stream = EventStream(response)
        assert (await stream.until("welcome"))["data"]["transport"] == "sse"
        stopping = asyncio.get_running_loop().run_in_executor(None, process.stop)
        close = await stream.until("close", timeout=10)
        assert close["data"] == {"type": "close", "code": 1001, "reason": "server going away"}
        assert await stream.next() is None
        code, _ = await stopping
        assert code == 0, process.log()
        assert "Traceback" not in process.log()


async def test_revoke_and_disconnect_close_streams(server: Server) -> None:
    user = new_user()
    key = {"Authorization": f"Bearer {SERVICE_KEY}"}
    revoked, _ = await open_stream(server, token(user, jti=f"{user}-jti"))
    body = {"jti": [f"{user}-jti"], "until": time.time() + 60}
    response = await server.http.post(server.base + "/api/revoke", json=body, headers=key)
    assert response.status < 300, await response.text()
    close = await revoked.until("close")
    assert close["data"] == {"type": "close", "code": 4001, "reason": "token revoked"}
    assert await revoked.next() is None
    kept, _ = await open_stream(server, token(user))
    response = await server.http.post(
        server.base + "/api/disconnect", json={"user": user}, headers=key
    )
    assert response.status < 300, await response.text()
    close = await kept.until("close")
    assert close["data"]["code"] == 4003
    assert await kept.next() is None


async def test_per_user_limit_counts_websockets_and_streams(make_server: ServerFactory) -> None:
    server = await make_server(ws={"max_connections_per_user": 2})
    user = new_user()
    stream, _ = await open_stream(server, token(user))
    ws, _ = await server.connect(user)
    status, body = await refused(server, Authorization=f"Bearer {token(user)}")
    assert status == 403 and body["error"] == "too_many_connections"
    await ws.close()
    # The stream counts for the WebSocket's limit too.
    second, _ = await open_stream(server, token(user))
    ws = await server.ws(token(user))
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 4003
    await stream.close()
    await second.close()


async def test_server_full_counts_websockets_and_streams(make_server: ServerFactory) -> None:
    server = await make_server(server={"max_connections": 2})
    stream, _ = await open_stream(server, token(new_user()))
    ws, _ = await server.connect(new_user())
    status, body = await refused(server, Authorization=f"Bearer {token(new_user())}")
    assert status == 503 and body["error"] == "overloaded"
    assert server.sample("notifyd_connection_attempts_total", {"outcome": "overloaded"}) == 1
    await ws.close()
    # The other way round: streams fill the server, a WebSocket is refused with 1013.
    second, _ = await open_stream(server, token(new_user()))
    refused_ws = await server.http.ws_connect(
        server.ws_url, headers={"Authorization": f"Bearer {token(new_user())}"}
    )
    assert await expect_close(refused_ws) == 1013
    await second.close()
    await stream.close()


async def test_slow_client_is_cut_and_others_are_not(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    limit = 65_536
    server = await make_server(ws={"send_buffer_bytes": limit})
    user = new_user()
    fast, _ = await open_stream(server, token(user))
    # A client that sends its request and never reads (small receive buffer).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(
        f"GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token(user)}\r\n\r\n".encode()
    )
    await poll(lambda: len(server.gateway.sse.streams) == 2)
    port = sock.getsockname()[1]
    slow = next(
        s for s in server.gateway.sse.streams if s.transport.get_extra_info("peername")[1] == port
    )
    await poll(lambda: slow.state.name == "OPEN")
    # Loopback's send buffer autotunes to megabytes: keep the kernel's share small, as
    # on a congested mobile link, so that what the client does not read stays queued.
    slow.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = "x" * 8000
    count = 300  # ~2.4 MB: far past the kernel buffers and the 64 KiB limit
    largest = 0

    async def watch() -> None:
        nonlocal largest
        while slow in server.gateway.sse.streams:
            largest = max(largest, slow.transport.get_write_buffer_size() + slow.out_bytes)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    for n in range(count):
        await amqp.send(f"user.{user}", {"data": payload}, message_id=f"{user}-s{n}")
    got = [(await fast.until("notification", timeout=10))["id"] for _ in range(count)]
    assert got == [f"{user}-s{n}" for n in range(count)]  # the other stream got all
    await poll(lambda: slow not in server.gateway.sse.streams, timeout=10)
    await watcher
    assert largest <= limit + 2 * 9000  # bounded: the limit and at most one event over
    assert server.sample("notifyd_slow_consumer_disconnects_total") == 1
    assert server.sample("notifyd_notifications_dropped_total", {"reason": "slow_consumer"}) >= 1
    assert server.sample("notifyd_sse_connections") == 1
    sock.close()
    await fast.close()


# --- CORS ------------------------------------------------------------------------------


async def test_origin_allow_list_and_cors(make_server: ServerFactory) -> None:
    origin = "https://app.example"
    server = await make_server(ws={"allowed_origins": [origin]})
    user = new_user()
    preflight = await server.http.options(
        server.base + "/api/sse-ticket",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    response = await server.http.post(
        server.base + "/api/sse-ticket",
        headers={"Authorization": f"Bearer {token(user)}", "Origin": origin},
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    ticket = (await response.json())["ticket"]
    stream, _ = await open_stream(server, params={"ticket": ticket}, headers={"Origin": origin})
    assert stream.response.headers["Access-Control-Allow-Origin"] == origin
    await stream.close()
    evil = {"Origin": "https://evil.example"}
    for method, path in (("OPTIONS", "/api/sse-ticket"), ("POST", "/api/messages")):
        response = await server.http.request(method, server.base + path, headers=evil)
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers
    status, _ = await refused(server, Authorization=f"Bearer {token(user)}", **evil)
    assert status == 403


async def test_websocket_and_stream_side_by_side(server: Server, amqp: AmqpPublisher) -> None:
    """One user on both transports gets every notification on each."""
    user = new_user()
    stream, _ = await open_stream(server, token(user))
    ws, _ = await server.connect(user)
    await amqp.send(f"user.{user}", {"data": "both"}, message_id=f"{user}-b")
    assert (await stream.until("notification"))["id"] == f"{user}-b"
    message = await receive_json(ws)
    assert message["id"] == f"{user}-b"
    await ws.close()
    await stream.close()
