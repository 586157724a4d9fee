"""Issue 16, parts 3-5, with two replica processes on the real RabbitMQ.

Presence across replicas (query, transitions on ``notifyd.presence``, ``presence:<id>``
subscriptions), the admin API (``/api/disconnect``, ``/api/revoke``, ``/api/stats``)
and the per-user connection limit summed over the replicas.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .conftest import SERVICE_KEY, ServerProcess, new_user, token

#: Fast beacons and a short grace, so that the tests need not wait long.
ENV = {
    "NOTIFYD_CLUSTER_BEACON_INTERVAL": "0.5",
    "NOTIFYD_WS_BINDING_GRACE": "1",
    "NOTIFYD_WS_HEARTBEAT": "0",
    "NOTIFYD_SERVER_DRAIN_SECONDS": "0.2",
    # This machine is shared with other test runs: an answer late by a scheduling
    # hiccup is not what these tests are about (the timing is measured on its own).
    "NOTIFYD_CLUSTER_QUERY_TIMEOUT": "1",
}
KEY = {"Authorization": f"Bearer {SERVICE_KEY}"}

Processes = Callable[..., ServerProcess]


async def replicas(processes: Processes, count: int = 2, **env: str) -> list[ServerProcess]:
    """``count`` replica processes, ready and each known to the others."""
    started = [processes(**{**ENV, **env}) for _ in range(count)]
    await asyncio.gather(*(p.wait() for p in started))
    await until_stats(started, lambda stats: stats["total"]["replicas"] == count)
    return started


def replica_id(process: ServerProcess) -> str:
    return process.env["NOTIFYD_AMQP_REPLICA_ID"]


async def api(
    process: ServerProcess, method: str, path: str, body: Any = None, headers: Any = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            process.base + path,
            json=body,
            headers=KEY if headers is None else headers,
        ) as response,
    ):
        return response.status, await response.json()


async def until_stats(
    started: list[ServerProcess], done: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """Poll /api/stats on every replica until ``done`` holds for all of them."""
    deadline = time.monotonic() + timeout
    while True:
        answers = [await api(p, "GET", "/api/stats") for p in started]
        if all(status == 200 and done(stats) for status, stats in answers):
            return answers[0][1]  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, answers
        await asyncio.sleep(0.1)


async def open_socket(
    process: ServerProcess, user: str, stack: AsyncExitStack, **claims: Any
) -> ClientConnection:
    """An authenticated socket (``websockets`` client) past its welcome."""
    ws = await stack.enter_async_context(
        connect(
            process.ws_url,
            additional_headers={"Authorization": f"Bearer {token(user, **claims)}"},
            subprotocols=["notifyd.v1"],  # type: ignore[list-item]
        )
    )
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome", welcome
    return ws


async def close_code(ws: ClientConnection, timeout: float = 5) -> int | None:
    """Read until the server closes the socket; its close code."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            pass
    return ws.close_code


async def still_open(ws: ClientConnection) -> bool:
    try:
        await ws.send(json.dumps({"type": "ping"}))
        while json.loads(await asyncio.wait_for(ws.recv(), 2))["type"] != "pong":
            pass
    except (ConnectionClosed, TimeoutError):
        return False
    return True


@pytest.fixture
async def transitions(amqp_url: str) -> AsyncIterator[Callable[[str], asyncio.Queue[Any]]]:
    """A consumer of ``notifyd.presence`` as a backend would write it: ``watch(user)``
    binds ``user.<user>`` and returns the queue of bodies it receives."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        "notifyd.presence", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    received: dict[str, asyncio.Queue[Any]] = {}

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        received.setdefault(body["user"], asyncio.Queue()).put_nowait(body)

    await queue.consume(on_message, no_ack=True)

    def watch(user: str) -> asyncio.Queue[Any]:
        asyncio.get_running_loop().create_task(queue.bind(exchange, f"user.{user}"))
        return received.setdefault(user, asyncio.Queue())

    yield watch
    await connection.close()


async def test_presence_query_across_two_replicas_and_its_time(processes: Processes) -> None:
    a, b = await replicas(processes)
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    async with AsyncExitStack() as stack:
        for process, user in ((a, alice), (a, alice), (b, alice), (b, bob)):
            await open_socket(process, user, stack)
        query = f"/api/presence?user={alice}&user={bob}&user={carol}"
        expected = {
            alice: {"online": True, "sockets": 3},
            bob: {"online": True, "sockets": 1},
            carol: {"online": False},
        }
        for process in (a, b):
            status, body = await api(process, "GET", query)
            assert status == 200, body
            assert body == {"users": expected, "partial": False}

        # The time a backend waits for an answer over HTTP, merged from both replicas.
        times = []
        async with aiohttp.ClientSession(headers=KEY) as http:
            for _ in range(50):
                started = time.perf_counter()
                async with http.get(a.base + query) as response:
                    assert (await response.json()) == {"users": expected, "partial": False}
                times.append(time.perf_counter() - started)
        times.sort()
        median, p90, worst = times[len(times) // 2], times[len(times) * 9 // 10], times[-1]
        print(f"\npresence query, 2 replicas, 3 users, over HTTP: median {median * 1000:.1f} "
              f"ms, p90 {p90 * 1000:.1f} ms, max {worst * 1000:.1f} ms ({len(times)} queries)")  # fmt: skip
        assert median < 0.1, times
        # Inside notifyd (from publishing the query to the last answer), from /metrics.
        async with aiohttp.ClientSession() as http, http.get(a.base + "/metrics") as response:
            scraped = await response.text()
        total = count = 0.0
        for line in scraped.splitlines():
            if line.startswith('notifyd_cluster_query_seconds_sum{kind="presence"}'):
                total = float(line.split()[-1])
            elif line.startswith('notifyd_cluster_query_seconds_count{kind="presence"}'):
                count = float(line.split()[-1])
        assert count >= len(times)
        print(f"presence query inside notifyd: mean {total / count * 1000:.1f} ms")

    # Closed sockets are gone from the answer at once (no grace for the query).
    await asyncio.sleep(0.2)
    status, body = await api(b, "GET", f"/api/presence?user={alice}")
    assert body["users"] == {alice: {"online": False}}


async def test_presence_and_admin_requests_are_checked(processes: Processes) -> None:
    (a,) = await replicas(processes, count=1)
    for method, path in (("GET", "/api/presence?user=x"), ("GET", "/api/stats")):
        status, body = await api(a, method, path, headers={})
        assert (status, body["error"]) == (401, "unauthorized")
    for method, path in (("POST", "/api/disconnect"), ("POST", "/api/revoke")):
        status, body = await api(a, method, path, {}, headers={"Authorization": "Bearer nope"})
        assert (status, body["error"]) == (401, "unauthorized")
    bad: list[tuple[str, str, Any]] = [
        ("GET", "/api/presence", None),
        ("GET", "/api/presence?user=a*", None),
        ("GET", "/api/presence?" + "&".join(f"user=u{n}" for n in range(501)), None),
        ("POST", "/api/disconnect", {"user": "a b"}),
        ("POST", "/api/disconnect", ["x"]),
        ("POST", "/api/revoke", {"jti": []}),
        ("POST", "/api/revoke", {"jti": ["x" * 129]}),
        ("POST", "/api/revoke", {"jti": "x", "until": time.time() - 1}),
        ("POST", "/api/revoke", {"jti": "x", "until": "tomorrow"}),
    ]
    for method, path, payload in bad:
        status, body = await api(a, method, path, payload)
        assert status == 400 and body["error"] in {"bad_query", "bad_body"}, (path, payload, body)


async def test_transitions_are_published_once_per_cluster_wide_change(
    processes: Processes, transitions: Callable[[str], asyncio.Queue[Any]]
) -> None:
    a, b = await replicas(processes)
    alice = new_user("alice")
    events = transitions(alice)
    await asyncio.sleep(0.2)  # the test consumer's binding
    async with AsyncExitStack() as first:
        await open_socket(a, alice, first)
        online = await asyncio.wait_for(events.get(), 5)
        assert (online["user"], online["online"]) == (alice, True)
        assert abs(online["ts"] / 1000 - time.time()) < 5
        async with AsyncExitStack() as second:
            await open_socket(b, alice, second)  # already online: nothing
            await open_socket(a, alice, second)
        await asyncio.sleep(1.5)  # longer than the grace: alice still has a socket on A
        assert events.empty(), events.get_nowait()
    left = time.monotonic()
    offline = await asyncio.wait_for(events.get(), 5)
    assert (offline["user"], offline["online"]) == (alice, False)
    # After binding_grace (1 s) and not much later.
    assert 0.9 <= time.monotonic() - left < 2.5
    await asyncio.sleep(1.5)
    assert events.empty(), events.get_nowait()

    # Moving from one replica to the other within the grace is no transition at all.
    async with AsyncExitStack() as stack:
        await open_socket(b, alice, stack)
        assert (await asyncio.wait_for(events.get(), 5))["online"] is True
    async with AsyncExitStack() as stack:
        await open_socket(a, alice, stack)
        await asyncio.sleep(1.5)
    assert (await asyncio.wait_for(events.get(), 5))["online"] is False
    await asyncio.sleep(0.5)
    assert events.empty(), events.get_nowait()


async def test_a_replica_that_dies_takes_its_users_offline(
    processes: Processes, transitions: Callable[[str], asyncio.Queue[Any]]
) -> None:
    first, second = await replicas(processes)
    users = {process: new_user() for process in (first, second)}
    queues = {process: transitions(user) for process, user in users.items()}
    await asyncio.sleep(0.2)
    async with AsyncExitStack() as stack:
        for process, user in users.items():
            await open_socket(process, user, stack)
            assert (await asyncio.wait_for(queues[process].get(), 5))["online"] is True
        # The hard case: the replica that publishes the transitions dies with its users.
        # The other takes over, reads back who was online, and sees they are not.
        aggregating = [await gauge(p, "notifyd_presence_aggregating") for p in (first, second)]
        assert sorted(aggregating) == [0, 1], aggregating
        a, b = (first, second) if aggregating[0] else (second, first)
        a.kill()
        offline = await asyncio.wait_for(queues[a].get(), 10)
        assert (offline["user"], offline["online"]) == (users[a], False)
        await asyncio.sleep(1)
        assert queues[b].empty()
        status, body = await api(b, "GET", "/api/stats")
        assert (status, body["total"]["replicas"]) == (200, 1)


async def gauge(process: ServerProcess, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(process.base + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


async def next_of(ws: ClientConnection, kind: str, timeout: float = 5) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while (message := json.loads(await ws.recv()))["type"] != kind:
            pass
    return message  # type: ignore[no-any-return]


async def test_presence_subscriptions_need_the_claim(processes: Processes) -> None:
    a, b = await replicas(processes)
    alice, bob, carol = new_user("alice"), new_user("bob"), new_user("carol")
    async with AsyncExitStack() as stack:
        watcher = await open_socket(a, alice, stack, presence=[bob])
        await watcher.send(json.dumps({"type": "subscribe", "channel": f"presence:{carol}"}))
        refused = await next_of(watcher, "error")
        assert refused["code"] == "forbidden", refused
        await watcher.send(
            json.dumps({"type": "subscribe", "channel": f"presence:{bob}", "ref": 1})
        )
        assert await next_of(watcher, "subscribed") == {
            "type": "subscribed",
            "ref": 1,
            "channel": f"presence:{bob}",
        }
        # Without a presence claim at all, and with one that is not a list of ids.
        plain = await open_socket(b, carol, stack)
        await plain.send(json.dumps({"type": "subscribe", "channel": f"presence:{bob}"}))
        assert (await next_of(plain, "error"))["code"] == "forbidden"
        bad = await stack.enter_async_context(
            connect(
                a.ws_url,
                additional_headers={"Authorization": f"Bearer {token(carol, presence='x')}"},
            )
        )
        assert await close_code(bad) == 4001

        # Bob comes online on the other replica, and leaves.
        async with AsyncExitStack() as bobs:
            await open_socket(b, bob, bobs)
            online = await next_of(watcher, "notification")
        assert (online["channel"], online["event"]) == (f"presence:{bob}", "presence")
        assert online["data"]["user"] == bob and online["data"]["online"] is True
        assert isinstance(online["id"], str) and isinstance(online["ts"], int)
        offline = await next_of(watcher, "notification")
        assert offline["data"] == {"user": bob, "online": False, "ts": offline["data"]["ts"]}
        assert offline["data"]["ts"] >= online["data"]["ts"] + 900  # after the grace

        # Unsubscribed: nothing more.
        await watcher.send(json.dumps({"type": "unsubscribe", "channel": f"presence:{bob}"}))
        assert (await next_of(watcher, "unsubscribed"))["channel"] == f"presence:{bob}"
        await watcher.send(json.dumps({"type": "unsubscribe", "channel": f"presence:{bob}"}))
        assert (await next_of(watcher, "error"))["code"] == "not_subscribed"
        async with AsyncExitStack() as bobs:
            await open_socket(a, bob, bobs)
            await asyncio.sleep(0.5)
        with pytest.raises(TimeoutError):
            await next_of(watcher, "notification", timeout=1.5)


async def test_disconnect_closes_the_users_sockets_on_every_replica(processes: Processes) -> None:
    a, b = await replicas(processes)
    alice, bob = new_user("alice"), new_user("bob")
    async with AsyncExitStack() as stack:
        on_a = await open_socket(a, alice, stack)
        on_b = await open_socket(b, alice, stack)
        other = await open_socket(b, bob, stack)
        status, body = await api(a, "POST", "/api/disconnect", {"user": alice})
        assert (status, body) == (202, {"user": alice, "status": "accepted"})
        assert await close_code(on_a) == 4003
        assert await close_code(on_b) == 4003
        assert await still_open(other)
        # A new socket is welcome: a disconnect is not a ban (that is /api/revoke).
        assert await still_open(await open_socket(b, alice, stack))


async def test_revoke_refuses_a_token_everywhere_also_on_a_later_replica(
    processes: Processes,
) -> None:
    a, b = await replicas(processes)
    alice = new_user("alice")
    jti, other = f"jti-{uuid.uuid4().hex}", f"jti-{uuid.uuid4().hex}"
    async with AsyncExitStack() as stack:
        on_a = await open_socket(a, alice, stack, jti=jti)
        on_b = await open_socket(b, alice, stack, jti=jti)
        kept = await open_socket(b, alice, stack, jti=other)
        until = int(time.time()) + 600
        status, body = await api(a, "POST", "/api/revoke", {"jti": [jti], "until": until})
        assert (status, body) == (200, {"jti": [jti], "until": until, "status": "revoked"})
        assert await close_code(on_a) == 4001
        assert await close_code(on_b) == 4001
        assert await still_open(kept)

    later = processes(**ENV)
    await later.wait()
    for process in (a, b, later):
        async with AsyncExitStack() as stack:
            ws = await stack.enter_async_context(
                connect(
                    process.ws_url,
                    additional_headers={"Authorization": f"Bearer {token(alice, jti=jti)}"},
                )
            )
            assert await close_code(ws) == 4001, process
            assert await still_open(await open_socket(process, alice, stack, jti=other))


async def test_stats_per_replica_and_in_total(processes: Processes) -> None:
    a, b = await replicas(processes)
    alice, bob = new_user("alice"), new_user("bob")
    async with AsyncExitStack() as stack:
        for process, user in ((a, alice), (a, bob), (a, bob), (b, alice)):
            await open_socket(process, user, stack)
        expected = {
            "replicas": {
                replica_id(a): {"connections": 3, "users": 2},
                replica_id(b): {"connections": 1, "users": 1},
            },
            # Alice on both replicas is one user online.
            "total": {"replicas": 2, "connections": 4, "users": 2, "users_exact": True},
            "partial": False,
        }
        assert await until_stats([a, b], lambda stats: stats == expected) == expected


async def test_the_per_user_limit_holds_for_the_sum_over_replicas(processes: Processes) -> None:
    a, b = await replicas(processes, NOTIFYD_WS_MAX_CONNECTIONS_PER_USER="1")
    alice = new_user("alice")
    async with AsyncExitStack() as stack:
        first = await open_socket(a, alice, stack)
        await asyncio.sleep(0.3)  # the first socket is known cluster-wide
        second = await open_socket(b, alice, stack)  # welcomed: B alone holds none
        started = time.monotonic()
        assert await close_code(second, timeout=1) == 4003
        print(f"\nlimit overshoot corrected in {time.monotonic() - started:.3f}s")
        assert await still_open(first)
        # The same on one replica is refused at once, as before.
        ws = await stack.enter_async_context(
            connect(a.ws_url, additional_headers={"Authorization": f"Bearer {token(alice)}"})
        )
        assert await close_code(ws) == 4003
        assert await still_open(first)
