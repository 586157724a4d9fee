"""RabbitMQ: topology, this replica's queue and bindings, consuming and publishing.

One :class:`Broker` owns one AMQP connection and a supervisor task that keeps it
up: connect, declare the topology, bind every routing key the hub wants, consume;
when the connection is lost, reconnect with jittered exponential backoff and do
it all again. The replica queue is named and outlives a short disconnect
(``x-expires``), so what RabbitMQ routed meanwhile is delivered after reconnect.

Bindings are changed with ``nowait`` methods in batches followed by one
synchronous call as a barrier, so a connect storm costs a few round-trips
instead of one per user. Deliveries are handled synchronously and acknowledged
in batches (``multiple=True``) once per event-loop pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from . import metrics
from .config import AmqpSettings, redact_url
from .errors import BrokerUnavailable, InvalidMessage, ProtocolError
from .protocol import (
    CONTROL_ROUTING_KEY,
    FROM_HEADER,
    PUBLISHED_AT_HEADER,
    Channel,
    ControlCommand,
    IdGenerator,
    JSONEncodeError,
    Notification,
    decode_control,
    decode_notification,
    dumps,
    published_time,
)

log = logging.getLogger(__name__)

#: Seconds one connection attempt (TCP connect and AMQP handshake) may take.
CONNECT_TIMEOUT = 10.0
EXCHANGE = "notifyd"
DEAD_LETTER_EXCHANGE = "notifyd.dlx"
DEAD_LETTER_QUEUE = "notifyd.dead"
UPSTREAM_EXCHANGE = "notifyd.upstream"
RECEIPTS_EXCHANGE = "notifyd.receipts"
#: Keys every replica consumes regardless of who is online.
ALWAYS_BOUND = ("broadcast", CONTROL_ROUTING_KEY)

#: Seconds between batched acks (well inside what ``prefetch`` lets RabbitMQ send).
ACK_INTERVAL = 0.01
_BIND_BATCH = 5000
#: Queue.Unbind has no no-wait flag, so each costs a round-trip: take few at a time
#: so that binds (which a connecting socket waits for) are never stuck behind them.
_UNBIND_BATCH = 100
#: Binds sent between two turns of the event loop.
_YIELD_EVERY = 64


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def declare_topology(channel: AbstractChannel) -> None:
    """The shared, durable exchanges every replica and publisher relies on (idempotent).

    Queues with arguments (``notifyd.dead``, the streams) are declared by the
    replicas only, with :func:`declare_queue`: a publisher that declared them
    with other arguments would be refused by RabbitMQ.
    """
    await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    await channel.declare_exchange(UPSTREAM_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(RECEIPTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)


async def declare_queue(
    connection: Any, name: str, arguments: dict[str, Any], bind_to: str | None = None
) -> str | None:
    """Declare a durable queue with ``arguments``; if it exists with other ones, keep it.

    RabbitMQ refuses to declare an existing queue with different arguments
    (PRECONDITION_FAILED, which also closes the channel): a queue created by an
    older notifyd or before a setting changed would otherwise keep every replica
    from connecting. The declaration gets a channel of its own for that reason.
    With ``bind_to``, the queue is then bound to that exchange (either way).
    Returns None when the queue has ``arguments``, else RabbitMQ's explanation,
    for the caller to tell the operator what to do.
    """
    refused = None
    channel = await connection.channel(publisher_confirms=False)
    try:
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            refused = str(exc.args[0] if exc.args else exc)
            if bind_to is not None:
                channel = await connection.channel(publisher_confirms=False)
        if bind_to is not None:
            raw = await channel.get_underlay_channel()
            await raw.queue_bind(name, bind_to)
    finally:
        if not channel.is_closed:
            await channel.close()
    return refused


async def queue_exists(connection: Any, name: str) -> bool:
    """Whether queue ``name`` exists (a passive declare, on a channel of its own)."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


def replica_queue_arguments(settings: AmqpSettings) -> dict[str, Any]:
    """A replica's queue: deleted once unused for ``queue_expires``, replicated if quorum."""
    arguments: dict[str, Any] = {"x-expires": int(settings.queue_expires * 1000)}
    if settings.queue_type == "quorum":
        # Raft-replicated on every node: the loss of one node, even the one leading
        # the queue, neither loses what it holds nor stops a reconnect to another.
        arguments["x-queue-type"] = "quorum"
    return arguments


def dead_letter_arguments(settings: AmqpSettings) -> dict[str, Any]:
    """``notifyd.dead``'s bounds: past either one, the oldest dead letters are dropped.

    None (both 0): no bounds, as notifyd declared it before it had them, e.g. for a
    queue an operator bounds with a policy instead. A quorum queue is replicated:
    its node being down never stops a replica from (re)connecting.
    """
    arguments: dict[str, Any] = {}
    if settings.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    if settings.dead_letter_max_length:
        arguments["x-max-length"] = settings.dead_letter_max_length
    if settings.dead_letter_max_bytes:
        arguments["x-max-length-bytes"] = settings.dead_letter_max_bytes
    if "x-max-length" in arguments or "x-max-length-bytes" in arguments:
        arguments["x-overflow"] = "drop-head"
    return arguments


class BindingTable:
    """The routing keys the hub wants, reconciled with the broker in batches.

    Only keys that changed are looked at to find the next batch: scanning every
    wanted key per batch made a storm of new users cost O(users²).
    """

    def __init__(self) -> None:
        self.desired: set[str] = set(ALWAYS_BOUND)
        #: Keys that are (or may still be) bound on the broker.
        self.bound: set[str] = set()
        #: Keys whose wanted and bound states may differ.
        self._dirty: set[str] = set(ALWAYS_BOUND)
        self.changed = asyncio.Event()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def want(self, routing_key: str) -> None:
        self.desired.add(routing_key)
        if routing_key not in self.bound:
            self._dirty.add(routing_key)
            self.changed.set()

    def release(self, routing_key: str) -> None:
        self.desired.discard(routing_key)
        if routing_key in self.bound:
            self._dirty.add(routing_key)
            self.changed.set()

    def is_bound(self, routing_key: str) -> bool:
        return routing_key in self.bound and routing_key in self.desired

    async def wait_bound(self, routing_key: str, timeout: float) -> bool:
        """Wait until ``routing_key`` is bound; False on timeout."""
        if self.is_bound(routing_key):
            return True
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(routing_key, []).append(future)
        try:
            # asyncio.timeout, not wait_for: no extra task per connecting socket.
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            return False
        return True

    def pending(self) -> tuple[list[str], list[str]]:
        """The next batch: keys to bind, keys to unbind."""
        to_bind: list[str] = []
        to_unbind: list[str] = []
        settled = []
        desired, bound = self.desired, self.bound
        for key in self._dirty:
            if key in desired:
                if key in bound:
                    settled.append(key)
                elif len(to_bind) < _BIND_BATCH:
                    to_bind.append(key)
            elif key in bound:
                if len(to_unbind) < _UNBIND_BATCH:
                    to_unbind.append(key)
            else:
                settled.append(key)
            if len(to_bind) >= _BIND_BATCH and len(to_unbind) >= _UNBIND_BATCH:
                break
        self._dirty.difference_update(settled)
        return to_bind, to_unbind

    def applied(self, bound: list[str], unbound: list[str]) -> None:
        self.bound.update(bound)
        self.bound.difference_update(unbound)
        for key in bound:
            for future in self._waiters.pop(key, ()):
                if not future.done():
                    future.set_result(None)
        metrics.BINDINGS.set(len(self.bound))

    def forget_bound(self) -> None:
        """After a reconnect: bind everything wanted again (binding is idempotent).

        Keys no longer wanted stay in ``bound``: the queue may have outlived the
        disconnect with them, so they are unbound.
        """
        self.bound.difference_update(self.desired)
        self._dirty.update(self.desired)
        self._dirty.update(self.bound)
        self.changed.set()


class Broker:
    """This replica's AMQP side: consuming into the hub and publishing for clients."""

    def __init__(
        self,
        settings: AmqpSettings,
        on_notification: Callable[[Notification], None],
        on_control: Callable[[ControlCommand], None],
        replica_id: str | None = None,
        ids: IdGenerator | None = None,
    ) -> None:
        self.settings = settings
        self.on_notification = on_notification
        self.on_control = on_control
        self.replica_id = replica_id or settings.replica_id or default_replica_id()
        self.queue_name = f"notifyd.replica.{self.replica_id}"
        self.ids = ids or IdGenerator()
        self.bindings = BindingTable()
        self.connected = asyncio.Event()
        #: Awaited with the new connection after each (re)connect, before consuming.
        self.on_connected: list[Callable[[Any], Awaitable[None]]] = []
        #: Awaited with the new connection and a unix time when this replica's queue
        #: was gone on reconnect (deleted, or expired with what it held): what was
        #: routed since about that time never reached this replica. Runs after
        #: :attr:`on_connected`, with every binding in place, before consuming.
        self.on_queue_lost: list[Callable[[Any, float], Awaitable[None]]] = []
        #: The URL of the node this replica is connected to (or last tried).
        self.current_url = settings.node_urls[0]
        #: ``time.monotonic()`` since when there is no connection (None: connected).
        self.disconnected_since: float | None = time.monotonic()
        self._connection: Any = None
        self._publisher: AbstractChannel | None = None
        self._lost = asyncio.Event()
        self._closing = False
        self._ack_tag = 0
        self._ack_scheduled = False
        self._consume_channel: Any = None
        self._consumer_tag: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dead_logged: dict[str, float] = {}
        self._dead_queue_warned = False
        #: Publish time (unix s) of the last notification consumed: where a replay
        #: starts if the queue is lost. None until the queue was first declared.
        self._caught_up_to: float | None = None
        #: Where a recovery after a lost queue starts, until one succeeded.
        self._recover_from: float | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the connection up until :meth:`close`; never raises for broker trouble.

        Each attempt goes to the next of ``[amqp] urls``: after a lost connection
        the first retry (after ``reconnect_min``) is to another node, since the
        lost one may be down. The backoff grows only once every node has failed.
        """
        urls = self.settings.node_urls
        index = 0
        ceiling = self.settings.reconnect_min
        failures = 0
        first = True
        while not self._closing:
            url = urls[index % len(urls)]
            index += 1
            try:
                await self._connect(url)
            except (aiormq.AMQPError, OSError, ConnectionError, TimeoutError, RuntimeError) as exc:
                await self._disconnect()
                problem = f"broker {redact_url(url)} unavailable ({_reason(exc)})"
                failures += 1
            else:
                if not first:
                    metrics.BROKER_RECONNECTS.inc()
                first = False
                ceiling = self.settings.reconnect_min
                failures = 0
                await self._lost.wait()
                if self.closed:
                    break
                await self._disconnect()
                problem = f"connection to broker {redact_url(url)} lost"
            if self.closed:
                break
            # Full jitter: replicas that lost the broker together do not return together.
            # One line per attempt, with the pause actually taken.
            pause = random.uniform(self.settings.reconnect_min, ceiling)
            log.warning("%s; reconnecting in %.2fs", problem, pause)
            await asyncio.sleep(pause)
            if failures >= len(urls):
                ceiling = min(self.settings.reconnect_max, ceiling * 2)

    async def _connect(self, url: str) -> None:
        self._lost.clear()
        self.current_url = url
        connection = await asyncio.wait_for(
            aio_pika.connect(
                url, client_properties={"connection_name": f"notifyd {self.replica_id}"}
            ),
            timeout=CONNECT_TIMEOUT,
        )
        self._connection = connection
        connection.close_callbacks.add(self._on_lost)
        publisher = await connection.channel(publisher_confirms=True)
        publisher.close_callbacks.add(self._on_lost)
        await declare_topology(publisher)
        await self._declare_dead_letter_queue(connection)
        existed = await self._declare_replica_queue(connection)
        consumer = await connection.channel(publisher_confirms=False)
        consumer.close_callbacks.add(self._on_lost)
        raw = await consumer.get_underlay_channel()
        self.bindings.forget_bound()
        await self._apply_bindings(raw)
        for callback in self.on_connected:
            await callback(connection)
        if not existed and self._caught_up_to is not None and self._recover_from is None:
            self._recover_from = self._caught_up_to
            log.warning(
                "queue %s was gone (deleted, or expired while disconnected); recovering "
                "what was routed since %.0f s ago",
                self.queue_name,
                time.time() - self._recover_from,
            )
        if self._recover_from is not None:
            for recover in self.on_queue_lost:
                await recover(connection, self._recover_from)
            # Only once it worked: a failed recovery is tried again on the next connect
            # (when the queue exists already).
            self._recover_from = None
        if self._caught_up_to is None:
            self._caught_up_to = time.time()
        await raw.basic_qos(prefetch_count=self.settings.prefetch)
        self._ack_tag = 0
        self._consume_channel = raw
        # RabbitMQ cancels the consumer if the queue goes away under it (deleted):
        # reconnecting declares it again, instead of staying connected to nothing.
        raw.on_consumer_cancel_callbacks.add(self._on_lost)
        consume_ok = await raw.basic_consume(self.queue_name, self._on_delivery, no_ack=False)
        self._consumer_tag = consume_ok.consumer_tag
        self._publisher = publisher
        self._spawn(self._binding_worker(raw))
        self.disconnected_since = None
        self.connected.set()
        metrics.BROKER_CONNECTED.set(1)
        log.info(
            "broker connected to %s: queue %s, %d bindings",
            redact_url(url),
            self.queue_name,
            len(self.bindings.bound),
        )

    async def _declare_replica_queue(self, connection: Any) -> bool:
        """Declare this replica's queue; True if it existed already.

        One with other arguments is this replica's own from an older notifyd (a
        classic queue) or from other settings (``queue_expires``): it is replaced,
        as nothing else could be declared under its name.
        """
        existed = await queue_exists(connection, self.queue_name)
        arguments = replica_queue_arguments(self.settings)
        refused = await declare_queue(connection, self.queue_name, arguments)
        if refused is not None:
            log.warning(
                "queue %s exists with other arguments (%s): deleting it and declaring it again",
                self.queue_name,
                refused,
            )
            channel = await connection.channel(publisher_confirms=False)
            try:
                await channel.queue_delete(self.queue_name)
            finally:
                await channel.close()
            refused = await declare_queue(connection, self.queue_name, arguments)
            if refused is not None:
                raise RuntimeError(f"cannot declare queue {self.queue_name}: {refused}")
        return existed

    async def _declare_dead_letter_queue(self, connection: Any) -> None:
        """Declare and bind ``notifyd.dead``; trouble with it never stops a (re)connect.

        A classic one whose node is down refuses even a passive declare: dead letters
        are then dropped by RabbitMQ until it is back, and the replica serves meanwhile.
        """
        arguments = dead_letter_arguments(self.settings)
        try:
            refused = await asyncio.wait_for(
                declare_queue(connection, DEAD_LETTER_QUEUE, arguments, DEAD_LETTER_EXCHANGE),
                CONNECT_TIMEOUT,
            )
        except (aiormq.AMQPError, TimeoutError) as exc:
            log.warning("queue %s unavailable (%s); carrying on without it", DEAD_LETTER_QUEUE, exc)
            return
        if refused is not None and not self._dead_queue_warned:
            # Once per process: the queue stays as it is until the operator acts.
            self._dead_queue_warned = True
            log.warning(
                "queue %s exists with other arguments (%s), e.g. from an older notifyd: it "
                "is used as it is, without the configured bounds or queue type. To change "
                "it, delete it once every replica runs this version (rabbitmqctl "
                "delete_queue %s; notifyd declares it again) or give it a policy, e.g. "
                "rabbitmqctl set_policy notifyd-dead '^notifyd\\.dead$' '%s' --apply-to "
                "queues, and set [amqp] dead_letter_max_length and dead_letter_max_bytes to 0",
                DEAD_LETTER_QUEUE,
                refused,
                DEAD_LETTER_QUEUE,
                json.dumps(_as_policy(arguments)),
            )

    def _on_lost(self, *_: Any) -> None:
        self._lost.set()

    async def _disconnect(self) -> None:
        if self.disconnected_since is None:
            self.disconnected_since = time.monotonic()
        self.connected.clear()
        metrics.BROKER_CONNECTED.set(0)
        self._publisher = None
        self._consume_channel = None
        for task in list(self._tasks):
            task.cancel()
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    @property
    def closed(self) -> bool:
        return self._closing

    async def close(self) -> None:
        """Stop consuming, delete this replica's queue and close.

        Called once every socket is gone, so nothing in the queue is for anyone here;
        deleted rather than left to expire: RabbitMQ 3.10 crashes publishers' channels
        when a quorum queue expires while still bound.
        """
        self._closing = True
        self._lost.set()
        connection = self.connection
        if connection is not None:
            # Our own cancel first: deleting the queue under the consumer would have
            # RabbitMQ cancel it, which reads as a failure in the log.
            if self._consume_channel is not None and self._consumer_tag is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._consume_channel.basic_cancel(self._consumer_tag), 5
                    )
            with contextlib.suppress(Exception):
                channel = await connection.channel(publisher_confirms=False)
                await asyncio.wait_for(channel.queue_delete(self.queue_name), 5)
        await self._disconnect()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- bindings ---------------------------------------------------------------------

    async def _apply_bindings(self, raw: Any) -> None:
        """Send pending binds/unbinds without waiting for each, then one barrier."""
        while True:
            to_bind, to_unbind = self.bindings.pending()
            if not to_bind and not to_unbind:
                return
            for index, key in enumerate(to_bind, 1):
                await raw.queue_bind(self.queue_name, EXCHANGE, routing_key=key, nowait=True)
                if index % _YIELD_EVERY == 0:
                    # A nowait bind never suspends: without this a storm's batch
                    # of thousands would hold the event loop for all of them.
                    await asyncio.sleep(0)
            for key in to_unbind:
                await raw.queue_unbind(self.queue_name, EXCHANGE, routing_key=key)
            # The channel processes methods in order: when this answers, every
            # bind sent before it is in effect.
            await raw.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, passive=True)
            self.bindings.applied(to_bind, to_unbind)

    async def _binding_worker(self, raw: Any) -> None:
        changed = self.bindings.changed
        try:
            while True:
                await changed.wait()
                changed.clear()
                await self._apply_bindings(raw)
        except (aiormq.AMQPError, ConnectionError) as exc:
            log.warning("binding update failed: %s", exc)
            self._lost.set()

    def is_routable(self, routing_keys: Iterable[str]) -> bool:
        """Whether RabbitMQ routes all these keys here already (or there is nothing
        to wait for: while disconnected, keys are bound on reconnect)."""
        if not self.connected.is_set():
            return True
        is_bound = self.bindings.is_bound
        return all(is_bound(key) for key in routing_keys)

    async def wait_routable(self, routing_keys: list[str], timeout: float = 5.0) -> None:
        """Wait until these keys are bound, so what is published next reaches us.

        Returns at once while disconnected: the keys are bound on reconnect.
        """
        if not self.connected.is_set():
            return
        for key in routing_keys:
            if not await self.bindings.wait_bound(key, timeout):
                log.warning("binding %s not confirmed within %.1fs", key, timeout)
                return

    # --- consuming --------------------------------------------------------------------

    async def _on_delivery(self, message: Any) -> None:
        self.handle_delivery(message)

    def handle_delivery(self, message: Any) -> None:
        delivery = message.delivery
        routing_key = delivery.routing_key
        properties = message.header.properties
        now = time.time()
        try:
            timestamp = properties.timestamp
            sent_at = timestamp.timestamp() if timestamp is not None else None
            if routing_key == CONTROL_ROUTING_KEY:
                metrics.NOTIFICATIONS_RECEIVED.labels("control").inc()
                published = published_time(sent_at, properties.headers)
                self.on_control(decode_control(message.body, published or now))
            else:
                notification = decode_notification(
                    routing_key,
                    message.body,
                    message_id=properties.message_id,
                    timestamp=sent_at,
                    expiration=properties.expiration,
                    headers=properties.headers,
                    ids=self.ids,
                    max_body_size=self.settings.max_body_size,
                    now=now,
                )
                published = notification.published_at
                self._caught_up_to = now if published is None else min(now, published)
                self.on_notification(notification)
        except InvalidMessage as exc:
            self._dead_letter(message, exc.reason, str(exc))
        except Exception:
            # A bug must not kill the consumer: park the message and carry on (the
            # traceback is logged with the once-a-minute line, not once per message).
            self._dead_letter(message, "internal_error", "notifyd failed to handle it", True)
        self._ack(delivery.delivery_tag)

    def _ack(self, tag: int) -> None:
        self._ack_tag = tag
        if not self._ack_scheduled:
            # One ack (multiple=True) per interval instead of one write per message;
            # a crash re-delivers at most this window, which dedupe drops by id.
            self._ack_scheduled = True
            asyncio.get_running_loop().call_later(ACK_INTERVAL, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        channel, tag = self._consume_channel, self._ack_tag
        if channel is None or not tag or channel.is_closed:
            return
        self._spawn(channel.basic_ack(tag, multiple=True))

    def _dead_letter(self, message: Any, reason: str, detail: str, exc_info: bool = False) -> None:
        metrics.DEAD_LETTERED.labels(reason).inc()
        metrics.NOTIFICATIONS_DROPPED.labels("invalid").inc()
        now = time.monotonic()
        if now - self._dead_logged.get(reason, float("-inf")) > 60:
            # Logged once a minute per reason: a flood of bad messages must not flood logs.
            self._dead_logged[reason] = now
            log.warning(
                "dead-lettering message id=%r key=%r: %s (%s); further %s messages are "
                "counted in notifyd_dead_lettered_total",
                message.header.properties.message_id,
                message.delivery.routing_key,
                detail,
                reason,
                reason,
                exc_info=exc_info,
            )
        headers = dict(message.header.properties.headers or {})
        headers.update({
            "notifyd-reason": reason,
            "notifyd-detail": detail,
            "notifyd-routing-key": message.delivery.routing_key,
            "notifyd-replica": self.replica_id,
        })  # fmt: skip
        self._spawn(
            self._publish_raw(
                DEAD_LETTER_EXCHANGE,
                message.delivery.routing_key,
                message.body,
                message_id=message.header.properties.message_id,
                content_type=message.header.properties.content_type,
                headers=headers,
            )
        )

    # --- publishing -------------------------------------------------------------------

    async def _publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str | None = None,
        content_type: str | None = "application/json",
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
    ) -> None:
        channel = self._publisher
        if channel is None or channel.is_closed:
            raise BrokerUnavailable("not connected to RabbitMQ")
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        message = aio_pika.Message(
            body,
            message_id=message_id,
            content_type=content_type,
            headers=headers,
            timestamp=time.time(),
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
        )
        try:
            # Nobody online for a notification is normal: RabbitMQ drops it, and that
            # is not a failure. Upstream messages no backend consumes are returned.
            mandatory = exchange != EXCHANGE
            confirmation = await asyncio.wait_for(
                target.publish(message, routing_key, mandatory=mandatory), 10
            )
        except (aiormq.AMQPError, ConnectionError, TimeoutError, RuntimeError) as exc:
            raise BrokerUnavailable(f"publish failed: {exc}") from exc
        if not isinstance(confirmation, Basic.Ack):
            raise BrokerUnavailable("RabbitMQ did not confirm the message")

    async def publish(
        self,
        channel: Channel,
        event: str | None,
        data: Any,
        sender: str | None = None,
        message_id: str | None = None,
    ) -> str:
        """Publish a notification through the ``notifyd`` exchange (every replica sees it).

        Raises :class:`ProtocolError` (``too_deep``, ``too_big``) for one that the
        replicas would dead-letter, before anything is published.
        """
        body = notification_body(data, event, self.settings.max_body_size)
        notification_id = message_id or self.ids.new()
        headers: dict[str, Any] = {PUBLISHED_AT_HEADER: int(time.time() * 1000)}
        if sender is not None:
            headers[FROM_HEADER] = sender
        await self._publish_raw(
            EXCHANGE, channel.routing_key, body, message_id=notification_id, headers=headers
        )
        return notification_id

    async def send_upstream(self, user: str, session: str, event: str, data: Any) -> None:
        """A client's message to the backends, stamped with who sent it."""
        body = dumps(
            {
                "user": user,
                "session": session,
                "event": event,
                "data": data,
                "ts": int(time.time() * 1000),
            }
        )
        await self._publish_raw(
            UPSTREAM_EXCHANGE,
            f"user.{user}",
            body,
            message_id=self.ids.new(),
            headers={"notifyd-user": user, "notifyd-session": session, "notifyd-event": event},
        )

    @property
    def connection(self) -> Any:
        """The live AMQP connection, or None while disconnected."""
        return self._connection if self.connected.is_set() else None

    def send_receipt(self, notification: Notification, delivered: int) -> None:
        """Tell the publisher how many sockets on this replica got a notification."""
        body = dumps({
            "id": notification.id,
            "channel": str(notification.channel),
            "delivered": delivered,
            "online": delivered > 0,
            "replica": self.replica_id,
            "ts": int(time.time() * 1000),
        })  # fmt: skip
        self._spawn(self._receipt(notification.channel.routing_key, body, delivered))

    async def _receipt(self, routing_key: str, body: bytes, delivered: int) -> None:
        try:
            await self._publish_raw(RECEIPTS_EXCHANGE, routing_key, body, persistent=False)
        except BrokerUnavailable as exc:
            log.info("receipt not published: %s", exc)
            metrics.RECEIPTS.labels("failed").inc()
        else:
            metrics.RECEIPTS.labels("delivered" if delivered else "offline").inc()


def notification_body(data: Any, event: str | None, max_body_size: int) -> bytes:
    """The AMQP body of a notification, refused as the replicas would refuse it.

    Checked as published, not as received: a client's or an HTTP caller's JSON
    may grow when written again (``1e15`` becomes ``1000000000000000.0``).
    """
    payload: dict[str, Any] = {"data": data}
    if event is not None:
        payload["event"] = event
    try:
        body = dumps(payload)
    except JSONEncodeError:
        raise ProtocolError("too_deep", "'data' is nested too deeply") from None
    if len(body) > max_body_size:
        raise ProtocolError(
            "too_big",
            f"the notification is {len(body)} bytes as published; the limit is "
            f"{max_body_size} ([amqp] max_body_size)",
        )
    return body


def _as_policy(arguments: dict[str, Any]) -> dict[str, Any]:
    """Queue arguments as a policy's definition (``x-max-length`` -> ``max-length``)."""
    return {
        key.removeprefix("x-"): value for key, value in arguments.items() if key != "x-queue-type"
    }


def _reason(exc: BaseException) -> str:
    """Why a connection attempt failed, in words (some of these exceptions have none)."""
    if isinstance(exc, TimeoutError):
        return f"no AMQP handshake within {CONNECT_TIMEOUT:g}s: is it an AMQP 0-9-1 broker?"
    if isinstance(exc.__cause__, asyncio.IncompleteReadError):
        # aiormq read the peer's answer as an AMQP frame header and waited for the rest.
        return "the peer broke off the AMQP handshake: is it an AMQP 0-9-1 broker?"
    return str(exc) or type(exc).__name__


class _OneLinePerAttempt(logging.Filter):
    """aiormq logs every failed connection at ERROR; :meth:`Broker.run` already logs
    each attempt once, with its reason and the pause before the next one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_OneLinePerAttempt())
