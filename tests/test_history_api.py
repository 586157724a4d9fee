"""History pages: GET /api/history and the history message, on both backends.

The pure parts (a page entry from a frame, the request's validation, the session's
flow) without I/O; the rest against the real RabbitMQ the fixtures start.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse

from notifyd.errors import ProtocolError
from notifyd.history_api import entry
from notifyd.protocol import Channel, History, Notification, history_request, notification
from notifyd.session import LEAVE, ReadHistory, State
from notifyd.websocket import text_frame

from .conftest import (
    SERVICE_KEY,
    AmqpPublisher,
    Server,
    ServerFactory,
    new_user,
    receive_json,
    receive_until,
)
from .conftest import token as mint
from .test_session import NOW, failed, grants, ident, msg, opened, receive, run

STREAM = {"backend": "stream"}

# --- without I/O -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 200, 70_000])
def test_an_entry_is_the_live_notification_without_its_type(size: int) -> None:
    data = "x" * size
    frame = text_frame(notification("N1", "user:alice", "e", data, 123, sender="bob"))
    shown = entry(Notification("N1", Channel.user("alice"), frame, 123))
    assert shown == {
        "id": "N1",
        "channel": "user:alice",
        "event": "e",
        "data": data,
        "ts": 123,
        "from": "bob",
    }


@pytest.mark.parametrize(
    ("channel", "limit", "before", "expected"),
    [
        ("user:alice", None, None, History(Channel.user("alice"))),
        ("broadcast", 5, "N1", History(Channel("broadcast"), 5, "N1")),
        ("topic:news", "20", None, History(Channel.topic("news"), 20)),  # a query's text
        ("user:alice", 0, None, "bad_message"),
        ("user:alice", "-1", None, "bad_message"),
        ("user:alice", "ten", None, "bad_message"),
        ("user:alice", True, None, "bad_message"),
        ("user:alice", 1.5, None, "bad_message"),
        ("user:alice", None, "", "bad_message"),
        ("user:alice", None, "x" * 129, "bad_message"),
        ("user:alice", None, 7, "bad_message"),
        (None, None, None, "invalid_channel"),
        ("presence:bob", None, None, "invalid_channel"),
        ("user:*", None, None, "invalid_channel"),
    ],
)
def test_history_request_validation(
    channel: object, limit: object, before: object, expected: History | str
) -> None:
    if isinstance(expected, History):
        assert history_request(channel, limit, before) == expected
    else:
        with pytest.raises(ProtocolError) as caught:
            history_request(channel, limit, before, ref=3)
        assert (caught.value.code, caught.value.ref) == (expected, 3)


PAGE = {"channel": "user:alice", "notifications": [{"id": "N2"}], "next_before": "N2"}


def test_session_history_reads_a_page_and_answers_with_it() -> None:
    identity = ident(topics=grants("news"))
    session = opened(identity, rate_burst=20)
    request = History(Channel.topic("news"), 10, "N9", ref=4)
    run(
        session,
        [
            (
                receive(
                    msg(type="history", channel="topic:news", limit=10, before="N9", ref=4)
                    + msg(type="ping")
                ),
                [],
                [ReadHistory(request, identity)],
            ),
            (
                lambda s: s.done({**PAGE, "retention": 300}, NOW),
                # The answer, then the message that waited behind it.
                [{"type": "history", "ref": 4, **PAGE}, {"type": "pong"}],
                [],
            ),
        ],
    )


def test_session_history_errors() -> None:
    session = opened(ident(), rate_burst=20)
    forbidden = {"type": "error", "code": "forbidden", "message": "token does not allow reading"}
    run(
        session,
        [
            (
                receive(msg(type="history", channel="user:bob", ref=1)),
                [{**forbidden, "message": forbidden["message"] + " user:bob", "ref": 1}],
                [],
            ),
            (
                receive(msg(type="history", channel="topic:news", ref=2)),
                [{**forbidden, "message": forbidden["message"] + " topic:news", "ref": 2}],
                [],
            ),
            (
                receive(msg(type="history", channel="broadcast", limit=0, ref=3)),
                [
                    {
                        "type": "error",
                        "code": "bad_message",
                        "message": "'limit' must be a positive integer",
                        "ref": 3,
                    }
                ],
                [],
            ),
            (
                receive(msg(type="history", channel="broadcast", before="gone-id", ref=5)),
                [],
                [ReadHistory(History(Channel("broadcast"), None, "gone-id", 5), ident())],
            ),
            (
                failed("gone", "too old"),
                [{"type": "error", "code": "gone", "message": "too old", "ref": 5}],
                [],
            ),
        ],
    )


def test_session_history_costs_as_much_as_a_resume() -> None:
    session = opened(rate_burst=8, rate_limit=0.001)
    history = msg(type="history", channel="user:alice")
    session.receive_data(history, NOW)
    assert session.take_actions()
    session.done(PAGE, NOW)
    session.take_output()
    session.receive_data(history, NOW)  # 2 tokens left after the frame's own: not enough
    assert session.take_actions() == [LEAVE]  # closing 4029: no ReadHistory
    assert session.state is State.CLOSING


# --- against RabbitMQ ------------------------------------------------------------------


async def get_history(
    server: Server, credential: str | None, **query: Any
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {credential}"} if credential is not None else {}
    params = {k: str(v) for k, v in query.items() if v is not None}
    async with server.http.get(
        f"{server.base}/api/history", params=params, headers=headers
    ) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def publish_many(server: Server, channel: Channel, count: int) -> list[str]:
    """``count`` notifications ``{"n": i}`` in order; their ids."""
    return [await server.gateway.broker.publish(channel, "e", {"n": i}) for i in range(count)]


async def wait_for_newest(server: Server, channel: Channel, last_id: str) -> None:
    """Until the history's newest entry of ``channel`` is ``last_id`` (the stream
    may lag the publisher's confirm by a moment)."""
    deadline = time.monotonic() + 10
    while True:
        status, body = await get_history(server, SERVICE_KEY, channel=str(channel), limit=1)
        if status == 200 and [n["id"] for n in body["notifications"]] == [last_id]:
            return
        assert time.monotonic() < deadline, (status, body)
        await asyncio.sleep(0.1)


async def all_pages(server: Server, credential: str, channel: Channel, limit: int) -> list[Any]:
    pages = []
    before = None
    while True:
        status, body = await get_history(
            server, credential, channel=str(channel), limit=limit, before=before
        )
        assert status == 200, body
        pages.append(body)
        before = body["next_before"]
        if before is None:
            return pages
        assert len(pages) < 10


async def test_stream_pages_of_120_newest_first_on_every_replica(
    make_server: ServerFactory,
) -> None:
    replica_a = await make_server(history=STREAM)
    replica_b = await make_server(history=STREAM)
    user = new_user()
    channel = Channel.user(user)
    ids = await publish_many(replica_a, channel, 120)
    await wait_for_newest(replica_a, channel, ids[-1])
    for replica in (replica_a, replica_b):
        pages = await all_pages(replica, mint(user), channel, 50)
        assert [len(p["notifications"]) for p in pages] == [50, 50, 20]
        listed = [n for p in pages for n in p["notifications"]]
        assert [n["id"] for n in listed] == ids[::-1]
        assert [n["data"]["n"] for n in listed] == list(range(119, -1, -1))
        assert listed[0] == {
            "id": ids[-1],
            "channel": f"user:{user}",
            "event": "e",
            "data": {"n": 119},
            "ts": listed[0]["ts"],
        }
        assert [p["next_before"] for p in pages] == [ids[70], ids[20], None]
        assert {p["channel"] for p in pages} == {f"user:{user}"}
        assert {p["retention"] for p in pages} == {300}
    assert replica_b.sample(
        "notifyd_history_requests_total", {"transport": "http", "outcome": "ok"}
    ) == len(pages)


async def test_stream_pages_of_messages_without_message_id(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    """A message without message_id has a content id: a page continues from it."""
    server = await make_server(history=STREAM)
    user = new_user()
    for i in range(5):
        await amqp.send(f"user.{user}", {"data": i})
    deadline = time.monotonic() + 10
    while True:
        _, body = await get_history(server, SERVICE_KEY, channel=f"user:{user}")
        if len(body.get("notifications", ())) == 5 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    pages = await all_pages(server, SERVICE_KEY, Channel.user(user), 2)
    assert [[n["data"] for n in p["notifications"]] for p in pages] == [[4, 3], [2, 1], [0]]


async def test_who_may_read_what(make_server: ServerFactory) -> None:
    server = await make_server(history=STREAM)
    alice, bob = new_user("alice"), new_user("bob")
    news = f"news.{new_user()}"
    await publish_many(server, Channel.topic(news), 1)
    alice_token = mint(alice, topics=["news.*"])

    async def status(credential: str | None, channel: str, **query: Any) -> tuple[int, Any]:
        code, body = await get_history(server, credential, channel=channel, **query)
        return code, body.get("error")

    assert await status(alice_token, f"user:{alice}") == (200, None)
    assert await status(alice_token, "broadcast") == (200, None)
    assert await status(alice_token, f"topic:{news}") == (200, None)
    assert await status(alice_token, f"user:{bob}") == (403, "forbidden")
    assert await status(alice_token, "topic:sport") == (403, "forbidden")
    assert await status(mint(alice), f"topic:{news}") == (403, "forbidden")
    for channel in (f"user:{bob}", f"topic:{news}", "broadcast"):
        assert await status(SERVICE_KEY, channel) == (200, None)
    assert await status(None, f"user:{alice}") == (401, "unauthorized")
    assert await status("not-a-token", f"user:{alice}") == (401, "unauthorized")
    assert await status(mint(alice, ttl=-60), f"user:{alice}") == (401, "unauthorized")
    # Bad input: 400 with a code, never a stack trace.
    for limit in (0, 201, "ten", -5):
        assert await status(SERVICE_KEY, "broadcast", limit=limit) == (400, "bad_message")
    assert await status(SERVICE_KEY, "broadcast", limit=200) == (200, None)
    assert await status(SERVICE_KEY, "everyone") == (400, "invalid_channel")
    code, body = await get_history(server, SERVICE_KEY)
    assert (code, body["error"]) == (400, "invalid_channel")
    assert isinstance(body["message"], str)
    # A position that is not in the history (unknown, or out of retention): 410.
    assert await status(SERVICE_KEY, "broadcast", before="01ARZ3NDEKTSV4RRFFQ69G5FAV") == (
        410,
        "gone",
    )
    assert await status(alice_token, f"user:{alice}", before="nope") == (410, "gone")


async def test_a_revoked_token_reads_no_history(make_server: ServerFactory) -> None:
    server = await make_server(history=STREAM)
    alice = new_user("alice")
    credential = mint(alice, jti="t-1")
    assert (await get_history(server, credential, channel=f"user:{alice}"))[0] == 200
    server.gateway.verifier.revoke(["t-1"], time.time() + 60)
    code, body = await get_history(server, credential, channel=f"user:{alice}")
    assert (code, body["error"]) == (401, "unauthorized")


async def history_message(ws: ClientWebSocketResponse, **fields: Any) -> dict[str, Any]:
    """Send a ``history`` message; its answer (skipping others' broadcasts)."""
    await ws.send_json({"type": "history", **fields})
    while True:
        message: dict[str, Any] = await receive_json(ws, timeout=15)
        if message["type"] in ("history", "error"):
            return message


async def test_the_history_message_pages_like_the_api(make_server: ServerFactory) -> None:
    server = await make_server(history=STREAM)
    user = new_user()
    channel = Channel.user(user)
    ids = await publish_many(server, channel, 7)
    await wait_for_newest(server, channel, ids[-1])
    ws, _ = await server.connect(user)
    first = await history_message(ws, channel=f"user:{user}", limit=4, ref="a")
    status, over_http = await get_history(server, mint(user), channel=f"user:{user}", limit=4)
    assert status == 200
    del over_http["retention"]
    assert first == {"type": "history", "ref": "a", **over_http}
    assert [n["id"] for n in first["notifications"]] == ids[:2:-1]
    second = await history_message(
        ws, channel=f"user:{user}", limit=4, before=first["next_before"], ref=2
    )
    assert [n["id"] for n in second["notifications"]] == ids[2::-1]
    assert second["next_before"] is None
    assert await history_message(ws, channel="user:someone-else", ref=3) == {
        "type": "error",
        "code": "forbidden",
        "message": "token does not allow reading user:someone-else",
        "ref": 3,
    }
    gone = await history_message(ws, channel=f"user:{user}", before="unknown", ref=4)
    assert (gone["code"], gone["ref"]) == ("gone", 4)
    bad = await history_message(ws, channel=f"user:{user}", limit=500, ref=5)
    assert (bad["code"], bad["ref"]) == ("bad_message", 5)
    assert (
        server.sample("notifyd_history_requests_total", {"transport": "ws", "outcome": "ok"}) == 2
    )
    await ws.close()


async def test_memory_pages_over_http_and_the_socket(make_server: ServerFactory) -> None:
    server = await make_server()  # [history] backend = "memory"
    user = new_user()
    channel = Channel.user(user)
    # The in-memory history holds what reached this process: the user is bound here.
    ws, _ = await server.connect(user)
    ids = await publish_many(server, channel, 7)
    for _ in ids:
        await receive_until(ws, "notification")
    pages = await all_pages(server, mint(user), channel, 3)
    assert [[n["id"] for n in p["notifications"]] for p in pages] == [
        ids[:3:-1],
        ids[3:0:-1],
        ids[:1],
    ]
    assert [p["next_before"] for p in pages] == [ids[4], ids[1], None]
    answer = await history_message(ws, channel=f"user:{user}", limit=2, before=ids[2], ref=1)
    assert [n["id"] for n in answer["notifications"]] == [ids[1], ids[0]]
    assert answer["next_before"] is None
    assert (await get_history(server, SERVICE_KEY, channel=str(channel), before="x"))[0] == 410
    await ws.close()


async def test_history_off(make_server: ServerFactory) -> None:
    server = await make_server(history={"backend": "off"})
    user = new_user()
    code, body = await get_history(server, mint(user), channel=f"user:{user}")
    assert (code, body["error"]) == (404, "history_off")
    ws, _ = await server.connect(user)
    answer = await history_message(ws, channel=f"user:{user}", ref=9)
    assert (answer["type"], answer["code"], answer["ref"]) == ("error", "history_off", 9)
    await ws.close()


async def test_a_broker_outage_is_a_503(make_server: ServerFactory) -> None:
    server = await make_server(history=STREAM)
    broker = server.gateway.broker
    broker.connected.clear()  # as while it reconnects
    try:
        code, body = await get_history(server, SERVICE_KEY, channel="broadcast")
    finally:
        broker.connected.set()
    assert (code, body["error"]) == (503, "broker_unavailable")
    assert (await get_history(server, SERVICE_KEY, channel="broadcast"))[0] == 200
