"""History shared by all replicas: a RabbitMQ stream bound to the ``notifyd`` exchange.

Every notification routed by the exchange is also appended to the stream queue
``notifyd.history`` (retention ``[history] max_age``). A client may therefore
resume on any replica: the replica reads the stream from shortly before the
client's last id and replays what the client's channels missed.

Resumes are batched: requests arriving within a short window share one read, so
a reconnect storm costs one pass over the stream, not one per socket. The end of
a read is found with a marker message published to the stream after the resuming
sockets started holding live traffic, so nothing falls between replay and live.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from aio_pika.abc import AbstractConnection

from .amqp import EXCHANGE, HISTORY_STREAM, Delivery
from .broker import Broker, read_to_marker, scratch_channel
from .config import HistorySettings
from .errors import InvalidMessage
from .metrics import Metrics
from .protocol import (
    BROADCAST,
    Channel,
    IdGenerator,
    Notification,
    ResumePoint,
    channel_for_routing_key,
    id_timestamp_ms,
)

log = logging.getLogger(__name__)

#: Keys copied into the stream (control messages are not history).
STREAM_BINDINGS = ("user.#", "topic.#", BROADCAST.routing_key)
#: Deliveries one read may hold unacknowledged (streams grant credit on acks).
PREFETCH = 2000
#: Requests arriving within this window share one read of the stream.
BATCH_WINDOW = 0.02
#: Read from this long before a generated id's timestamp (clock skew between replicas).
SKEW_MARGIN = 5.0
READ_TIMEOUT = 15.0
#: Reads of one batch before its sockets are told ``resumed: false``, and the pause
#: between them (a stream electing a new leader takes a few seconds).
READ_ATTEMPTS = 2
RETRY_PAUSE = 1.0


@dataclass(eq=False)
class _Request:
    since: ResumePoint
    channels: frozenset[Channel]
    future: asyncio.Future[list[Notification] | None]
    found: bool = False
    missed: list[Notification] = field(default_factory=list)


class StreamHistory:
    """Reads missed notifications for any replica's clients from the shared stream."""

    def __init__(
        self, settings: HistorySettings, broker: Broker, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.metrics = metrics if metrics is not None else Metrics()
        self._pending: list[_Request] = []
        self._flush: asyncio.TimerHandle | None = None
        self._reads: set[asyncio.Task[None]] = set()
        # Replay never generates ids that matter: a message without message_id
        # gets a fresh id here and so can never equal a client's resume point.
        self._ids = IdGenerator()

    async def on_connected(self, connection: AbstractConnection) -> None:
        """Declare the stream and bind it (idempotent; every replica does the same).

        A :attr:`Broker.on_connected` hook; raises aio-pika's errors (the broker then
        reconnects).
        """
        async with scratch_channel(connection) as channel:
            raw = await channel.get_underlay_channel()
            await raw.queue_declare(
                HISTORY_STREAM,
                durable=True,
                arguments={
                    "x-queue-type": "stream",
                    "x-max-age": f"{max(1, int(self.settings.max_age))}s",
                    # Small segments so that age-based retention is fine-grained.
                    "x-stream-max-segment-size-bytes": 4_000_000,
                },
            )
            for key in STREAM_BINDINGS:
                await raw.queue_bind(HISTORY_STREAM, EXCHANGE, routing_key=key)

    async def replay(
        self, since: ResumePoint, channels: list[Channel], before_seq: int | None = None
    ) -> list[Notification] | None:
        """Everything on ``channels`` after ``since``, oldest first, or None when the
        stream cannot say (``since`` not found in it, or it could not be read: the
        client is told ``resumed: false``). Reads are shared by requests arriving
        within :data:`BATCH_WINDOW`; ``before_seq`` is not used (the stream's
        answer ends where live delivery began). Never raises for broker trouble."""
        future: asyncio.Future[list[Notification] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.append(_Request(since, frozenset(channels), future))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(BATCH_WINDOW, self._start_read)
        return await future

    def _start_read(self) -> None:
        self._flush = None
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._read(batch))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    def _start_offset(self, batch: list[_Request], now: float) -> dt.datetime:
        """Where one read for ``batch`` starts: shortly before the oldest resume point.

        A resume point with no time (a publisher's own id, no ``since_ts``) starts
        ``scan_without_time`` seconds back, not at the start of the retention
        window: reading and decoding all of it would cost seconds of CPU per resume.
        """
        oldest = now - self.settings.max_age
        unknown = now - min(self.settings.scan_without_time, self.settings.max_age)
        starts = []
        for request in batch:
            ms = (
                request.since.ts
                if request.since.ts is not None
                else id_timestamp_ms(request.since.id)
            )
            starts.append(unknown if ms is None else max(oldest, ms / 1000 - SKEW_MARGIN))
        return dt.datetime.fromtimestamp(min(starts), tz=dt.UTC)

    async def _read(self, batch: list[_Request]) -> None:
        try:
            await self._read_batch(batch)
        finally:
            # Also when cancelled (closing): nobody may wait for an answer forever.
            for request in batch:
                if not request.future.done():
                    request.future.set_result(None)

    async def _read_batch(self, batch: list[_Request]) -> None:
        self.metrics.history_reads.inc()
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                if self.broker.connection is None:
                    # Reconnecting (to another node, say): wait rather than answer
                    # resumed: false to sockets that came here to resume.
                    await asyncio.wait_for(self.broker.connected.wait(), READ_TIMEOUT)
                connection = self.broker.connection
                if connection is None:
                    raise ConnectionError("not connected to RabbitMQ")
                await asyncio.wait_for(self._read_until_marker(batch, connection), READ_TIMEOUT)
            except Exception as exc:
                if attempt < READ_ATTEMPTS:
                    # The stream member this read used went down (its consumer was
                    # cancelled): another one answers once the stream has a leader.
                    log.info("history read failed (%s); reading again", exc)
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                log.warning("history read for %d resuming sockets failed: %s", len(batch), exc)
                return
            log.info("history read served %d resuming sockets", len(batch))
            return

    async def read_gap(
        self, connection: AbstractConnection, since: float, channels: list[Channel]
    ) -> list[Notification]:
        """Everything on ``channels`` from about ``since`` (unix s) until now, oldest first.

        For a replica whose queue was lost: what RabbitMQ routed meanwhile is only in
        the stream. Starts :data:`SKEW_MARGIN` early, so it repeats some of what was
        delivered already: the hub drops those by id. Raises TimeoutError past
        :data:`READ_TIMEOUT`, ConnectionError and aiormq's errors when the read fails.
        """
        self.metrics.history_reads.inc()
        future: asyncio.Future[list[Notification] | None] = (
            asyncio.get_running_loop().create_future()
        )
        request = _Request(ResumePoint("", int(since * 1000)), frozenset(channels), future)
        await asyncio.wait_for(self._read_until_marker([request], connection), READ_TIMEOUT)
        return request.missed

    async def _read_until_marker(
        self, batch: list[_Request], connection: AbstractConnection
    ) -> None:
        for request in batch:  # from scratch: this may be a second attempt
            request.missed.clear()
            request.found = not request.since.id  # a gap read has no id to look for
        now = time.time()
        max_body = self.broker.settings.max_body_size

        def handle(delivery: Delivery) -> None:
            channel = channel_for_routing_key(delivery.routing_key)
            # Decoded only when a resuming socket reads its channel: most of the
            # stream is other users' traffic.
            wanting = [r for r in batch if r.found and channel in r.channels]
            message_id = delivery.message_id
            if message_id is not None:
                for request in batch:
                    if not request.found and message_id == request.since.id:
                        request.found = True
            if not wanting:
                return
            try:
                notification = delivery.notification(ids=self._ids, max_body_size=max_body, now=now)
            except InvalidMessage:
                return
            if notification.expires_at is None or notification.expires_at > now:
                for request in wanting:
                    request.missed.append(notification)

        # The marker is sent on the reading channel, so this works before the broker
        # reports itself connected (a recovery after a lost queue).
        async with scratch_channel(connection) as channel:
            raw = await channel.get_underlay_channel()
            await read_to_marker(
                raw, HISTORY_STREAM, self._start_offset(batch, now), handle, PREFETCH
            )
        for request in batch:
            if not request.future.done():
                request.future.set_result(_dedupe(request.missed) if request.found else None)

    async def close(self) -> None:
        """Stop reading: every resume waiting for an answer gets None. Never raises."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        reads = list(self._reads)
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        for request in self._pending:
            if not request.future.done():
                request.future.set_result(None)
        self._pending.clear()


def _dedupe(notifications: list[Notification]) -> list[Notification]:
    """Drop repeated ids (a publisher's retry), keeping the first."""
    seen: set[str] = set()
    unique = []
    for notification in notifications:
        if notification.id not in seen:
            seen.add(notification.id)
            unique.append(notification)
    return unique
