"""What the replicas of one cluster tell each other, through RabbitMQ.

:class:`ClusterLink` gets channels of its own on the broker's connection (a
:attr:`notifyd.broker.Broker.on_connected` hook) and uses them for:

* **Beacons and queries** on the fanout exchange ``notifyd.cluster``: each
  replica process binds an exclusive, auto-delete queue ``notifyd.cluster.<instance>``
  to it and sends a beacon every ``[cluster] beacon_interval`` seconds, so every
  replica knows which are alive. A query (presence of some users, stats) is
  published there with ``reply_to = amq.rabbitmq.reply-to`` (RabbitMQ's direct
  reply-to: no reply queue to declare); every replica answers with its own
  numbers and the asker merges the answers until every live replica has answered
  or ``[cluster] query_timeout`` passes (then the answer says ``partial``).
* **Presence transitions and the cluster-wide per-user limit**: whenever the
  sockets of some users change on a replica, it sends their state there
  (``[sockets, newest]`` per user, batched every ``FLUSH_DELAY``) to the durable
  queue ``notifyd.presence.deltas``, declared with ``x-single-active-consumer``:
  every replica consumes it and RabbitMQ delivers to one at a time. That one
  folds the reports into a :class:`notifyd.presence.PresenceAggregator`,
  publishes each cluster-wide transition once to the topic exchange
  ``notifyd.presence`` (key ``user.<id>``, body ``{"user","online","ts"}``), and
  tells a replica to close its newest sockets of a user over the limit (4003).
  When a replica becomes the active consumer (the previous one stopped or lost
  its connection), it first rebuilds the state with a query to every replica.
* **``presence:<id>`` subscriptions**: while sockets here watch a user, this
  replica's cluster queue is bound to ``notifyd.presence`` with ``user.<id>``,
  and each transition is written to them as a notification.
* **Admin commands** (``/api/disconnect``, ``/api/revoke``): control messages
  published with confirms to ``notifyd`` (key ``control``), which every replica
  consumes and the stream ``notifyd.revocations`` keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiormq
from aio_pika.abc import AbstractConnection
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from . import frames
from .amqp import (
    CLUSTER_EXCHANGE,
    CONTROL_ROUTING_KEY,
    DELTAS_QUEUE,
    EXCHANGE,
    PRESENCE_EXCHANGE,
    PRESENCE_LOG,
    PUBLISHED_AT_HEADER,
    Delivery,
)
from .broker import (
    FRAMES_PER_WRITE,
    channel_number,
    declare_queue,
    max_content_size,
    send_frames,
)
from .closes import CloseReason
from .errors import BrokerUnavailable
from .metrics import Metrics
from .presence import (
    PresenceAggregator,
    ReplicaTable,
    Transition,
    Trim,
    UserState,
    merge_presence,
    merge_stats,
)
from .protocol import Channel, IdGenerator, JSONDecodeError, dumps, loads, notification
from .revocations import stream_arguments
from .websocket import text_frame

log = logging.getLogger(__name__)

#: What a failed publish raises (turned into BrokerUnavailable).
_PUBLISH_ERRORS: Final = (aiormq.AMQPError, ConnectionError, RuntimeError, TimeoutError)

REPLY_TO: Final = "amq.rabbitmq.reply-to"
#: Milliseconds a report waits in the deltas queue for an aggregator (older ones are
#: stale: the next aggregator asks every replica anyway).
DELTAS_TTL_MS: Final = 10_000
#: Seconds local socket changes are gathered before one report goes out.
FLUSH_DELAY: Final = 0.02
#: Users per report (a full resend after a reconnect, or a disconnect wave, is cut
#: into these: encoding or folding 200 is ~1-2 ms, a pass of the event loop).
REPORT_CHUNK: Final = 200
#: Beacons a replica may miss before it is presumed gone.
MISSED_BEACONS: Final = 3
#: Seconds between the aggregator's looks at due offline transitions.
TICK: Final = 0.1
#: Seconds one publish (and its confirm, if asked for) may take.
PUBLISH_TIMEOUT: Final = 10.0
#: Seconds a rebuild query may take when this replica becomes the aggregator.
SNAPSHOT_TIMEOUT: Final = 5.0
#: Seconds reading ``notifyd.presence.log`` may take on a take-over.
LOG_READ_TIMEOUT: Final = 30.0
#: Put in the queue of reports to end the aggregating task.
_STOP: Final[dict[str, Any]] = {}
#: The event of a ``presence:<id>`` notification.
PRESENCE_EVENT: Final = "presence"


class Member(Protocol):
    """A socket as the cluster link sees it (a :class:`notifyd.connection.Connection`)."""

    user: str

    def write(self, frame: bytes, seq: int, now: float) -> bool: ...

    def close_soon(self, why: CloseReason) -> None: ...


class LocalHub(Protocol):
    """The replica's own numbers (a :class:`notifyd.hub.Hub`)."""

    @property
    def users_online(self) -> int: ...

    def __len__(self) -> int: ...

    def connections_of(self, user: str) -> int: ...


@dataclass
class QueryResult:
    """Answers of one cluster query, by replica id, and the replicas that did not answer."""

    answers: dict[str, dict[str, Any]]
    missing: list[str]
    seconds: float

    @property
    def partial(self) -> bool:
        return bool(self.missing)


@dataclass
class _Pending:
    expected: set[str]
    done: asyncio.Future[None]
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)


class ClusterLink:
    """This replica's part in the cluster (see the module docstring)."""

    def __init__(
        self,
        replica_id: str,
        hub: LocalHub,
        *,
        beacon_interval: float,
        query_timeout: float,
        grace: float,
        max_connections_per_user: int,
        queue_type: str = "quorum",
        presence_log_max_age: float = 86_400.0,
        ids: IdGenerator | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.metrics = metrics if metrics is not None else Metrics()
        transitions = self.metrics.presence_transitions
        self._transition_counters = (transitions.labels("online"), transitions.labels("offline"))
        #: This process; a restarted replica with the same id is another instance.
        self.instance = f"{replica_id}.{secrets.token_hex(4)}"
        self.queue_name = f"{CLUSTER_EXCHANGE}.{self.instance}"
        self.hub = hub
        self.beacon_interval = beacon_interval
        self.query_timeout = query_timeout
        self.queue_type = queue_type
        self.presence_log_max_age = presence_log_max_age
        self._connection: AbstractConnection | None = None
        self.ids = ids or IdGenerator()
        self.table = ReplicaTable(beacon_interval * MISSED_BEACONS)
        self.aggregator = PresenceAggregator(grace, max_connections_per_user)
        #: True while this replica is the active consumer of the deltas queue (and
        #: has rebuilt the state).
        self.aggregating = False
        self._rpc: RawChannel | None = None
        self._confirm: RawChannel | None = None
        self._pending: dict[str, _Pending] = {}
        #: user -> socket -> unix time it joined, in join order.
        self._opened: dict[str, dict[Member, float]] = {}
        #: Users whose state here changed since the last report.
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._seq = 0
        #: presence:<user> subscriptions: user -> sockets, and socket -> users.
        self._watchers: dict[str, set[Member]] = {}
        self._watching: dict[Member, set[str]] = {}
        self._bound: set[str] = set()
        self._bind_lock = asyncio.Lock()
        #: Deliveries of the deltas queue, for the aggregating task.
        self._deltas: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._heard: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        #: Called with (ticket id, expiry) when a replica announces a redeemed SSE ticket
        #: (notifyd.sse: single use across replicas).
        self.on_ticket: Callable[[str, float], None] | None = None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for coroutine in (self._beacons(), self._reports(), self._aggregate(), self._tick()):
            self._tasks.append(loop.create_task(coroutine))

    async def close(self) -> None:
        """Say goodbye (the aggregator starts the grace of this replica's users at
        once, the others stop waiting for its answers) and stop."""
        self._closing = True
        with contextlib.suppress(Exception):
            bye = dumps({"type": "bye", "instance": self.instance, "replica": self.replica_id})
            await asyncio.wait_for(self._publish(CLUSTER_EXCHANGE, "", bye), 2)
            await asyncio.wait_for(self._publish("", DELTAS_QUEUE, bye), 2)
        # Python 3.11's wait_for may swallow a cancel that races its result: the loops
        # also end on _closing, woken here, and a task still running is cancelled again.
        self._deltas.put_nowait(_STOP)
        self._dirty_event.set()
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1)
        self._tasks.clear()

    async def on_connected(self, connection: AbstractConnection) -> None:
        """Declare and consume what the cluster uses (a Broker hook, on each connect)."""
        self.aggregating = False
        self.metrics.presence_aggregating.set(0)
        confirm_channel = await connection.channel(publisher_confirms=True)
        confirm = await confirm_channel.get_underlay_channel()
        await confirm.exchange_declare(CLUSTER_EXCHANGE, exchange_type="fanout", durable=True)
        await confirm.exchange_declare(PRESENCE_EXCHANGE, exchange_type="topic", durable=True)
        await self._declare_deltas(connection)
        await self._declare_log(connection, confirm)
        self._connection = connection
        rpc_channel = await connection.channel(publisher_confirms=False)
        rpc = await rpc_channel.get_underlay_channel()
        await rpc.queue_declare(self.queue_name, exclusive=True, auto_delete=True)
        await rpc.queue_bind(self.queue_name, CLUSTER_EXCHANGE, routing_key="")
        self._bound.clear()
        for user in list(self._watchers):
            await rpc.queue_bind(
                self.queue_name, PRESENCE_EXCHANGE, routing_key=Channel("user", user).routing_key
            )
            self._bound.add(user)
        await rpc.basic_consume(REPLY_TO, self._on_reply, no_ack=True)
        await rpc.basic_consume(self.queue_name, self._on_cluster, no_ack=True)
        self._rpc, self._confirm = rpc, confirm
        # Last: once this replica is the active consumer, it queries the others.
        deltas_channel = await connection.channel(publisher_confirms=False)
        deltas = await deltas_channel.get_underlay_channel()
        # No acks: a delivery an aggregator dies with is in the next one's snapshot.
        await deltas.basic_consume(DELTAS_QUEUE, self._on_delta, no_ack=True)
        # A new connection (maybe after an outage the aggregator saw as a departure):
        # report every local user again, and say hello at once.
        self._dirty.update(self._opened)
        self._dirty_event.set()
        await self._beacon()

    async def _declare_deltas(self, connection: AbstractConnection) -> None:
        arguments: dict[str, Any] = {
            "x-single-active-consumer": True,
            # Reports nobody consumed for a while are stale: the next aggregator
            # asks every replica anyway.
            "x-message-ttl": DELTAS_TTL_MS,
        }
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        refused = await declare_queue(connection, DELTAS_QUEUE, arguments)
        if refused is not None:
            log.warning(
                "queue %s exists with other arguments (%s): used as it is", DELTAS_QUEUE, refused
            )

    async def _declare_log(self, connection: AbstractConnection, raw: RawChannel) -> None:
        refused = await declare_queue(
            connection, PRESENCE_LOG, stream_arguments(self.presence_log_max_age)
        )
        if refused is not None:
            log.warning(
                "stream %s exists with other arguments (%s): used as it is", PRESENCE_LOG, refused
            )
        await raw.queue_bind(PRESENCE_LOG, PRESENCE_EXCHANGE, routing_key="#")

    async def _read_log(self) -> set[str] | None:
        """The users whose last transition in ``notifyd.presence.log`` is online (None:
        it could not be read)."""
        from .broker import close_channel, read_to_marker

        last: dict[str, bool] = {}

        def handle(delivery: Delivery) -> None:
            try:
                body = loads(delivery.body)
            except JSONDecodeError:
                return
            if isinstance(body, dict) and isinstance(body.get("user"), str):
                last[body["user"]] = bool(body.get("online"))

        connection = self._connection
        if connection is None:
            return None
        try:
            channel = await connection.channel(publisher_confirms=False)
        except Exception as exc:
            log.warning("cluster: cannot read %s: %s", PRESENCE_LOG, exc)
            return None
        try:
            raw = await channel.get_underlay_channel()
            await asyncio.wait_for(
                read_to_marker(raw, PRESENCE_LOG, "first", handle, 1000), LOG_READ_TIMEOUT
            )
        except Exception as exc:
            log.warning("cluster: cannot read %s: %r", PRESENCE_LOG, exc)
            return None
        finally:
            await close_channel(channel)
        return {user for user, online in last.items() if online}

    # --- local sockets ----------------------------------------------------------------

    def socket_changed(self, member: Member, joined: bool) -> None:
        """A socket joined or left the hub (a hub hook)."""
        user = member.user
        if joined:
            sockets = self._opened.get(user)
            if sockets is None:
                sockets = self._opened[user] = {}
            sockets[member] = time.time()
        else:
            sockets = self._opened.get(user)
            if sockets is not None:
                sockets.pop(member, None)
                if not sockets:
                    del self._opened[user]
            self._unwatch_all(member)
        self._dirty.add(user)
        self._dirty_event.set()

    def _state_of(self, user: str) -> UserState:
        sockets = self._opened.get(user)
        if not sockets:
            return (0, 0.0)
        return (len(sockets), max(sockets.values()))

    async def _reports(self) -> None:
        """Send the state of changed users to the aggregator, batched."""
        while not self._closing:
            await self._dirty_event.wait()
            await asyncio.sleep(FLUSH_DELAY)
            self._dirty_event.clear()
            dirty, self._dirty = self._dirty, set()
            users = sorted(dirty)
            for start in range(0, len(users), REPORT_CHUNK):
                chunk = users[start : start + REPORT_CHUNK]
                self._seq += 1
                body = dumps({
                    "type": "state",
                    "instance": self.instance,
                    "replica": self.replica_id,
                    "seq": self._seq,
                    "users": {u: self._state_of(u) for u in chunk},
                })  # fmt: skip
                try:
                    await self._publish("", DELTAS_QUEUE, body, confirm=True)
                except BrokerUnavailable:
                    # Sent again with the full state once the connection is back.
                    self._dirty.update(users[start:])
                    break

    # --- beacons ----------------------------------------------------------------------

    async def _beacons(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.beacon_interval)
            with contextlib.suppress(BrokerUnavailable):
                await self._beacon()

    async def _beacon(self) -> None:
        now = time.time()
        body = dumps({
            "type": "beacon",
            "instance": self.instance,
            "replica": self.replica_id,
            "connections": len(self.hub),
            "users": self.hub.users_online,
            "ts": int(now * 1000),
        })  # fmt: skip
        # Its own beacon first: a query right after the connect expects this replica.
        self.table.seen(self.instance, self.replica_id, len(self.hub), self.hub.users_online, now)
        await self._publish(CLUSTER_EXCHANGE, "", body)
        # The aggregator's liveness comes from the same ordered queue as the reports.
        await self._publish("", DELTAS_QUEUE, body)

    # --- queries ----------------------------------------------------------------------

    async def query(self, kind: str, timeout: float | None = None, **fields: Any) -> QueryResult:
        """Ask every live replica (this one included); merge-ready answers by replica id."""
        started = time.monotonic()
        rpc = self._rpc
        if rpc is None or rpc.is_closed:
            raise BrokerUnavailable("not connected to RabbitMQ")
        now = time.time()
        self.table.expire(now)
        expected = set(self.table.live(now))
        expected.add(self.instance)
        correlation = secrets.token_hex(8)
        pending = _Pending(expected, asyncio.get_running_loop().create_future())
        self._pending[correlation] = pending
        body = dumps({"type": "query", "kind": kind, **fields})
        # This replica answers itself at once; the others through RabbitMQ.
        own = self._answer(kind, {"type": "query", "kind": kind, **fields})
        if own is not None:
            pending.answers[self.instance] = own
        outcome = "complete"
        try:
            try:
                await rpc.basic_publish(
                    body,
                    exchange=CLUSTER_EXCHANGE,
                    routing_key="",
                    properties=aiormq.spec.Basic.Properties(
                        reply_to=REPLY_TO, correlation_id=correlation
                    ),
                )
            except (aiormq.AMQPError, ConnectionError, RuntimeError) as exc:
                outcome = "failed"
                raise BrokerUnavailable(f"query failed: {exc}") from exc
            if pending.expected <= pending.answers.keys():
                pending.done.set_result(None)  # alone in the cluster
            try:
                async with asyncio.timeout(timeout or self.query_timeout):
                    await pending.done
            except TimeoutError:
                outcome = "partial"
        finally:
            del self._pending[correlation]
            self.metrics.cluster_queries.labels(kind, outcome).inc()
        seconds = time.monotonic() - started
        self.metrics.cluster_query_seconds.labels(kind).observe(seconds)
        live = self.table.live(time.time())
        missing = sorted(live.get(i, i) for i in expected - pending.answers.keys())
        answers = {str(a.get("replica", i)): a for i, a in pending.answers.items()}
        return QueryResult(answers, missing, seconds)

    async def presence(self, users: list[str]) -> tuple[dict[str, dict[str, Any]], QueryResult]:
        result = await self.query("presence", users=users)
        return merge_presence(users, result.answers.values()), result

    async def stats(self) -> tuple[dict[str, Any], QueryResult]:
        result = await self.query("stats")
        return merge_stats(result.answers), result

    async def _on_reply(self, message: DeliveredMessage) -> None:
        pending = self._pending.get(message.header.properties.correlation_id or "")
        if pending is None:
            return  # late: the query is over
        try:
            answer = loads(message.body)
        except JSONDecodeError:
            return
        if not isinstance(answer, dict):
            return
        pending.answers[str(answer.get("instance"))] = answer
        if pending.expected <= pending.answers.keys() and not pending.done.done():
            pending.done.set_result(None)

    def _answer(self, kind: str, request: dict[str, Any]) -> dict[str, Any] | None:
        hub = self.hub
        answer: dict[str, Any] = {"instance": self.instance, "replica": self.replica_id}
        if kind == "presence":
            users = request.get("users")
            if not isinstance(users, list):
                return None
            counts = {u: hub.connections_of(u) for u in users if isinstance(u, str)}
            answer["users"] = {u: n for u, n in counts.items() if n}
        elif kind == "stats":
            answer["connections"] = len(hub)
            answer["users"] = hub.users_online
            if self.aggregating:
                answer["cluster_users"] = self.aggregator.online
        elif kind == "dump":
            answer["seq"] = self._seq
            answer["users"] = {u: self._state_of(u) for u in self._opened}
        else:
            return None
        return answer

    # --- the cluster queue ------------------------------------------------------------

    async def _on_cluster(self, message: DeliveredMessage) -> None:
        deliver = message.delivery
        if isinstance(deliver, Basic.Deliver) and deliver.exchange == PRESENCE_EXCHANGE:
            self._deliver_presence(deliver.routing_key or "", message.body)
            return
        try:
            body = loads(message.body)
        except JSONDecodeError:
            return
        if not isinstance(body, dict):
            return
        kind = body.get("type")
        now = time.time()
        if kind == "beacon":
            new = self.table.seen(
                str(body.get("instance")),
                str(body.get("replica")),
                _int(body.get("connections")),
                _int(body.get("users")),
                now,
            )
            if new:
                log.info("cluster: replica %s is here", body.get("replica"))
                # A newcomer learns of this one now, not a beacon interval later.
                with contextlib.suppress(BrokerUnavailable):
                    await self._beacon()
            self.metrics.cluster_replicas.set(len(self.table.live(now)))
        elif kind == "bye":
            self.table.gone(str(body.get("instance")))
            self.metrics.cluster_replicas.set(len(self.table.live(now)))
        elif kind == "query":
            if message.header.properties.correlation_id in self._pending:
                return  # its own: answered already
            reply_to = message.header.properties.reply_to
            answer = self._answer(str(body.get("kind")), body)
            if answer is not None and reply_to:
                with contextlib.suppress(BrokerUnavailable):
                    await self._publish(
                        "",
                        reply_to,
                        dumps(answer),
                        correlation_id=message.header.properties.correlation_id,
                    )
        elif kind == "trim":
            self._trim(str(body.get("user")), _int(body.get("keep")))
        elif kind == "ticket" and self.on_ticket is not None:
            expires = body.get("expires")
            if isinstance(expires, int | float):
                self.on_ticket(str(body.get("id")), float(expires))

    def _trim(self, user: str, keep: int) -> None:
        """Close this replica's newest sockets of ``user`` until it holds ``keep``."""
        sockets = self._opened.get(user)
        if not sockets or len(sockets) <= keep:
            return
        newest = sorted(sockets.items(), key=lambda item: item[1], reverse=True)
        for member, _ in newest[: len(sockets) - keep]:
            self.metrics.cluster_limit_closes.inc()
            member.close_soon(CloseReason.OVER_USER_LIMIT)
        log.info(
            "cluster: closed %d sockets of user %s over the per-user limit",
            len(sockets) - keep,
            user,
        )

    # --- aggregating ------------------------------------------------------------------

    async def _on_delta(self, message: DeliveredMessage) -> None:
        try:
            body = loads(message.body)
        except JSONDecodeError:
            return
        if isinstance(body, dict):
            self._deltas.put_nowait(body)

    async def _aggregate(self) -> None:
        """Fold the reports into the aggregator, in order (the active consumer only)."""
        while not self._closing:
            body = await self._deltas.get()
            if body is _STOP:
                return
            if not self.aggregating:
                await self._take_over()
            try:
                await self._fold(body)
            except Exception:
                log.exception("cluster: a presence report could not be handled")
            # A report that changes nothing at once (users leaving: their offline
            # transitions come after the grace) does not wait for anything: without
            # this, a disconnect wave's reports would all be folded in one pass.
            await asyncio.sleep(0)

    async def _take_over(self) -> None:
        """This replica now gets the reports: rebuild the state from every replica."""
        while not self._closing:
            try:
                result = await self.query("dump", timeout=SNAPSHOT_TIMEOUT)
            except BrokerUnavailable:
                await asyncio.sleep(self.beacon_interval)
                continue
            break
        else:
            return
        snapshot: dict[str, tuple[int, dict[str, UserState]]] = {}
        now = time.time()
        self._heard.clear()
        for answer in result.answers.values():
            instance = str(answer.get("instance"))
            users = answer.get("users") or {}
            snapshot[instance] = (
                _int(answer.get("seq")),
                {u: (int(s[0]), float(s[1])) for u, s in users.items()},
            )
            self._heard[instance] = now
        announced = await self._read_log()
        transitions = self.aggregator.reset(snapshot, time.time(), announced)
        self.aggregating = True
        self.metrics.presence_aggregating.set(1)
        log.info(
            "cluster: aggregating presence (%d users online on %d replicas%s)",
            self.aggregator.online,
            len(snapshot),
            f"; no answer from {', '.join(result.missing)}" if result.missing else "",
        )
        await self._emit(transitions)

    async def _fold(self, body: dict[str, Any]) -> None:
        kind = body.get("type")
        instance = str(body.get("instance"))
        now = time.time()
        transitions: list[Transition] = []
        trims: list[Trim] = []
        if kind == "bye":
            self._heard.pop(instance, None)
            transitions = self.aggregator.drop_instance(instance, now)
        else:
            self._heard[instance] = now
            if kind == "state":
                users = body.get("users")
                if isinstance(users, dict):
                    states = {u: (int(s[0]), float(s[1])) for u, s in users.items()}
                    transitions, trims = self.aggregator.apply(
                        instance, _int(body.get("seq")), states, now
                    )
        await self._emit(transitions)
        for trim in trims:
            log.info(
                "cluster: user %s is over %d sockets: trimming on %s",
                trim.user,
                self.aggregator.limit,
                trim.instance,
            )
            body = {"type": "trim", "user": trim.user, "keep": trim.keep}
            with contextlib.suppress(BrokerUnavailable):
                await self._publish("", f"{CLUSTER_EXCHANGE}.{trim.instance}", dumps(body))

    async def _tick(self) -> None:
        """Offline transitions whose grace ran out; replicas whose beacons stopped."""
        while not self._closing:
            await asyncio.sleep(TICK)
            if not self.aggregating:
                continue
            now = time.time()
            expiry = self.beacon_interval * MISSED_BEACONS
            transitions = []
            for instance, heard in list(self._heard.items()):
                if now - heard > expiry:
                    log.warning("cluster: no beacon from %s: its sockets count as gone", instance)
                    del self._heard[instance]
                    transitions.extend(self.aggregator.drop_instance(instance, now))
            with contextlib.suppress(Exception):
                published = await self._emit(transitions)
                # A disconnect wave's users go offline together: a batch at a time.
                while published and (due := self.aggregator.due(now, FRAMES_PER_WRITE)):
                    published = await self._emit(due)
                if not published and (lost := self.aggregator.due(now)):
                    log.warning("cluster: %d more presence transitions lost", len(lost))

    async def _emit(self, transitions: Iterable[Transition]) -> bool:
        """Publish each transition to ``notifyd.presence``, many per write (a connect
        storm brings one per new user); False if they could not all be published
        (the rest are lost: presence is current state, not a log to replay)."""
        batch = list(transitions)
        online, offline = self._transition_counters
        for start in range(0, len(batch), FRAMES_PER_WRITE):
            chunk = batch[start : start + FRAMES_PER_WRITE]
            try:
                rpc = self._channel(confirm=False)
                number, size = channel_number(rpc), max_content_size(rpc)
                now_ms = int(time.time() * 1000)
                payload = b"".join(
                    frames.publish(
                        number,
                        PRESENCE_EXCHANGE,
                        Channel("user", transition.user).routing_key,
                        dumps(transition.body()),
                        message_id=self.ids.new(now_ms),
                        published_ms=now_ms,
                        max_content_size=size,
                    )
                    for transition in chunk
                )
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await send_frames(rpc, payload)
            except (BrokerUnavailable, *_PUBLISH_ERRORS) as exc:
                lost = batch[start:]
                users = ", ".join(t.user for t in lost[:5])
                more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
                log.warning("cluster: presence transitions of %s%s lost: %s", users, more, exc)
                return False
            came = sum(1 for transition in chunk if transition.online)
            online.inc(came)
            offline.inc(len(chunk) - came)
        return True

    # --- presence:<id> subscriptions --------------------------------------------------

    async def watch(self, member: Member, user: str) -> None:
        """``member`` gets ``user``'s transitions from now on (bound before returning)."""
        if member not in self._opened.get(member.user, ()):
            return  # it left the hub meanwhile: nothing to clean up later
        watching = self._watching.setdefault(member, set())
        if user not in watching:
            watching.add(user)
            self._watchers.setdefault(user, set()).add(member)
            self.metrics.presence_subscriptions.inc()
        async with self._bind_lock:
            rpc = self._rpc
            if user in self._bound or user not in self._watchers or rpc is None:
                return
            try:
                await rpc.queue_bind(
                    self.queue_name,
                    PRESENCE_EXCHANGE,
                    routing_key=Channel("user", user).routing_key,
                )
            except (aiormq.AMQPError, ConnectionError, RuntimeError) as exc:
                # Bound again with the others on the next connect.
                log.info("cluster: cannot bind presence of %s now: %s", user, exc)
                return
            self._bound.add(user)

    def unwatch(self, member: Member, user: str) -> bool:
        """Stop sending ``user``'s transitions to ``member``; False if it did not watch."""
        users = self._watching.get(member)
        if users is None or user not in users:
            return False
        users.discard(user)
        if not users:
            del self._watching[member]
        self._forget_watcher(member, user)
        return True

    def _unwatch_all(self, member: Member) -> None:
        for user in self._watching.pop(member, ()):
            self._forget_watcher(member, user)

    def _forget_watcher(self, member: Member, user: str) -> None:
        self.metrics.presence_subscriptions.dec()
        watchers = self._watchers.get(user)
        if watchers is None:
            return
        watchers.discard(member)
        if not watchers:
            del self._watchers[user]
            asyncio.get_running_loop().create_task(self._unbind(user))

    async def _unbind(self, user: str) -> None:
        async with self._bind_lock:
            rpc = self._rpc
            if user in self._watchers or user not in self._bound or rpc is None:
                return
            self._bound.discard(user)
            with contextlib.suppress(aiormq.AMQPError, ConnectionError, RuntimeError):
                await rpc.queue_unbind(
                    self.queue_name,
                    PRESENCE_EXCHANGE,
                    routing_key=Channel("user", user).routing_key,
                )

    def _deliver_presence(self, routing_key: str, raw: bytes) -> None:
        # Whose transition it is comes from the key the watchers are bound to.
        user = routing_key.removeprefix("user.")
        watchers = self._watchers.get(user)
        if not watchers:
            return
        try:
            body = loads(raw)
        except JSONDecodeError:
            return
        if not isinstance(body, dict):
            return
        data = {"user": user, "online": bool(body.get("online")), "ts": _int(body.get("ts"))}
        now = time.time()
        ts = int(now * 1000)
        frame = text_frame(
            notification(self.ids.new(ts), f"presence:{user}", PRESENCE_EVENT, data, ts)
        )
        for member in list(watchers):
            member.write(frame, 0, now)

    async def announce_ticket(self, ticket_id: str, expires_at: float) -> None:
        """Tell every replica an SSE ticket was redeemed (no confirm: best effort)."""
        body = dumps({"type": "ticket", "id": ticket_id, "expires": expires_at})
        await self._publish(CLUSTER_EXCHANGE, "", body)

    # --- admin commands ---------------------------------------------------------------

    async def disconnect(self, user: str) -> None:
        """Close every socket of ``user`` on every replica (4003)."""
        body = dumps({"action": "disconnect", "user": user})
        await self._publish(EXCHANGE, CONTROL_ROUTING_KEY, body, confirm=True)

    async def revoke(self, token_ids: list[str], until: float) -> None:
        """Refuse these token ids everywhere until ``until``, also on later replicas."""
        body = dumps({"action": "revoke", "jti": token_ids, "until": until})
        await self._publish(EXCHANGE, CONTROL_ROUTING_KEY, body, confirm=True)

    # --- publishing -------------------------------------------------------------------

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        confirm: bool = False,
        correlation_id: str | None = None,
    ) -> None:
        channel = self._channel(confirm)
        properties = self._properties(correlation_id=correlation_id, persistent=confirm)
        try:
            # A timeout scope, not wait_for: no task per message.
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                confirmation = await channel.basic_publish(
                    body, exchange=exchange, routing_key=routing_key, properties=properties
                )
        except _PUBLISH_ERRORS as exc:
            raise BrokerUnavailable(f"publish failed: {exc}") from exc
        if confirm and not isinstance(confirmation, Basic.Ack):
            raise BrokerUnavailable("RabbitMQ did not confirm the message")

    def _channel(self, confirm: bool) -> RawChannel:
        channel = self._confirm if confirm else self._rpc
        if channel is None or channel.is_closed:
            raise BrokerUnavailable("not connected to RabbitMQ")
        return channel

    @staticmethod
    def _properties(
        *, correlation_id: str | None = None, persistent: bool = False
    ) -> aiormq.spec.Basic.Properties:
        return aiormq.spec.Basic.Properties(
            content_type="application/json",
            correlation_id=correlation_id,
            delivery_mode=2 if persistent else 1,
            headers={PUBLISHED_AT_HEADER: int(time.time() * 1000)},
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
