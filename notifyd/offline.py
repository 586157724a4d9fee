"""The offline hook: ``user.<id>`` notifications that no replica holds, to ``notifyd.offline``.

Who holds whom is RabbitMQ's to know, not polled: publishers publish to ``notifyd``,
which forwards everything to the internal exchange ``notifyd.route`` (binding ``#``);
replica queues bind the keys of the users they hold there. What ``notifyd.route``
routes to no queue goes to its alternate exchange ``notifyd.unrouted``, and the
``user.#`` part of it into the durable queue ``notifyd.unrouted`` (the rest, topics and
broadcasts nobody reads, is dropped). See :func:`notifyd.broker.declare_routing`.

RabbitMQ adds no header when it routes to an alternate exchange, so one replica at a
time (``x-single-active-consumer``; another takes over when it goes) consumes that
queue and publishes each message to the topic exchange ``notifyd.offline``, routing
key unchanged: the original body, ``message_id``, headers (plus ``notifyd-offline:
true``), ``content_type``, ``timestamp`` and ``expiration``, persistent. It is
acknowledged only once RabbitMQ confirmed that publish: at least once, and in practice
once (a replica that dies between the confirm and its ack has that message sent again
by the next one, with the same ``message_id``). A message that asked for a receipt
gets one on ``notifyd.receipts`` saying ``"delivered": 0, "online": false``.

Replicas declare ``notifyd.offline`` and, unless ``[amqp] offline_queue = false``, the
durable queue ``notifyd.offline`` bound to it with ``#``, as ``notifyd webpush`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from .amqp import (
    OFFLINE_BINDING,
    OFFLINE_EXCHANGE,
    OFFLINE_QUEUE,
    RECEIPT_HEADER,
    RECEIPTS_EXCHANGE,
    UNROUTED_EXCHANGE,
    UNROUTED_QUEUE,
    Delivery,
    offline_message,
    receipt_message,
)
from .broker import (
    CONNECT_TIMEOUT,
    PUBLISH_TIMEOUT,
    close_channel,
    declare_queue,
    offline_queue_arguments,
    scratch_channel,
    unrouted_queue_arguments,
)
from .config import AmqpSettings
from .errors import InvalidMessage
from .lifecycle import cancel_and_wait
from .logs import Throttle
from .metrics import Metrics
from .protocol import IdGenerator

log = logging.getLogger(__name__)

#: Messages of ``notifyd.unrouted`` being sent on at once (unacknowledged).
PREFETCH = 200
#: Seconds before a message RabbitMQ did not take on ``notifyd.offline`` is handed
#: back (and so tried again), and before a consumer that stopped is started again.
RETRY_PAUSE = 1.0
#: Seconds messages under way get to be confirmed and acknowledged on shutdown.
STOP_GRACE = 2.0

_AMQP_ERRORS = (aiormq.AMQPError, ConnectionError, TimeoutError, RuntimeError)


async def declare_offline(connection: AbstractConnection, settings: AmqpSettings) -> str | None:
    """Exchange ``notifyd.offline`` and, with ``[amqp] offline_queue``, the queue
    ``notifyd.offline`` bound to it with ``#`` (idempotent). Returns RabbitMQ's
    explanation when the queue exists with other arguments (it is used as it is)."""
    async with scratch_channel(connection) as channel:
        await channel.declare_exchange(OFFLINE_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    if not settings.offline_queue:
        return None
    refused = await declare_queue(connection, OFFLINE_QUEUE, offline_queue_arguments(settings))
    async with scratch_channel(connection) as channel:
        raw = await channel.get_underlay_channel()
        await raw.queue_bind(OFFLINE_QUEUE, OFFLINE_EXCHANGE, routing_key="#")
    return refused


class OfflineHook:
    """This replica's part of the offline hook: a consumer of ``notifyd.unrouted`` (the
    active one, or waiting its turn). Started on every broker (re)connect
    (:meth:`on_connected`), stopped by :meth:`close`."""

    def __init__(
        self,
        settings: AmqpSettings,
        replica_id: str,
        ids: IdGenerator,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.replica_id = replica_id
        self.ids = ids
        self.prefetch = PREFETCH
        self._connection: AbstractConnection | None = None
        self._consumer: RawChannel | None = None
        self._publisher: RawChannel | None = None
        self._consumer_tag: str | None = None
        #: aio-pika's channels of the two above (closed with them).
        self._channels: list[AbstractChannel] = []
        #: One task per message under way, and the restart task, if any.
        self._tasks: set[asyncio.Task[None]] = set()
        self._restart: asyncio.Task[None] | None = None
        self._closing = False
        self._logged = Throttle()
        self._warned: set[str] = set()

    @property
    def consuming(self) -> bool:
        """Whether this replica has a consumer on ``notifyd.unrouted`` (active or not)."""
        return self._consumer is not None and not self._consumer.is_closed

    async def on_connected(self, connection: AbstractConnection) -> None:
        """Declare the offline queues and consume ``notifyd.unrouted``, in the background
        (a :attr:`notifyd.broker.Broker.on_connected` hook): a (re)connect, and so the
        replica's own deliveries, never wait for it. Trouble with it is logged, and it
        is tried again on the next connect (meanwhile another replica's hook sends on
        what waits in ``notifyd.unrouted``)."""
        await cancel_and_wait(self._restart)
        await self._stop()  # the previous connection's: its channels are gone
        if self._closing:
            return
        self._connection = connection
        self._restart = asyncio.get_running_loop().create_task(
            self._start_or_log(connection), name="notifyd-offline-start"
        )

    async def _start_or_log(self, connection: AbstractConnection) -> None:
        try:
            await asyncio.wait_for(self._start(connection), CONNECT_TIMEOUT)
        except _AMQP_ERRORS as exc:
            await self._stop()
            if not connection.is_closed:
                log.warning(
                    "offline hook not started on this replica (%s): notifications for "
                    "offline users wait in queue %s for another replica's, or this one's "
                    "next connect",
                    exc,
                    UNROUTED_QUEUE,
                )

    async def _start(self, connection: AbstractConnection) -> None:
        refused = await declare_offline(connection, self.settings)
        if refused is not None:
            self._warn_once(OFFLINE_QUEUE, refused)
        arguments = unrouted_queue_arguments(self.settings)
        refused = await declare_queue(connection, UNROUTED_QUEUE, arguments)
        if refused is not None:
            self._warn_once(UNROUTED_QUEUE, refused)
        self._channels = [
            await connection.channel(publisher_confirms=True),
            await connection.channel(publisher_confirms=False),
        ]
        publisher = await self._channels[0].get_underlay_channel()
        consumer = await self._channels[1].get_underlay_channel()
        await consumer.queue_bind(UNROUTED_QUEUE, UNROUTED_EXCHANGE, routing_key=OFFLINE_BINDING)
        await consumer.basic_qos(prefetch_count=self.prefetch)
        # RabbitMQ cancels it if the queue is deleted under it: start again.
        consumer.on_consumer_cancel_callbacks.add(self._cancelled)
        self._publisher, self._consumer = publisher, consumer
        consume_ok = await consumer.basic_consume(UNROUTED_QUEUE, self._on_message, no_ack=False)
        self._consumer_tag = consume_ok.consumer_tag

    def _warn_once(self, queue: str, refused: str) -> None:
        if queue not in self._warned:
            self._warned.add(queue)
            log.warning("queue %s exists with other arguments (%s): used as it is", queue, refused)

    def _cancelled(self, *_: Any) -> None:
        log.warning("consumer of queue %s cancelled by RabbitMQ: starting it again", UNROUTED_QUEUE)
        self._restart_soon()

    def _restart_soon(self) -> None:
        """Start consuming again on the same connection after :data:`RETRY_PAUSE` (the
        channels failed, e.g. an exchange or queue was deleted); unacknowledged
        messages return to the queue when the old consumer's channel closes."""
        if self._closing or (self._restart is not None and not self._restart.done()):
            return
        self._restart = asyncio.get_running_loop().create_task(self._restart_later())

    async def _restart_later(self) -> None:
        await asyncio.sleep(RETRY_PAUSE)
        connection = self._connection
        await self._stop()
        if self._closing or connection is None or connection.is_closed:
            return  # the broker reconnects and calls on_connected
        await self._start_or_log(connection)

    async def close(self) -> None:
        """Stop consuming; messages under way get :data:`STOP_GRACE` to be confirmed,
        what is left returns to ``notifyd.unrouted`` for another replica."""
        self._closing = True
        consumer, tag = self._consumer, self._consumer_tag
        if consumer is not None and tag is not None and not consumer.is_closed:
            with contextlib.suppress(*_AMQP_ERRORS):
                await asyncio.wait_for(consumer.basic_cancel(tag), 5)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_GRACE)
        if self._restart is not None:
            await cancel_and_wait(self._restart)
        await self._stop()

    async def _stop(self) -> None:
        """Cancel messages under way and close the channels (no-op without them)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        channels, self._channels = self._channels, []
        self._consumer = self._publisher = None
        self._consumer_tag = None
        for channel in channels:
            await close_channel(channel)

    # --- one message ------------------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage) -> None:
        consumer, publisher = self._consumer, self._publisher
        if consumer is None or publisher is None:
            return  # stopping: it returns to the queue with the channel
        task = asyncio.get_running_loop().create_task(
            self._forward(Delivery.of(message), consumer, publisher)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(
        self, delivery: Delivery, consumer: RawChannel, publisher: RawChannel
    ) -> None:
        """Publish one message to ``notifyd.offline``, ack it once confirmed (else hand
        it back after :data:`RETRY_PAUSE`), then send its receipt if it asked for one."""
        body, properties = offline_message(delivery)
        problem = (
            f"not confirmed, or returned: no queue bound to it ({OFFLINE_QUEUE} is declared again)"
        )
        try:
            confirmation = await publisher.basic_publish(
                body,
                exchange=OFFLINE_EXCHANGE,
                routing_key=delivery.routing_key,
                properties=properties,
                # Returned when the queue notifyd.offline was deleted: declared again.
                mandatory=self.settings.offline_queue,
                timeout=PUBLISH_TIMEOUT,
            )
            # Anything else: a nack, or the message itself, returned (aiormq's typing
            # does not say so).
            confirmed = isinstance(confirmation, Basic.Ack)
        except _AMQP_ERRORS as exc:
            confirmed, problem = False, str(exc) or type(exc).__name__
        if not confirmed:
            self.metrics.offline_failed.inc()
            if self._logged.due("failed"):
                log.warning(
                    "offline hook: cannot send message id=%r to exchange %s (%s); it is "
                    "handed back to queue %s and sent again in %gs (further failures are "
                    "counted in notifyd_offline_failed_total). Does the exchange exist, "
                    "and does RabbitMQ accept publishes (memory or disk alarm)?",
                    delivery.message_id,
                    OFFLINE_EXCHANGE,
                    problem,
                    UNROUTED_QUEUE,
                    RETRY_PAUSE,
                )
            await asyncio.sleep(RETRY_PAUSE)
            with contextlib.suppress(*_AMQP_ERRORS):
                await consumer.basic_nack(delivery.tag, multiple=False, requeue=True)
            # Declared and consumed again (e.g. notifyd.offline was deleted, which also
            # closes the publishing channel).
            self._restart_soon()
            return
        self.metrics.offline_republished.inc()
        # A failed ack means the channel is gone: RabbitMQ delivers it again (same id).
        with contextlib.suppress(*_AMQP_ERRORS):
            await consumer.basic_ack(delivery.tag)
        if delivery.headers.get(RECEIPT_HEADER):
            await self._receipt(delivery, publisher)

    async def _receipt(self, delivery: Delivery, publisher: RawChannel) -> None:
        """``"delivered": 0, "online": false`` on ``notifyd.receipts`` (best effort, as
        the replicas' receipts: not sent again if RabbitMQ does not take it)."""
        now = time.time()
        try:
            notification = delivery.notification(
                ids=self.ids, max_body_size=self.settings.max_body_size, now=now
            )
        except InvalidMessage:
            return  # one the replicas would have dead-lettered: no receipt either
        message = receipt_message(notification, 0, self.replica_id, now)
        try:
            confirmation = await publisher.basic_publish(
                message.body,
                exchange=RECEIPTS_EXCHANGE,
                routing_key=delivery.routing_key,
                properties=message.properties,
                timeout=PUBLISH_TIMEOUT,
            )
            sent = isinstance(confirmation, Basic.Ack)
        except _AMQP_ERRORS:
            sent = False
        self.metrics.offline_receipts.labels("sent" if sent else "failed").inc()
