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
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from aio_pika.abc import AbstractConnection

from .amqp import EXCHANGE, HISTORY_STREAM, STREAM_OFFSET_HEADER, Delivery
from .broker import Broker, read_to_marker, scratch_channel
from .config import HistorySettings
from .errors import BrokerUnavailable, InvalidMessage
from .history import HistoryPage, page_of
from .logs import Throttle
from .metrics import Metrics
from .protocol import (
    BROADCAST,
    Channel,
    IdGenerator,
    Notification,
    ResumePoint,
    channel_for_routing_key,
    id_digest,
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
#: A history page reads the stream in windows going back in time: the newest this
#: many seconds, each earlier one twice as long as the one after it.
PAGE_WINDOW = 10.0


@dataclass(eq=False)
class _Request:
    since: ResumePoint
    channels: frozenset[Channel]
    future: asyncio.Future[list[Notification] | None]
    found: bool = False
    #: Found on one of its own channels (not just anywhere: see :class:`_Scan`).
    found_here: bool = False
    missed: list[Notification] = field(default_factory=list)
    #: The digest bits of ``since.id`` if it is a ULID: a content id names a message
    #: without ``message_id`` by them (see :meth:`notifyd.protocol.IdGenerator.content`).
    digest: bytes | None = field(init=False)

    def __post_init__(self) -> None:
        self.digest = id_digest(self.since.id) if self.since.id else None


class _Scan:
    """What one read of the stream does with each delivery, with no I/O.

    A request's resume point is the first delivery that has its ``since`` id as
    ``message_id`` (the first on one of its channels, if there is one: another
    user's may have the same id; one elsewhere stands for a topic the socket joins
    only after resuming), or, without ``message_id``, is on one of its channels and
    has the digest of its ``since`` content id. The same content again within the
    read (a publisher repeating a body) matches at its first occurrence: the
    client is sent again what followed, never less. Found, a request collects
    what follows on its channels; what has no ``message_id`` gets a content id
    whose time part is ``start_ms`` (not before the read's start, so a resume from
    it reads from early enough), one millisecond more for each repeat of the same
    content, so that ids of one read stay distinct.
    """

    def __init__(self, batch: list[_Request], start_ms: int, now: float, max_body: int) -> None:
        self.batch = batch
        self.start_ms = start_ms
        self.now = now
        self.max_body = max_body
        # Remembers every digest of the read: a repeat must never take an id again.
        self.ids = IdGenerator(memory=sys.maxsize)
        for request in batch:  # from scratch: this may be a second attempt
            request.missed.clear()
            request.found = not request.since.id  # a gap read has no id to look for
            request.found_here = False

    def __call__(self, delivery: Delivery) -> None:
        batch = self.batch
        channel = channel_for_routing_key(delivery.routing_key)
        # Decoded only when a resuming socket reads its channel: most of the
        # stream is other users' traffic (so is the digest computed).
        wanting = [r for r in batch if r.found and channel in r.channels]
        message_id = delivery.message_id
        digest = None
        if message_id is not None:
            for request in batch:
                if message_id != request.since.id or request.found_here:
                    continue
                if channel in request.channels:
                    # Another user's notification with the same id may have come first
                    # (a publisher's ids are its own): from here on, not from there.
                    request.found = request.found_here = True
                    request.missed.clear()
                    if request in wanting:  # the resume point itself is not missed
                        wanting.remove(request)
                elif not request.found:
                    request.found = True
        else:
            for request in batch:
                if not request.found and request.digest is not None and channel in request.channels:
                    if digest is None:
                        digest = delivery.digest()
                    if digest == request.digest:
                        request.found = True
        if not wanting:
            return
        now = self.now
        try:
            notification = delivery.notification(
                ids=self.ids,
                max_body_size=self.max_body,
                now=now,
                id_ms=self.start_ms,
                digest=digest,
            )
        except InvalidMessage:
            return
        if notification.expires_at is None or notification.expires_at > now:
            for request in wanting:
                request.missed.append(notification)


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
        # Names messages without message_id by content (a read names them with its
        # own generator: see _Scan).
        self._ids = IdGenerator()
        #: History page reads that failed are counted per request, logged once a minute.
        self._page_failures = Throttle()

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
        With both ``since_ts`` and a time in the id, the earlier counts: a replayed
        notification without publish time has the replay's time as ``ts``, later
        than where it is in the stream (its content id's time is not).
        """
        oldest = now - self.settings.max_age
        unknown = now - min(self.settings.scan_without_time, self.settings.max_age)
        starts = []
        for request in batch:
            times = [request.since.ts, id_timestamp_ms(request.since.id)]
            ms = min((t for t in times if t is not None), default=None)
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
        now = time.time()
        start = self._start_offset(batch, now)
        handle = _Scan(
            batch, int(start.timestamp() * 1000), now, self.broker.settings.max_body_size
        )
        # The marker is sent on the reading channel, so this works before the broker
        # reports itself connected (a recovery after a lost queue).
        async with scratch_channel(connection) as channel:
            raw = await channel.get_underlay_channel()
            await read_to_marker(raw, HISTORY_STREAM, start, handle, PREFETCH)
        for request in batch:
            if not request.future.done():
                request.future.set_result(_dedupe(request.missed) if request.found else None)

    async def read_page(
        self, channel: Channel, limit: int, before: str | None
    ) -> HistoryPage | None:
        """Up to ``limit`` notifications of ``channel``, newest first, strictly older
        than ``before`` (None: from the newest), from the whole retention window.

        None when ``before`` is not in the stream (never there, or past ``max_age``).
        Raises BrokerUnavailable when the stream cannot be read (not connected, the
        read failed or took longer than :data:`READ_TIMEOUT`). Each call reads on
        its own (history pages are not batched like resumes).
        """
        connection = self.broker.connection
        if connection is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        try:
            return await asyncio.wait_for(
                self._read_page(connection, channel, limit, before), READ_TIMEOUT
            )
        except Exception as exc:
            # Whatever failed (a timeout, a lost stream member, a closed channel), the
            # client is told to retry, never shown the error.
            if self._page_failures.due():
                log.warning(
                    "history page read failed: %s (stream %s; answered broker_unavailable,"
                    " counted in notifyd_history_requests_total)",
                    repr(exc) if not str(exc) else exc,
                    HISTORY_STREAM,
                )
            raise BrokerUnavailable("the history stream cannot be read right now") from None

    async def _read_page(
        self,
        connection: AbstractConnection,
        channel: Channel,
        limit: int,
        before: str | None,
    ) -> HistoryPage | None:
        """Read windows back in time until ``limit`` + 1 older than ``before`` are found
        (one more than asked tells that an older page exists) or ``max_age`` is reached.

        The stream reads forwards only: the newest window is read up to a marker, each
        earlier one (twice as long) up to the first offset of the window read before
        it, so nothing is read twice. Only deliveries on ``channel`` are decoded, and a
        window keeps at most the ``limit`` + 1 newest of them.
        """
        now = time.time()
        oldest = now - self.settings.max_age
        anchor = now
        if before is not None:
            # A generated id says when it was published: the newest window starts
            # there, not at now. Still read to the end, so a wrong guess only costs time.
            ms = id_timestamp_ms(before)
            if ms is not None:
                anchor = min(now, max(oldest, ms / 1000 + SKEW_MARGIN))
        found = before is None
        #: Newest first, all older than ``before``.
        kept: list[Notification] = []
        #: The first offset of the earliest window read that held anything.
        stop: int | None = None
        span = PAGE_WINDOW
        while True:
            start = max(oldest, anchor - span)
            window = _PageWindow(
                channel,
                None if found else before,
                now,
                keep=limit + 1 - len(kept),
                max_body_size=self.broker.settings.max_body_size,
            )
            offset = dt.datetime.fromtimestamp(start, tz=dt.UTC)
            async with scratch_channel(connection) as amqp_channel:
                raw = await amqp_channel.get_underlay_channel()
                await read_to_marker(
                    raw, HISTORY_STREAM, offset, window, PREFETCH, until_offset=stop
                )
            if found or window.found:
                # Everything this window kept is older than all kept before.
                found = True
                kept.extend(reversed(window.newest))
            # (else before is further back: all this window held is newer than it)
            if window.first_offset is not None:
                stop = window.first_offset
            if len(kept) > limit or start <= oldest:
                break
            span *= 2
        if not found:
            return None
        return page_of(kept, limit, more=False)

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


class _PageWindow:
    """One window of a history page read (see :meth:`StreamHistory.read_page`): what
    it keeps of the deliveries handed to it, in stream order, with no I/O."""

    def __init__(
        self,
        channel: Channel,
        before: str | None,
        now: float,
        keep: int,
        max_body_size: int,
    ) -> None:
        self.channel = channel
        #: The id to find in this window (None: found in a newer one, or no ``before``).
        self.before = before
        #: A content id names a message without ``message_id`` by its digest (its time
        #: part is when some replica read it): such a ``before`` is matched by digest.
        self.before_digest = id_digest(before) if before is not None else None
        self.now = now
        self.max_body_size = max_body_size
        #: The newest ``keep`` notifications older than ``before``, in stream order.
        self.newest: deque[Notification] = deque(maxlen=keep)
        #: Those after the last match of ``before`` so far: older than a later match,
        #: newer than ``before`` if none follows.
        self.pending: deque[Notification] = deque(maxlen=keep)
        self.found = False
        self.first_offset: int | None = None
        # Its own: a generator's content ids never go back in time, and each window is
        # older than the one read before it.
        self.ids = IdGenerator()

    def __call__(self, delivery: Delivery) -> None:
        if self.first_offset is None:
            offset = delivery.headers.get(STREAM_OFFSET_HEADER)
            if isinstance(offset, int) and not isinstance(offset, bool):
                self.first_offset = offset
        # Decoded only on the page's channel: most of the stream is other traffic.
        if channel_for_routing_key(delivery.routing_key) != self.channel:
            return
        digest = None
        if self.before is not None:
            if delivery.message_id is not None:
                match = delivery.message_id == self.before
            else:
                digest = delivery.digest()
                match = digest == self.before_digest
            if match:
                # The last match counts (the same content may come twice): what
                # came before it is older.
                self.found = True
                self.newest.extend(self.pending)
                self.pending.clear()
                return
        try:
            notification = delivery.notification(
                ids=self.ids,
                max_body_size=self.max_body_size,
                now=self.now,
                # A content id's time part: when it was published, so that a page
                # starting from it (``before``) reads from about there.
                id_ms=_published_ms(delivery),
                digest=digest,
            )
        except InvalidMessage:
            return
        if notification.expires_at is not None and notification.expires_at <= self.now:
            return
        (self.newest if self.before is None else self.pending).append(notification)


def _published_ms(delivery: Delivery) -> int | None:
    published = delivery.published_at
    return None if published is None else int(published * 1000)


def _dedupe(notifications: list[Notification]) -> list[Notification]:
    """Drop repeated ids (a publisher's retry), keeping the first."""
    seen: set[str] = set()
    unique = []
    for notification in notifications:
        if notification.id not in seen:
            seen.add(notification.id)
            unique.append(notification)
    return unique
