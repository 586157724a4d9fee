"""notifyd.client, the Python client (issue 17.4), and ``notifyd listen`` built on it.

Pure parts (backoff, reconnect policy, dedupe, the inbox) without sockets; the rest
against real servers: in-process, and two replica processes sharing the stream history.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pika
import pytest

from notifyd.client import (
    Client,
    ClientError,
    ConnectionClosed,
    Notification,
    RecentIds,
    State,
    StateEvent,
    backoff_delay,
    should_reconnect,
)
from notifyd.publisher import Publisher

from .conftest import SECRET, AmqpPublisher, ServerFactory, ServerProcess, new_user, token

NOTIFYD = (sys.executable, "-m", "notifyd")


async def take(
    client: Client, count: int, timeout: float = 10, channel: str | None = None
) -> list[Notification]:
    """The next ``count`` notifications (of ``channel``, when given)."""
    got: list[Notification] = []
    iterator = aiter(client)
    async with asyncio.timeout(timeout):
        while len(got) < count:
            notification = await anext(iterator)
            if channel is None or notification.channel == channel:
                got.append(notification)
    return got


async def silence(client: Client, seconds: float = 0.5) -> None:
    """Assert no notification is waiting or arrives within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            extra = await anext(aiter(client))
    except TimeoutError:
        return
    raise AssertionError(f"unexpected notification {extra}")


def state_of(client: Client) -> State:
    return client.state  # a call: mypy keeps no narrowing from an earlier assert


def recorder() -> tuple[list[StateEvent], Callable[[StateEvent], None]]:
    events: list[StateEvent] = []
    return events, events.append


def pika_publish(
    url: str, routing_key: str, bodies: list[tuple[dict[str, Any], str | None]]
) -> None:
    """Publish with pika's blocking client and plain basic_publish (confirms on)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body, message_id in bodies:
            properties = pika.BasicProperties(message_id=message_id, delivery_mode=2)
            channel.basic_publish("notifyd", routing_key, json.dumps(body), properties)
    finally:
        connection.close()


# --- pure parts ------------------------------------------------------------------------------


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    code = "import sys, notifyd.client; print('\\n'.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert {"notifyd.client", "aiohttp"} <= loaded
    heavy = {"aiohttp.web", "jwt", "prometheus_client", "aio_pika", "aiormq", "pamqp"}
    assert not heavy & loaded
    assert sorted(m for m in loaded if m.startswith("notifyd.")) == ["notifyd.client"]


def test_importing_the_publisher_loads_no_server_and_registers_no_metric() -> None:
    code = (
        "import sys, notifyd.publisher; loaded = sorted(sys.modules)\n"
        "from prometheus_client import REGISTRY\n"
        "print('\\n'.join(loaded + [f'family:{f.name}' for f in REGISTRY.collect()]))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert {"notifyd.publisher", "aio_pika"} <= loaded
    assert not {"aiohttp.web", "jwt", "prometheus_client", "notifyd.metrics"} & loaded
    assert not [name for name in loaded if name.startswith("family:notifyd")]


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    ceilings = [min(30.0, 0.5 * 2**attempt) for attempt in range(12)]
    assert ceilings[:7] == [0.5, 1, 2, 4, 8, 16, 30]
    for attempt, ceiling in enumerate(ceilings):
        assert backoff_delay(attempt, 0.5, 30.0, rand=lambda: 0.0) == 0.0
        assert backoff_delay(attempt, 0.5, 30.0, rand=lambda: 0.999999) == pytest.approx(
            ceiling, rel=1e-5
        )
    # Uniform over the whole window: not clustered near the ceiling or near zero.
    rng = random.Random(17)
    samples = [backoff_delay(3, 0.5, 30.0, rand=rng.random) for _ in range(4000)]
    assert all(0 <= s <= 4.0 for s in samples)
    assert min(samples) < 0.05 and max(samples) > 3.95
    assert sum(samples) / len(samples) == pytest.approx(2.0, abs=0.1)
    assert sum(s < 1.0 for s in samples) == pytest.approx(1000, abs=100)
    # Far past the cap, no overflow; the default source stays within bounds.
    assert backoff_delay(10_000, 0.5, 30.0, rand=lambda: 0.5) == 15.0
    assert all(0 <= backoff_delay(n) <= 30.0 for n in range(100))
    with pytest.raises(ValueError):
        backoff_delay(-1)


@pytest.mark.parametrize(
    ("code", "factory", "status", "expected"),
    [
        (None, False, None, True),  # network failure
        (1001, False, None, True),  # draining: another replica
        (1006, False, None, True),  # lost without a close frame
        (1011, False, None, True),
        (1013, False, None, True),
        (4008, False, None, True),
        (4009, False, None, True),  # slow consumer: resume
        (4029, False, None, True),
        (4001, False, None, False),  # unauthorized: the same token would fail again
        (4010, False, None, False),
        (4001, True, None, True),  # ... unless a new one can be had
        (4010, True, None, True),
        (4003, True, None, False),  # shut out
        (4000, True, None, False),
        (1009, True, None, False),
        (None, True, 503, True),  # draining replica refusing upgrades
        (None, True, 502, True),
        (None, True, 403, False),  # Origin refused
        (None, True, 404, False),
    ],
)
def test_reconnect_policy(
    code: int | None, factory: bool, status: int | None, expected: bool
) -> None:
    assert should_reconnect(code, factory, status) is expected


def test_recent_ids_forget_the_least_recently_seen() -> None:
    recent = RecentIds(3)
    assert [recent.seen(i) for i in "abc"] == [False] * 3
    assert recent.seen("a") is True  # a is now the most recent
    assert recent.seen("d") is False  # evicts b, the least recently seen
    assert "b" not in recent and {"a", "c", "d"} <= {i for i in "abcd" if i in recent}
    assert len(recent) == 3
    assert recent.seen("b") is False


def frame(
    notification_id: str, data: Any = None, ts: int = 1, channel: str = "user:u"
) -> dict[str, Any]:
    return {
        "type": "notification",
        "id": notification_id,
        "channel": channel,
        "data": data,
        "ts": ts,
    }


async def test_duplicates_are_dropped_and_the_resume_point_follows_what_was_delivered() -> None:
    client = Client("ws://127.0.0.1:9/ws", token="t")
    for message in (
        frame("a", 1, 10),
        frame("b", 2, 20),
        frame("a", 1, 10),
        frame("c", 3, 30),
        frame("b", 2, 20),
        frame("c", 4, 40, channel="topic:news"),  # ids are per channel: not a repeat
    ):
        await client._dispatch(message, (None, None))
    assert (client.queued, client.duplicates) == (4, 2)
    assert (client.last_id, client.last_ts) == ("c", 40)
    await client.close()
    taken = [(n.channel, n.id) for n in await take(client, 4)]  # queued ones are still read
    assert taken == [("user:u", "a"), ("user:u", "b"), ("user:u", "c"), ("topic:news", "c")]
    assert [n async for n in client] == []  # then iteration ends


async def test_overflow_drop_oldest_keeps_the_newest() -> None:
    client = Client("ws://127.0.0.1:9/ws", token="t", max_queue=2, overflow="drop_oldest")
    for n in range(5):
        await client._dispatch(frame(f"id{n}", n), (None, None))
    assert (client.dropped, client.queued, client.last_id) == (3, 2, "id4")
    assert [n.data for n in await take(client, 2)] == [3, 4]


async def test_overflow_block_waits_for_the_reader_and_loses_nothing() -> None:
    client = Client("ws://127.0.0.1:9/ws", token="t", max_queue=2)
    for n in range(2):
        await client._dispatch(frame(f"id{n}", n), (None, None))
    third = asyncio.create_task(client._dispatch(frame("id2", 2), (None, None)))
    await asyncio.sleep(0.05)
    assert not third.done() and client.last_id == "id1"  # blocked: not delivered yet
    assert [n.data for n in await take(client, 1)] == [0]
    await asyncio.wait_for(third, 1)
    assert client.last_id == "id2" and client.dropped == 0
    assert [n.data for n in await take(client, 2)] == [1, 2]


def test_notification_wire_form() -> None:
    message = {
        "type": "notification",
        "id": "x",
        "channel": "topic:t",
        "event": "chat",
        "data": {"a": 1},
        "ts": 5,
        "from": "bob",
    }
    notification = Notification.from_message(message)
    assert notification == Notification("x", "topic:t", "chat", {"a": 1}, 5, "bob")
    assert notification.to_dict() == {k: v for k, v in message.items() if k != "type"}
    assert Notification.from_message(frame("y")).to_dict() == {
        "id": "y",
        "channel": "user:u",
        "data": None,
        "ts": 1,
    }


# --- against an in-process server ------------------------------------------------------------


async def test_receives_what_pika_and_the_publisher_send(
    make_server: ServerFactory, amqp_url: str
) -> None:
    server = await make_server()
    user = new_user()
    events, on_state = recorder()
    async with Client(server.ws_url, token=token(user), on_state=on_state) as client:
        assert client.state is State.OPEN and client.user == user and client.session_id
        # A plain backend: pika, basic_publish, no message_id.
        await asyncio.to_thread(
            pika_publish, amqp_url, f"user.{user}", [({"event": "plain", "data": {"n": 1}}, None)]
        )
        async with Publisher(amqp_url) as publisher:
            published = await publisher.publish({"n": 2}, user=user, event="order.shipped")
        first, second = await take(client, 2)
        assert (first.channel, first.event, first.data, first.sender) == (
            f"user:{user}",
            "plain",
            {"n": 1},
            None,
        )
        assert first.id and abs(first.ts / 1000 - time.time()) < 10
        assert (second.id, second.event, second.data) == (published, "order.shipped", {"n": 2})
        assert client.last_id == published
    assert state_of(client) is State.CLOSED
    assert [e.state for e in events] == [State.CONNECTING, State.OPEN, State.CLOSED]
    assert events[-1].code == 1000


async def test_requests_return_the_servers_answer_or_raise(
    make_server: ServerFactory, amqp_url: str
) -> None:
    server = await make_server()
    user, room = new_user(), f"room{new_user()}"
    errors: list[ClientError] = []
    granted = token(user, topics=["chat.*"], publish=[f"chat.{room}"])
    async with Client(server.ws_url, token=granted, on_error=errors.append) as client:
        subscribed = await client.subscribe(f"chat.{room}")  # a bare name means a topic
        assert (subscribed["type"], subscribed["channel"]) == ("subscribed", f"topic:chat.{room}")
        assert client.topics == (f"topic:chat.{room}",)
        published = await client.publish(f"topic:chat.{room}", {"text": "hi"}, event="chat")
        assert (published["type"], published["channel"]) == ("published", f"topic:chat.{room}")
        (echo,) = await take(client, 1)
        assert (echo.id, echo.sender, echo.event, echo.data) == (
            published["id"],
            user,
            "chat",
            {"text": "hi"},
        )
        # A backend consuming what this user sends (without one, send is refused).
        async with await aio_pika.connect(amqp_url) as amqp:
            channel = await amqp.channel()
            upstream = await channel.declare_exchange(
                "notifyd.upstream", aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(upstream, f"user.{user}")
            assert (await client.send("position", {"lat": 1.5}))["type"] == "sent"
            received = await queue.get(timeout=5)
            body = json.loads(received.body)
            assert (body["user"], body["event"], body["data"]) == (user, "position", {"lat": 1.5})
        assert (await client.ping())["type"] == "pong"

        with pytest.raises(ClientError) as refused:
            await client.publish("topic:chat.elsewhere", {"text": "no"})
        assert refused.value.code == "forbidden" and "chat.elsewhere" in refused.value.message
        with pytest.raises(ClientError) as refused:
            await client.subscribe("topic:secret")
        assert refused.value.code == "forbidden"
        assert client.topics == (f"topic:chat.{room}",)  # a refused topic is not kept
        with pytest.raises(ClientError) as refused:
            await client.unsubscribe("topic:never-joined")
        assert refused.value.code == "not_subscribed"
        assert (await client.unsubscribe(f"topic:chat.{room}"))["type"] == "unsubscribed"
        assert (await client.ping())["type"] == "pong"  # errors do not end the session
    assert errors == []  # every error answered a request
    with pytest.raises(ConnectionClosed):
        await client.ping()


async def test_history_pages_newest_first_and_refuses_other_users(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    server = await make_server()
    user = new_user()
    async with Client(server.ws_url, token=token(user)) as client:
        ids = [f"{user}-h{n}" for n in range(5)]
        for n, message_id in enumerate(ids):
            await amqp.send(f"user.{user}", {"data": {"n": n}}, message_id=message_id)
        assert [n.id for n in await take(client, 5)] == ids
        page = await client.history(f"user:{user}", limit=3)
        assert [n["id"] for n in page["notifications"]] == ids[:1:-1]
        assert [n["data"] for n in page["notifications"]] == [{"n": 4}, {"n": 3}, {"n": 2}]
        older = await client.history(f"user:{user}", limit=3, before=page["next_before"])
        assert [n["id"] for n in older["notifications"]] == ids[1::-1]
        with pytest.raises(ClientError) as refused:
            await client.history(f"user:{new_user()}")
        assert refused.value.code == "forbidden"


async def test_a_close_reconnecting_cannot_help_stops_the_client(
    make_server: ServerFactory,
) -> None:
    server = await make_server(ws={"max_connections_per_user": 1})
    user = new_user()
    async with Client(server.ws_url, token=token(user)):
        second = Client(server.ws_url, token=token(user), backoff_base=0.01)
        with pytest.raises(ConnectionClosed) as closed:
            await second.connect(timeout=10)
        assert closed.value.code == 4003 and second.state is State.CLOSED
        assert second.reconnects == 0
        with pytest.raises(ConnectionClosed):
            [n async for n in second]
    bad = Client(server.ws_url, token="not-a-jwt")
    with pytest.raises(ConnectionClosed) as closed:
        await bad.connect(timeout=10)
    assert closed.value.code == 4001 and await bad.wait_closed() is closed.value


async def test_a_refused_token_is_replaced_from_the_factory(make_server: ServerFactory) -> None:
    server = await make_server()
    user = new_user()
    tokens = itertools.chain(["not-a-jwt"], iter(lambda: token(user), None))
    events, on_state = recorder()
    client = Client(
        server.ws_url, token_factory=lambda: next(tokens), backoff_base=0.05, on_state=on_state
    )
    async with await client.connect(timeout=60):
        reconnecting = [e for e in events if e.state is State.RECONNECTING]
        assert reconnecting and reconnecting[0].code == 4001
        assert reconnecting[0].delay is not None and reconnecting[0].delay <= 0.05
        assert client.user == user


async def test_refresh_required_is_answered_from_the_factory(
    make_server: ServerFactory, amqp_url: str
) -> None:
    server = await make_server(ws={"refresh_before": 1.0}, auth={"leeway": 0})
    user = new_user()
    minted: list[float] = []

    async def fetch() -> str:
        await asyncio.sleep(0)  # an async factory, e.g. an HTTP call to the backend
        ttl = 2 if not minted else 60
        minted.append(ttl)
        return token(user, ttl=ttl)

    events, on_state = recorder()
    async with Client(server.ws_url, token_factory=fetch, on_state=on_state) as client:
        first_expiry = client.expires_at
        assert first_expiry is not None and first_expiry <= time.time() + 2
        async with asyncio.timeout(5):
            while client.expires_at == first_expiry:
                await asyncio.sleep(0.05)
        assert client.expires_at is not None and client.expires_at > time.time() + 30
        await asyncio.sleep(max(0.0, first_expiry + 0.5 - time.time()))  # past the first token
        async with Publisher(amqp_url) as publisher:
            published = await publisher.publish("still here", user=user)
        (notification,) = await take(client, 1)
        assert notification.id == published
    assert minted == [2, 60]
    # Refreshed in place: the same connection throughout, never 4010.
    assert [e.state for e in events] == [State.CONNECTING, State.OPEN, State.CLOSED]


async def test_a_static_token_that_expires_stops_the_client_with_4010(
    make_server: ServerFactory,
) -> None:
    server = await make_server(ws={"refresh_before": 1.0}, auth={"leeway": 0})
    client = await Client(server.ws_url, token=token(new_user(), ttl=2)).connect()
    with pytest.raises(ConnectionClosed) as closed:
        await take(client, 1, timeout=10)
    assert closed.value.code == 4010 and client.state is State.CLOSED


# --- two replicas, shared stream history -----------------------------------------------------


@pytest.fixture
async def replicas(
    processes: Callable[..., ServerProcess],
) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    env = {"NOTIFYD_HISTORY_BACKEND": "stream", "NOTIFYD_SERVER_DRAIN_SECONDS": "0.3"}
    pair = processes(**env), processes(**env)
    await asyncio.gather(*(p.wait() for p in pair))
    yield pair


async def test_drain_moves_the_client_to_the_other_replica_without_loss_or_duplicates(
    replicas: tuple[ServerProcess, ServerProcess], amqp_url: str
) -> None:
    replica_a, replica_b = replicas
    assert replica_a.process is not None
    user = new_user()
    reconnecting, gap_done = asyncio.Event(), asyncio.Event()
    calls = 0

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # the reconnect: hold it until the gap is published
            reconnecting.set()
            await gap_done.wait()
        return token(user)

    events, on_state = recorder()
    client = Client([replica_a.ws_url, replica_b.ws_url], token_factory=fetch, on_state=on_state)
    await client.connect(timeout=20)
    assert client.url == replica_a.ws_url
    expected: list[str] = []
    async with Publisher(amqp_url) as publisher:
        for n in range(5):
            expected.append(await publisher.publish({"n": n}, user=user))
        assert [n.id for n in await take(client, 5)] == expected

        replica_a.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(reconnecting.wait(), 20)
        # Published while the client has no socket anywhere: only the stream has it.
        gap = [(f"{user}-gap-{n}", {"event": "gap", "data": {"n": 5 + n}}) for n in range(5)]
        await asyncio.to_thread(
            pika_publish, amqp_url, f"user.{user}", [(body, mid) for mid, body in gap]
        )
        expected += [mid for mid, _ in gap]
        gap_done.set()

        got = await take(client, 5, timeout=20)
        assert client.url == replica_b.ws_url and client.resumed is True
        for n in range(10, 15):
            expected.append(await publisher.publish({"n": n}, user=user))
        got += await take(client, 5)
    assert [n.id for n in got] == expected[5:]
    assert [n.data["n"] for n in got] == list(range(5, 15))
    await silence(client)
    await client.close()

    # SIGTERM was sent once (a second one would interrupt the shutdown): it exits on its own.
    assert await asyncio.to_thread(replica_a.process.wait, 30) == 0
    lost = [e for e in events if e.state is State.RECONNECTING]
    assert [(e.code, e.url) for e in lost] == [(1001, replica_a.ws_url)]
    opened = [e for e in events if e.state is State.OPEN]
    assert [(e.url, e.resumed) for e in opened] == [
        (replica_a.ws_url, None),
        (replica_b.ws_url, True),
    ]


# --- notifyd listen --------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYD_")}


async def read_line(stream: asyncio.StreamReader, timeout: float = 20) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the stream ended"
    return line.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_listen_prints_json_lines_and_exits_cleanly(
    make_server: ServerFactory, amqp_url: str, sig: int
) -> None:
    server = await make_server()
    user, topic = new_user(), f"news{new_user()}"
    listen = await asyncio.create_subprocess_exec(
        *NOTIFYD, "listen", "--user", user, "--topic", topic, "--url", server.ws_url, "--secret", SECRET,
        env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert listen.stdout is not None and listen.stderr is not None
    try:
        ready = await read_line(listen.stderr)
        assert ready.startswith(f"notifyd listen: listening on {server.ws_url}"), ready
        async with Publisher(amqp_url) as publisher:
            to_user = await publisher.publish({"order": 1}, user=user, event="order.shipped")
            to_topic = await publisher.publish("headline", topic=topic)
        lines = [json.loads(await read_line(listen.stdout)) for _ in range(2)]
        assert lines[0] == {
            "id": to_user,
            "channel": f"user:{user}",
            "event": "order.shipped",
            "data": {"order": 1},
            "ts": lines[0]["ts"],
        }
        assert (lines[1]["id"], lines[1]["channel"], lines[1]["data"]) == (
            to_topic,
            f"topic:{topic}",
            "headline",
        )
        listen.send_signal(sig)
        assert await asyncio.wait_for(listen.wait(), 10) == 0
        assert await listen.stdout.read() == b""  # nothing half-written
    finally:
        if listen.returncode is None:
            listen.kill()
            await listen.wait()


async def test_listen_with_a_refused_token_exits_1(make_server: ServerFactory) -> None:
    server = await make_server()
    refused = await asyncio.create_subprocess_exec(
        *NOTIFYD, "listen", "--token", "not-a-jwt", "--url", server.ws_url,
        env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(refused.communicate(), 30)
    assert refused.returncode == 1 and out == b""
    assert "4001" in err.decode() and "Traceback" not in err.decode()


def test_listen_without_a_token_or_secret_exits_2() -> None:
    done = subprocess.run(
        [*NOTIFYD, "listen", "--user", "alice"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "needs --token, or an HS* secret" in done.stderr


# --- the README ------------------------------------------------------------------------------


def test_the_readme_section_matches_the_api() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("\n## Python client\n")
    section = readme[start : readme.index("\n## ", start + 1)]
    (example,) = re.findall(r"^```python\n(.*?)^```$", section, re.M | re.S)
    compile(example, "README.md", "exec")
    for name in re.findall(r"`(\w+)\(", section):
        if name not in ("Client", "ClientError", "ConnectionClosed", "StateEvent", "min"):
            assert callable(getattr(Client, name, None)), name
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    secret = re.search(r"^DEV_SECRET \?= (\S+)$", makefile, re.M)
    assert secret and f"--secret {secret.group(1)}" in section
