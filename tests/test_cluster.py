"""Issue 14: notifyd through the loss of RabbitMQ nodes, of queues, of the broker.

The first tests run on the shared single node: the stream reader's ack race, a
replica whose queue is gone, sockets sent elsewhere during an outage, node URLs in
the settings. The last ones start a 3-node cluster (``RabbitCluster``: the slow
part of the suite, ~2 minutes) and kill one node with SIGKILL while two replicas
serve clients that publish-confirmed notifications must reach, and count them.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import pytest

from notifyd.config import from_mapping, load, redacted
from notifyd.devbroker import RabbitCluster, RabbitNode
from notifyd.errors import ConfigError

from .conftest import (
    AmqpPublisher,
    Server,
    ServerFactory,
    collect_ids,
    expect_close,
    new_user,
    receive_until,
)

STREAM = {"backend": "stream"}


# --- settings -------------------------------------------------------------------------


def test_urls_replace_url_and_are_redacted() -> None:
    nodes = ["amqp://u:pw@rabbit-0:5672/", "amqp://u:pw@rabbit-1:5672/"]
    settings = load(environ={"NOTIFYD_AMQP_URLS": ",".join(nodes)})
    assert settings.amqp.node_urls == tuple(nodes)
    assert redacted(settings)["amqp"]["urls"] == (
        "amqp://u:***@rabbit-0:5672/",
        "amqp://u:***@rabbit-1:5672/",
    )
    # Without urls, the documented single-node key is the one used.
    single = load(environ={"NOTIFYD_AMQP_URL": "amqp://u:pw@rabbit:5672/"})
    assert single.amqp.node_urls == ("amqp://u:pw@rabbit:5672/",)
    assert load(environ={}).amqp.queue_type == "quorum"


@pytest.mark.parametrize(
    ("amqp", "message"),
    [
        ({"urls": ["amqp://a/", "http://u:secret@b/"]}, "[amqp] urls: 'http://u:***@b/' is not"),
        ({"queue_type": "stream"}, "[amqp] queue_type: must be 'quorum' or 'classic'"),
        ({"close_sockets_after": -1}, "[amqp] close_sockets_after: must be >= 0"),
    ],
)
def test_bad_amqp_settings_name_the_key(amqp: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        from_mapping({"amqp": amqp})
    assert message in str(raised.value) and "secret" not in str(raised.value)


# --- one node -------------------------------------------------------------------------


async def _metric(server: Server, name: str) -> float:
    async with server.http.get(server.base + "/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_resuming_again_and_again_under_traffic_keeps_the_connection(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    """Issue 14: the stream reader acked after its marker arrived, racing the close of
    its channel; RabbitMQ then closed the replica's whole connection (504 CHANNEL_ERROR)
    and the resumes still reading answered ``resumed: false``. It shows when traffic
    follows the marker into the stream, as it always does in production."""
    server = await make_server(history=STREAM)
    connection = server.gateway.broker.connection
    user = new_user()
    stop = asyncio.Event()

    async def traffic() -> None:
        # Other users' notifications, all the time: each read's stream goes on past
        # its marker while the reader closes its channel.
        count = 0
        while not stop.is_set():
            await asyncio.gather(
                *(amqp.send(f"user.{new_user()}", {"data": count}) for _ in range(20))
            )
            count += 1
            await asyncio.sleep(0.05)

    publisher = asyncio.create_task(traffic())
    try:
        for n in range(40):
            since, since_ts = f"{user}-{n}", int(time.time() * 1000)
            await amqp.send(f"user.{user}", {"data": n}, message_id=since)
            ws, welcome = await server.connect(user, since=since, since_ts=since_ts)
            assert welcome["resumed"] is True, welcome
            await ws.close()
    finally:
        stop.set()
        await publisher
    assert server.gateway.broker.connection is connection, "the replica's connection was lost"
    assert await _metric(server, "notifyd_broker_reconnects_total") == 0


async def test_a_lost_replica_queue_is_recovered_from_the_stream(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    """The queue is deleted under a replica while notifications keep coming: what was
    routed while it had none is read from the stream before it consumes again."""
    server = await make_server(history=STREAM, amqp={"reconnect_min": 2.0, "reconnect_max": 2.0})
    user = new_user()
    ws, _ = await server.connect(user)
    ids = [f"{user}-{n}" for n in range(600)]
    gateway = server.gateway
    reconnects = await _metric(server, "notifyd_broker_reconnects_total")

    async def delete_midway() -> None:
        while gateway.hub.last_seq < 50:
            await asyncio.sleep(0.01)
        # Deleted by an operator, or expired: the consumer is cancelled and the
        # replica reconnects 2 s later to no queue; ~2 s of traffic is only in the stream.
        await amqp.channel.queue_delete(gateway.broker.queue_name)

    deleter = asyncio.create_task(delete_midway())
    for start in range(0, len(ids), 10):
        await asyncio.gather(
            *(amqp.send(f"user.{user}", {"data": i}, message_id=i) for i in ids[start : start + 10])
        )
        await asyncio.sleep(0.03)
    await deleter
    received = await collect_ids(ws, len(ids), timeout=30)
    assert received == ids  # every one, once, in order
    await server.wait_ready()
    assert await _metric(server, "notifyd_broker_reconnects_total") > reconnects


async def test_sockets_are_sent_elsewhere_when_the_broker_stays_away(
    make_server: ServerFactory, rabbit: RabbitNode
) -> None:
    server = await make_server(
        amqp={"close_sockets_after": 1.0, "reconnect_min": 4.0, "reconnect_max": 4.0}
    )
    ws, _ = await server.connect(new_user())
    cutter = asyncio.create_task(asyncio.to_thread(rabbit.close_connections, "outage by test"))
    assert await expect_close(ws, timeout=10) == 1001
    # Timed from the gateway itself: rabbitmqctl returns well after the cut happened.
    since = server.gateway.broker.disconnected_since
    assert since is not None and 1.0 <= time.monotonic() - since < 2.0
    await cutter
    # Until the broker is back, new sockets are told to go elsewhere too.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await server.connect(new_user())
    assert refused.value.status == 503
    async with server.http.get(server.base + "/readyz") as response:
        assert response.status == 503
    await server.wait_ready(timeout=15)
    ws, _ = await server.connect(new_user())
    await ws.send_json({"type": "ping"})
    assert await receive_until(ws, "pong") == {"type": "pong"}


async def test_a_stopped_replica_deletes_its_queue(
    make_server: ServerFactory, amqp: AmqpPublisher
) -> None:
    """Left to expire, a quorum queue still bound crashes publishers' channels on
    RabbitMQ 3.10: a replica that stops deletes its own queue."""
    server = await make_server()
    name = server.gateway.broker.queue_name
    await server.test_server.close()
    channel = await amqp.connection.channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await channel.declare_queue(name, passive=True)


# --- a 3-node cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with RabbitCluster(3) as nodes:
        yield nodes


def _leaders(node: RabbitNode, vhost: str) -> dict[str, str]:
    """``{queue: node name of its leader}`` for the quorum queues and streams in ``vhost``."""
    listed = node.ctl(
        "list_queues", "-p", vhost, "name", "leader", "--formatter", "json", "--silent"
    )
    return {row["name"]: row["leader"] for row in json.loads(listed) if row["leader"]}


async def _longest_unready(gateway: Any, stop: asyncio.Event) -> float:
    """The longest time ``gateway`` was not ready while this ran (sampled every 20 ms)."""
    longest, since = 0.0, None
    while not stop.is_set():
        now = time.monotonic()
        if gateway.ready:
            since = None
        elif since is None:
            since = now
        else:
            longest = max(longest, now - since)
        await asyncio.sleep(0.02)
    return longest


@dataclass
class Client:
    """One user's socket, moving to the other replica whenever it is closed."""

    user: str
    replica: int
    #: Notification id -> monotonic time of its (first) arrival.
    received: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    closes: list[int] = field(default_factory=list)
    not_resumed: int = 0
    last: dict[str, Any] | None = None

    async def run(self, replicas: list[Server], stop: asyncio.Event) -> None:
        while not stop.is_set():
            server = replicas[self.replica]
            since = self.last
            try:
                ws, welcome = await server.connect(
                    self.user,
                    since=since["id"] if since else None,
                    since_ts=since["ts"] if since else None,
                )
            except (aiohttp.ClientError, AssertionError, TimeoutError):
                self.replica = 1 - self.replica
                await asyncio.sleep(random.uniform(0.05, 0.3))
                continue
            if since is not None and welcome.get("resumed") is not True:
                self.not_resumed += 1
            await self._read(ws, stop)
            if stop.is_set():
                await ws.close()
                return
            if not ws.closed:
                await ws.close()
            self.closes.append(ws.close_code or 1006)
            # As the JS client does: reconnect (here: to the other replica) with jitter.
            self.replica = 1 - self.replica
            await asyncio.sleep(random.uniform(0.05, 0.3))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                message = await ws.receive(timeout=0.2)
            except TimeoutError:
                continue
            if message.type != aiohttp.WSMsgType.TEXT:
                return
            body = json.loads(message.data)
            if body["type"] != "notification":
                continue
            if body["id"] in self.received:
                self.duplicates += 1
            else:
                self.received[body["id"]] = time.monotonic()
            self.last = body


class ConfirmingPublisher:
    """A backend: aio-pika with publisher confirms and a message_id on every message."""

    def __init__(self, url: str) -> None:
        self.url = url
        #: message id -> (user, monotonic time the publish started)
        self.sent: dict[str, tuple[str, float]] = {}
        self.confirmed: set[str] = set()

    async def run(self, users: list[str], rate: float, stop: asyncio.Event) -> None:
        connection = await aio_pika.connect(self.url)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("notifyd")
        pending: set[asyncio.Task[None]] = set()
        count = 0
        try:
            while not stop.is_set():
                user = users[count % len(users)]
                message_id = f"{user}-{count}"
                count += 1
                task = asyncio.create_task(self._publish(exchange, user, message_id))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(1 / rate)
            if pending:
                await asyncio.wait(pending, timeout=30)
        finally:
            await connection.close()

    async def _publish(self, exchange: Any, user: str, message_id: str) -> None:
        self.sent[message_id] = (user, time.monotonic())
        message = aio_pika.Message(
            json.dumps({"data": message_id}).encode(),
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"notifyd-published-ms": int(time.time() * 1000)},
        )
        try:
            await asyncio.wait_for(exchange.publish(message, f"user.{user}"), 30)
        except (aio_pika.exceptions.AMQPError, TimeoutError, ConnectionError, RuntimeError):
            return  # not confirmed: not promised either
        self.confirmed.add(message_id)


#: Kill targets: the node that holds what the name says for replica A. The last one
#: is the issue's second row: a classic notifyd.dead from an older notifyd, on the node
#: that carries A's connection (its reconnect was blocked for 74 s by declaring it).
SCENARIOS = [
    "queue",
    "connection",
    "queue_and_connection",
    "stream_leader",
    "connection_and_classic_dead_letters",
]


@pytest.mark.cluster
@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", SCENARIOS)
async def test_losing_one_node_loses_nothing(
    target: str, cluster: RabbitCluster, make_server: ServerFactory
) -> None:
    """Two replicas with the stream history, 40 clients, 60 confirmed notifications
    a second; one node is killed with SIGKILL. Every confirmed notification reaches
    its user once, within 5 s; sockets stay or are closed with 1001 and resume."""
    nodes = cluster.nodes
    # A vhost of its own: its streams, notifyd.dead and queues are placed afresh.
    vhost = f"c-{uuid.uuid4().hex[:8]}"
    nodes[0].ctl("add_vhost", vhost)
    nodes[0].ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    amqp = {"reconnect_min": 0.3, "reconnect_max": 2.0, "close_sockets_after": 2.0,
            "queue_expires": 60}  # fmt: skip
    server_settings: dict[str, Any] = {"history": STREAM, "ws": {"binding_grace": 30.0}}

    def urls_from(first: RabbitNode) -> list[str]:
        start = nodes.index(first)
        return [node.amqp_url + vhost for node in nodes[start:] + nodes[:start]]

    async def declare(node: RabbitNode, queue: str, arguments: dict[str, Any]) -> None:
        # Placed by RabbitMQ: classic queues on this node, quorum queues and streams
        # where it sees fit (the test reads where they are).
        connection = await aio_pika.connect(node.amqp_url + vhost)
        await (await connection.channel()).declare_queue(queue, durable=True, arguments=arguments)
        await connection.close()

    if target == "connection_and_classic_dead_letters":
        await declare(nodes[0], "notifyd.dead", {})  # as an older notifyd did
    # Replica B first: it declares the streams (RabbitMQ places their leaders).
    replica_b = await make_server(amqp={**amqp, "urls": urls_from(nodes[2])}, **server_settings)
    stream_node = cluster.node_named(_leaders(nodes[0], vhost)["notifyd.history"])
    # Replica A: its queue declared first (RabbitMQ places its leader), then A
    # connected to another node, or to the same one.
    replica_id = f"cluster-{uuid.uuid4().hex[:8]}"
    queue = f"notifyd.replica.{replica_id}"
    await declare(nodes[1], queue, {"x-queue-type": "quorum", "x-expires": 60_000})
    queue_node = cluster.node_named(_leaders(nodes[0], vhost)[queue])
    if target == "connection_and_classic_dead_letters":
        connect_node = nodes[0]  # where notifyd.dead is
    elif target == "queue_and_connection":
        connect_node = queue_node
    else:  # apart from the queue's leader, and from the streams' if there is a node left
        apart = [node for node in nodes if node is not queue_node]
        connect_node = next((n for n in apart if n is not stream_node), apart[0])
    replica_a = await make_server(
        amqp={**amqp, "urls": urls_from(connect_node), "replica_id": replica_id},
        **server_settings,
    )
    replicas = [replica_a, replica_b]
    assert replica_a.gateway.broker.current_url == connect_node.amqp_url + vhost
    leaders = _leaders(nodes[0], vhost)
    victim = {
        "queue": queue_node,
        "connection": connect_node,
        "queue_and_connection": connect_node,
        "stream_leader": stream_node,
        "connection_and_classic_dead_letters": connect_node,
    }[target]
    assert leaders[queue] == queue_node.nodename  # A declared it with the same arguments
    held = sorted(
        [name.removeprefix("notifyd.") for name, leader in leaders.items()
         if leader == victim.nodename]
        + [f"connection of {label}" for label, replica in (("A", replica_a), ("B", replica_b))
           if replica.gateway.broker.current_url.startswith(victim.amqp_url)]
        + (["dead (classic)"] if target == "connection_and_classic_dead_letters" else [])
    )  # fmt: skip

    clients = [Client(new_user("c"), index % 2) for index in range(40)]
    stop_clients, stop_publishing = asyncio.Event(), asyncio.Event()
    client_tasks = [asyncio.create_task(c.run(replicas, stop_clients)) for c in clients]
    watchers = [asyncio.create_task(_longest_unready(r.gateway, stop_clients)) for r in replicas]
    await asyncio.sleep(1.0)  # every client welcomed (and bound)
    publisher = ConfirmingPublisher(next(n for n in nodes if n is not victim).amqp_url + vhost)
    publishing = asyncio.create_task(
        publisher.run([c.user for c in clients], rate=60, stop=stop_publishing)
    )
    by_user = {c.user: c for c in clients}
    try:
        await asyncio.sleep(2.0)
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(8.0)
        stop_publishing.set()
        await publishing
        # Everything confirmed arrives; give late ones time to show how late they are.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
            i not in by_user[publisher.sent[i][0]].received for i in publisher.confirmed
        ):
            await asyncio.sleep(0.2)
    finally:
        stop_clients.set()
        await asyncio.gather(*client_tasks)
        unready = [await watcher for watcher in watchers]
        await asyncio.to_thread(victim.start)

    lost = [i for i in publisher.confirmed if i not in by_user[publisher.sent[i][0]].received]
    delays = [
        by_user[user].received[i] - sent_at
        for i, (user, sent_at) in publisher.sent.items()
        if i in publisher.confirmed and i in by_user[user].received
    ]
    duplicates = sum(c.duplicates for c in clients)
    closes = [code for c in clients for code in c.closes]
    not_resumed = sum(c.not_resumed for c in clients)
    print(
        f"\n| {target}: {', '.join(held)} | A unready {unready[0]:.1f} s, B {unready[1]:.1f} s; "
        f"{len(closes)} sockets closed {sorted(set(closes))}, {not_resumed} not resumed "
        f"| {len(publisher.confirmed)} | {len(lost)} | {duplicates} | {max(delays):.2f} s |"
    )
    assert publisher.confirmed and len(delays) == len(publisher.confirmed) - len(lost)
    assert not lost, f"{len(lost)} confirmed notifications lost"
    assert duplicates == 0
    assert set(closes) <= {1001}, closes
    assert not_resumed == 0
    assert max(delays) <= 5.0, max(delays)
