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
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from . import metrics
from .config import AmqpSettings
from .connection import BrokerUnavailable
from .protocol import (
    CONTROL_ROUTING_KEY,
    FROM_HEADER,
    PUBLISHED_AT_HEADER,
    Channel,
    ControlCommand,
    IdGenerator,
    InvalidMessage,
    Notification,
    decode_control,
    decode_notification,
    dumps,
)

log = logging.getLogger(__name__)

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


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def declare_topology(channel: AbstractChannel) -> None:
    """The shared, durable names every replica and publisher relies on (idempotent)."""
    await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)
    await dead.bind(dlx)
    await channel.declare_exchange(UPSTREAM_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(RECEIPTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)


class BindingTable:
    """The routing keys the hub wants, reconciled with the broker in batches."""

    def __init__(self) -> None:
        self.desired: set[str] = set(ALWAYS_BOUND)
        #: Keys that are (or may still be) bound on the broker.
        self.bound: set[str] = set()
        self.changed = asyncio.Event()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def want(self, routing_key: str) -> None:
        self.desired.add(routing_key)
        if routing_key not in self.bound:
            self.changed.set()

    def release(self, routing_key: str) -> None:
        self.desired.discard(routing_key)
        if routing_key in self.bound:
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
        to_bind = [k for k in self.desired if k not in self.bound]
        to_unbind = [k for k in self.bound if k not in self.desired]
        return to_bind[:_BIND_BATCH], to_unbind[:_UNBIND_BATCH]

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
        self._connection: Any = None
        self._publisher: AbstractChannel | None = None
        self._lost = asyncio.Event()
        self._closing = False
        self._ack_tag = 0
        self._ack_scheduled = False
        self._consume_channel: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dead_logged: dict[str, float] = {}
        self._attempts = 0

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the connection up until :meth:`close`; never raises for broker trouble."""
        delay = self.settings.reconnect_min
        first = True
        while not self._closing:
            try:
                await self._connect()
            except (aiormq.AMQPError, OSError, ConnectionError, TimeoutError, RuntimeError) as exc:
                log.warning(
                    "broker %s unavailable (%s); retrying in %.1fs",
                    _redact(self.settings.url),
                    exc or type(exc).__name__,
                    delay,
                )
                await self._disconnect()
            else:
                if not first:
                    metrics.BROKER_RECONNECTS.inc()
                first = False
                delay = self.settings.reconnect_min
                await self._lost.wait()
                if self.closed:
                    break
                log.warning("broker connection lost; reconnecting")
                await self._disconnect()
            if self.closed:
                break
            # Full jitter: replicas that lost the broker together do not return together.
            await asyncio.sleep(random.uniform(self.settings.reconnect_min, delay))
            delay = min(self.settings.reconnect_max, delay * 2)

    async def _connect(self) -> None:
        self._lost.clear()
        connection = await asyncio.wait_for(
            aio_pika.connect(
                self.settings.url,
                client_properties={"connection_name": f"notifyd {self.replica_id}"},
            ),
            timeout=10,
        )
        self._connection = connection
        connection.close_callbacks.add(self._on_lost)
        publisher = await connection.channel(publisher_confirms=True)
        publisher.close_callbacks.add(self._on_lost)
        await declare_topology(publisher)
        consumer = await connection.channel(publisher_confirms=False)
        consumer.close_callbacks.add(self._on_lost)
        raw = await consumer.get_underlay_channel()
        await raw.queue_declare(
            self.queue_name,
            durable=True,
            arguments={"x-expires": int(self.settings.queue_expires * 1000)},
        )
        self.bindings.forget_bound()
        await self._apply_bindings(raw)
        for callback in self.on_connected:
            await callback(connection)
        await raw.basic_qos(prefetch_count=self.settings.prefetch)
        self._ack_tag = 0
        self._consume_channel = raw
        await raw.basic_consume(self.queue_name, self._on_delivery, no_ack=False)
        self._publisher = publisher
        self._spawn(self._binding_worker(raw))
        self.connected.set()
        metrics.BROKER_CONNECTED.set(1)
        log.info(
            "broker connected: queue %s, %d bindings", self.queue_name, len(self.bindings.bound)
        )

    def _on_lost(self, *_: Any) -> None:
        self._lost.set()

    async def _disconnect(self) -> None:
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
        """Stop consuming and close; unacked deliveries go back to RabbitMQ."""
        self._closing = True
        self._lost.set()
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
            for key in to_bind:
                await raw.queue_bind(self.queue_name, EXCHANGE, routing_key=key, nowait=True)
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
            if routing_key == CONTROL_ROUTING_KEY:
                metrics.NOTIFICATIONS_RECEIVED.labels("control").inc()
                self.on_control(decode_control(message.body, now))
            else:
                timestamp = properties.timestamp
                self.on_notification(
                    decode_notification(
                        routing_key,
                        message.body,
                        message_id=properties.message_id,
                        timestamp=timestamp.timestamp() if timestamp is not None else None,
                        expiration=properties.expiration,
                        headers=properties.headers,
                        ids=self.ids,
                        max_body_size=self.settings.max_body_size,
                        now=now,
                    )
                )
        except InvalidMessage as exc:
            self._dead_letter(message, exc.reason, str(exc))
        except Exception:
            # A bug must not kill the consumer: park the message and carry on.
            log.exception("failed to handle message on %r", routing_key)
            self._dead_letter(message, "internal_error", "notifyd failed to handle it")
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

    def _dead_letter(self, message: Any, reason: str, detail: str) -> None:
        metrics.DEAD_LETTERED.labels(reason).inc()
        metrics.NOTIFICATIONS_DROPPED.labels("invalid").inc()
        now = time.monotonic()
        if now - self._dead_logged.get(reason, float("-inf")) > 60:
            # Logged once a minute per reason: a flood of bad messages must not flood logs.
            self._dead_logged[reason] = now
            log.warning(
                "dead-lettering message id=%s key=%r: %s (%s); further %s messages are "
                "counted in notifyd_dead_lettered_total",
                message.header.properties.message_id,
                message.delivery.routing_key,
                detail,
                reason,
                reason,
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
        """Publish a notification through the ``notifyd`` exchange (every replica sees it)."""
        notification_id = message_id or self.ids.new()
        body: dict[str, Any] = {"data": data}
        if event is not None:
            body["event"] = event
        headers: dict[str, Any] = {PUBLISHED_AT_HEADER: int(time.time() * 1000)}
        if sender is not None:
            headers[FROM_HEADER] = sender
        await self._publish_raw(
            EXCHANGE, channel.routing_key, dumps(body), message_id=notification_id, headers=headers
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

    async def publish_to_queue(self, queue: str, body: bytes, headers: dict[str, Any]) -> None:
        """Publish straight to a queue (the default exchange), with a confirm."""
        await self._publish_raw("", queue, body, headers=headers, persistent=False)

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


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
