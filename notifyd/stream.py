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
import contextlib
import datetime as dt
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiormq

from . import metrics
from .config import HistorySettings
from .errors import InvalidMessage
from .protocol import (
    Channel,
    IdGenerator,
    Notification,
    ResumePoint,
    channel_for_routing_key,
    decode_notification,
    id_timestamp_ms,
)

log = logging.getLogger(__name__)

STREAM_QUEUE = "notifyd.history"
MARKER_HEADER = "notifyd-marker"
#: Keys copied into the stream (control messages are not history).
STREAM_BINDINGS = ("user.#", "topic.#", "broadcast")
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

    def __init__(self, settings: HistorySettings, broker: Any) -> None:
        self.settings = settings
        self.broker = broker
        self._pending: list[_Request] = []
        self._flush: asyncio.TimerHandle | None = None
        self._reads: set[asyncio.Task[None]] = set()
        # Replay never generates ids that matter: a message without message_id
        # gets a fresh id here and so can never equal a client's resume point.
        self._ids = IdGenerator()

    async def on_connected(self, connection: Any) -> None:
        """Declare the stream and bind it (idempotent; every replica does the same)."""
        channel = await connection.channel()
        try:
            raw = await channel.get_underlay_channel()
            await raw.queue_declare(
                STREAM_QUEUE,
                durable=True,
                arguments={
                    "x-queue-type": "stream",
                    "x-max-age": f"{max(1, int(self.settings.max_age))}s",
                    # Small segments so that age-based retention is fine-grained.
                    "x-stream-max-segment-size-bytes": 4_000_000,
                },
            )
            for key in STREAM_BINDINGS:
                await raw.queue_bind(STREAM_QUEUE, "notifyd", routing_key=key)
        finally:
            await channel.close()

    async def replay(
        self, since: ResumePoint, channels: list[Channel], before_seq: int | None = None
    ) -> list[Notification] | None:
        """Everything on ``channels`` after ``since``, oldest first, or None."""
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
        metrics.HISTORY_READS.inc()
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                if self.broker.connection is None:
                    # Reconnecting (to another node, say): wait rather than answer
                    # resumed: false to sockets that came here to resume.
                    await asyncio.wait_for(self.broker.connected.wait(), READ_TIMEOUT)
                connection = self.broker.connection
                if connection is None:
                    raise ConnectionError("not connected to RabbitMQ")
                await asyncio.wait_for(
                    self._read_until_marker(batch, secrets.token_hex(8), connection),
                    READ_TIMEOUT,
                )
            except Exception as exc:
                if attempt < READ_ATTEMPTS:
                    # The stream member this read used went down (its consumer was
                    # cancelled): another one answers once the stream has a leader.
                    log.info("history read failed (%s); reading again", exc)
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                log.warning("history read for %d resuming sockets failed: %s", len(batch), exc)
                for request in batch:
                    if not request.future.done():
                        request.future.set_result(None)
                return
            log.info("history read served %d resuming sockets", len(batch))
            return

    async def read_gap(
        self, connection: Any, since: float, channels: list[Channel]
    ) -> list[Notification]:
        """Everything on ``channels`` from about ``since`` (unix s) until now, oldest first.

        For a replica whose queue was lost: what RabbitMQ routed meanwhile is only in
        the stream. Starts :data:`SKEW_MARGIN` early, so it repeats some of what was
        delivered already: the hub drops those by id.
        """
        metrics.HISTORY_READS.inc()
        future: asyncio.Future[list[Notification] | None] = (
            asyncio.get_running_loop().create_future()
        )
        request = _Request(ResumePoint("", int(since * 1000)), frozenset(channels), future)
        await asyncio.wait_for(
            self._read_until_marker([request], secrets.token_hex(8), connection), READ_TIMEOUT
        )
        return request.missed

    async def _read_until_marker(self, batch: list[_Request], marker: str, connection: Any) -> None:
        for request in batch:  # from scratch: this may be a second attempt
            request.missed.clear()
            request.found = not request.since.id  # a gap read has no id to look for
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        done = asyncio.get_running_loop().create_future()
        now = time.time()
        max_body = self.broker.settings.max_body_size

        def handle(message: Any) -> None:
            """Synchronous, so deliveries are handled strictly in stream order."""
            properties = message.header.properties
            headers = properties.headers or {}
            if MARKER_HEADER in headers:
                if headers[MARKER_HEADER] == marker and not done.done():
                    done.set_result(None)
                return  # another read's marker otherwise
            routing_key = message.delivery.routing_key
            channel = channel_for_routing_key(routing_key)
            # Decoded only when a resuming socket reads its channel: most of the
            # stream is other users' traffic.
            wanting = [r for r in batch if r.found and channel in r.channels]
            message_id = properties.message_id
            if message_id is not None:
                for request in batch:
                    if not request.found and message_id == request.since.id:
                        request.found = True
            if not wanting:
                return
            try:
                timestamp = properties.timestamp
                notification = decode_notification(
                    routing_key,
                    message.body,
                    message_id=message_id,
                    timestamp=timestamp.timestamp() if timestamp is not None else None,
                    expiration=properties.expiration,
                    headers=headers,
                    ids=self._ids,
                    max_body_size=max_body,
                    now=now,
                )
            except InvalidMessage:
                return
            if notification.expires_at is None or notification.expires_at > now:
                for request in wanting:
                    request.missed.append(notification)

        async def on_message(message: Any) -> None:
            handle(message)
            tag = message.delivery.delivery_tag
            # Never once the marker is in: the channel is being closed, and an ack
            # racing that close makes RabbitMQ close the whole connection (504).
            if tag % 500 == 0 and not done.done():
                # Streams need acks to keep granting credit to the consumer.
                with contextlib.suppress(Exception):
                    await raw.basic_ack(tag, multiple=True)

        def cancelled(_: Any) -> None:
            # The stream member this consumer read from went down: fail now, not
            # at READ_TIMEOUT.
            if not done.done():
                done.set_exception(ConnectionError("the stream consumer was cancelled"))

        raw.on_consumer_cancel_callbacks.add(cancelled)
        try:
            await raw.basic_qos(prefetch_count=2000)
            await raw.basic_consume(
                STREAM_QUEUE,
                on_message,
                arguments={"x-stream-offset": self._start_offset(batch, now)},
            )
            # Everything live so far is in the stream before this marker. Sent on the
            # reading channel: it needs no confirm (the read waits for the marker
            # itself) and works before the broker reports itself connected.
            await raw.basic_publish(
                b"{}",
                exchange="",
                routing_key=STREAM_QUEUE,
                properties=aiormq.spec.Basic.Properties(headers={MARKER_HEADER: marker}),
            )
            await done
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        for request in batch:
            if not request.future.done():
                request.future.set_result(_dedupe(request.missed) if request.found else None)

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        for task in list(self._reads):
            task.cancel()
        for request in self._pending:
            if not request.future.done():
                request.future.set_result(None)


def _dedupe(notifications: list[Notification]) -> list[Notification]:
    """Drop repeated ids (a publisher's retry), keeping the first."""
    seen: set[str] = set()
    unique = []
    for notification in notifications:
        if notification.id not in seen:
            seen.add(notification.id)
            unique.append(notification)
    return unique
