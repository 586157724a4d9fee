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
import datetime as dt
import itertools
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.connection import make_url
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.commands import Basic, Queue
from pamqp.common import FieldTable
from prometheus_client import Gauge

from . import frames
from .amqp import (
    CONTROL_ROUTING_KEY,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EXCHANGE,
    MARKER_HEADER,
    RECEIPTS_EXCHANGE,
    ROUTE_EXCHANGE,
    STREAM_OFFSET_HEADER,
    UNROUTED_EXCHANGE,
    UPSTREAM_EXCHANGE,
    ControlCommand,
    Delivery,
    dead_letter_message,
    decode_control,
    marker_properties,
    notification_message,
    receipt_message,
    upstream_message,
)
from .config import AmqpSettings, redact_url
from .errors import BrokerUnavailable, InvalidMessage
from .lifecycle import PerPass
from .logs import Throttle
from .metrics import Metrics
from .protocol import BROADCAST, Channel, IdGenerator, Notification
from .publisher import declare_topology

log = logging.getLogger(__name__)

#: Seconds one connection attempt (TCP connect and AMQP handshake) may take.
CONNECT_TIMEOUT = 10.0
#: Keys every replica consumes regardless of who is online.
ALWAYS_BOUND = (BROADCAST.routing_key, CONTROL_ROUTING_KEY)

#: Seconds between batched acks (well inside what ``prefetch`` lets RabbitMQ send).
ACK_INTERVAL = 0.01
#: Binds per batch: a batch's bookkeeping (hundreds of keys recorded, their sockets
#: queued to be woken) runs between two awaits, in one pass of the event loop.
_BIND_BATCH = 1000
#: Unbinds per batch. ``queue.unbind`` has no ``nowait``: a batch's are sent together
#: and their replies awaited, and the binds that came meanwhile (which a connecting
#: socket waits for) go out after them: RabbitMQ takes about a millisecond for each
#: binding change, so a batch must stay well under a second of its work.
_UNBIND_BATCH = 250
#: Seconds :meth:`Broker.close` waits for every binding to be gone before it deletes
#: the queue anyway (about a millisecond of RabbitMQ's time per binding).
UNBIND_ALL_TIMEOUT = 10.0
#: Waiters for a binding woken per event-loop pass (see :meth:`BindingTable.applied`).
WAKE_BATCH = 16
#: Seconds one publish may wait for RabbitMQ's confirm.
PUBLISH_TIMEOUT = 10.0
#: Receipts awaiting RabbitMQ's confirm at once; past this, receipts are dropped
#: (``notifyd_receipts_total{outcome="dropped"}``), never queued without bound.
MAX_RECEIPTS_IN_FLIGHT = 1000
#: Seconds before a message whose dead letter RabbitMQ did not take is handed back
#: for redelivery (so that a broker refusing dead letters is not asked in a loop).
DEAD_LETTER_RETRY_PAUSE = 1.0


#: Channel closes under way that a cancelled caller stopped waiting for.
_closing_channels: set[asyncio.Future[Any]] = set()
#: Seconds a closed channel's late frames are discarded while RabbitMQ has not
#: confirmed its close (then the connection is lost anyway: heartbeats).
_DISCARD_FOR = 60.0


async def open_connection(url: str, name: str | None = None) -> AbstractConnection:
    """An AMQP connection to ``url``, open within :data:`CONNECT_TIMEOUT` (``name``: the
    ``connection_name`` RabbitMQ's management shows), or the error.

    A connection that could not be opened is closed here rather than left to the
    garbage collector: aio-pika's ``__del__`` then schedules its ``close()``, which,
    when the collector happens to run outside the event loop's thread, is never
    awaited (a ``RuntimeWarning`` per failed attempt of a broker outage).
    """
    properties: FieldTable | None = {"connection_name": name} if name else None
    connection = aio_pika.Connection(make_url(url), client_properties=properties)
    try:
        await asyncio.wait_for(connection.connect(), CONNECT_TIMEOUT)
    except BaseException:
        await connection.close()
        raise
    return connection


async def close_channel(channel: AbstractChannel) -> None:
    """Close ``channel`` (no-op if closed) without ever blocking its connection;
    never raises an AMQP error, and a cancel of the caller does not stop it half-way.

    Two aiormq behaviours make a plain ``await channel.close()`` dangerous on a
    connection that other components share:

    - a cancelled ``Channel.Close`` (or any cancelled RPC) makes aiormq send a
      second close with code 504, which RabbitMQ treats as a connection error;
    - a closed channel stays registered until RabbitMQ's ``Close-Ok``, but nothing
      reads its frames any more: deliveries RabbitMQ sent before it saw the close
      (a stream read with a large prefetch) fill its ten-frame buffer, and the
      connection's reader then waits on it forever — every channel stops.

    So the close runs as a task of its own (shielded), and until RabbitMQ confirms
    it, the channel's late frames are discarded.
    """
    if channel.is_closed:
        return
    closing = asyncio.ensure_future(_close_and_discard(channel))
    _closing_channels.add(closing)
    closing.add_done_callback(_closing_channels.discard)
    await asyncio.shield(closing)


async def _close_and_discard(channel: AbstractChannel) -> None:
    raw: RawChannel | None = None
    with contextlib.suppress(Exception):
        raw = await channel.get_underlay_channel()
    with contextlib.suppress(Exception):
        await channel.close()
    if raw is None:
        return
    connection = raw.connection
    deadline = time.monotonic() + _DISCARD_FOR
    while (
        connection.channels.get(raw.number) is raw
        and not connection.is_closed
        and time.monotonic() < deadline
    ):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(raw.frames.get(), 0.5)
    # The connection's reader unregisters the channel before it queues the Close-Ok:
    # room for that last frame.
    while not raw.frames.empty():
        raw.frames.get_nowait()


@contextlib.asynccontextmanager
async def scratch_channel(
    connection: AbstractConnection, publisher_confirms: bool = False
) -> AsyncIterator[AbstractChannel]:
    """A channel for a few calls, closed afterwards by :func:`close_channel`."""
    channel = await connection.channel(publisher_confirms=publisher_confirms)
    try:
        yield channel
    finally:
        await close_channel(channel)


#: Messages or methods written to RabbitMQ in one go by :func:`send_frames`' callers:
#: 64 cost one write instead of 64, and encoding them (:mod:`notifyd.frames`: a few
#: µs each) keeps a pass of the event loop well under 1 ms.
FRAMES_PER_WRITE = 64


async def send_frames(raw: RawChannel, payload: bytes) -> None:
    """Write encoded AMQP frames that get no reply (``nowait`` binds, publishes) on
    ``raw`` as one payload, and wait until it was written.

    aiormq sends every method as its own write (and runs each ``rpc`` as a task):
    in a connect storm, a bind per new user and a presence transition per user
    come to thousands of ``write()`` calls a second. One payload for a batch keeps
    the frames in order with everything else on the connection (its write queue
    is first in, first out) and costs one. Not on a confirm channel: publishes
    written this way take no delivery tags, which aiormq counts there.
    """
    if raw.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError("channel is closed")
    channel: Any = raw  # write_queue and publisher_confirms are not on the abstract channel
    if channel.publisher_confirms:
        raise ValueError("send_frames bypasses the delivery tags of a confirm channel")
    written = asyncio.get_running_loop().create_future()
    await channel.write_queue.put(ChannelFrame(payload, False, written))
    await written


async def send_batched(raw: RawChannel, encoded: Iterable[bytes]) -> None:
    """Write encoded frames :data:`FRAMES_PER_WRITE` to a write (:func:`send_frames`);
    between two writes the event loop runs other work (a storm's thousands of binds
    would otherwise hold it for all of them). A lazy ``encoded`` is encoded a batch
    at a time."""
    pending = iter(encoded)
    while batch := list(itertools.islice(pending, FRAMES_PER_WRITE)):
        await send_frames(raw, b"".join(batch))


def channel_number(raw: RawChannel) -> int:
    """The number of ``raw``, for the frames :mod:`notifyd.frames` encodes."""
    channel: Any = raw  # number is not on aiormq's abstract channel
    return int(channel.number)


def max_content_size(raw: RawChannel) -> int:
    """The largest body frame ``raw``'s connection takes (its ``frame_max`` less 8)."""
    channel: Any = raw  # max_content_size is not on aiormq's abstract channel
    return int(channel.max_content_size)


async def call_frames(raw: RawChannel, requests: list[bytes], reply: type[Any]) -> None:
    """Send synchronous methods (``queue.unbind``: it has no ``nowait``), encoded,
    many per write, then wait for as many replies of type ``reply``, in order.

    aiormq's ``rpc`` waits for each reply before it sends the next method: a
    round trip each, which for the thousands of unbinds after a disconnect wave
    meant seconds of serial waiting and a write, a task and a lock turn each.
    The channel's lock is held throughout, as ``rpc`` holds it for one method, so
    no other call's reply is taken for one of these. The wait runs as a task of
    the channel: if the channel closes meanwhile (RabbitMQ refused one of them,
    the connection was lost), aiormq ends it with the close's error, as it ends
    its own calls.
    """
    channel: Any = raw  # lock, rpc_frames and create_task are not on the abstract channel

    async def call() -> None:
        async with channel.lock:
            await send_batched(raw, requests)
            for _ in requests:
                answer = await channel.rpc_frames.get()
                channel.rpc_frames.task_done()
                if not isinstance(answer, reply):
                    raise aiormq.exceptions.InvalidFrameError(answer)

    await channel.create_task(call())


def _on_exchanges(route_keys: list[str], history_keys: list[str]) -> list[tuple[str, str]]:
    """(exchange, routing key) pairs for a batch of both binding tables: the routing
    table's keys on ``notifyd.route``, the history table's on ``notifyd``."""
    return [(ROUTE_EXCHANGE, key) for key in route_keys] + [(EXCHANGE, key) for key in history_keys]


def default_replica_id() -> str:
    """``<hostname>-<pid>``: unique per process on a host, readable in RabbitMQ's UI."""
    return f"{socket.gethostname()}-{os.getpid()}"


async def declare_queue(
    connection: AbstractConnection,
    name: str,
    arguments: dict[str, Any],
    bind_to: str | None = None,
) -> str | None:
    """Declare a durable queue with ``arguments``; if it exists with other ones, keep it.

    RabbitMQ refuses to declare an existing queue with different arguments
    (PRECONDITION_FAILED, which also closes the channel): a queue created by an
    older notifyd or before a setting changed would otherwise keep every replica
    from connecting. The declaration gets a channel of its own for that reason.
    With ``bind_to``, the queue is then bound to that exchange (either way).
    Returns None when the queue has ``arguments``, else RabbitMQ's explanation,
    for the caller to tell the operator what to do. Raises aio-pika's errors for
    anything else (connection lost, no such exchange).
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
        await close_channel(channel)
    return refused


async def queue_exists(connection: AbstractConnection, name: str) -> bool:
    """Whether queue ``name`` exists (a passive declare, on a channel of its own).

    Raises aio-pika's errors for anything but a missing queue.
    """
    async with scratch_channel(connection) as channel:
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
    return True


async def read_to_marker(
    raw: RawChannel,
    stream: str,
    offset: dt.datetime | str,
    handle: Callable[[Delivery], None],
    prefetch: int,
    until_offset: int | None = None,
) -> None:
    """Read ``stream`` from ``offset`` (an ``x-stream-offset``: a time or ``"first"``)
    up to a marker appended now, handing each message before it to ``handle`` in
    stream order (synchronously, so that order holds).

    With ``until_offset`` (the stream offset of a message read before), no marker is
    appended: the read ends before that message.

    Returns once the end is read: everything the stream held when this was called
    (or before ``until_offset``) has been handled. Raises ConnectionError when
    RabbitMQ cancels the consumer (the stream member it read from went down) and
    aiormq's errors for a failed channel. Bounding the time it takes and closing
    ``raw`` afterwards (which ends the consumer) are the caller's.
    """
    marker = secrets.token_hex(8)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ack_every = max(1, prefetch // 4)

    async def on_message(message: DeliveredMessage) -> None:
        if done.done():
            return  # the end is read: see the ack below
        delivery = Delivery.of(message)
        if until_offset is not None:
            position = delivery.headers.get(STREAM_OFFSET_HEADER)
            if not isinstance(position, int) or position >= until_offset:
                done.set_result(None)
                return
        found = delivery.headers.get(MARKER_HEADER)
        if found is None:
            handle(delivery)
        elif found == marker:
            done.set_result(None)
            return
        # (else another reader's marker)
        # Streams grant the consumer credit on acks. Never once the end is read:
        # the channel is being closed, and an ack racing that close makes RabbitMQ
        # close the whole connection (504).
        if delivery.tag % ack_every == 0:
            with contextlib.suppress(aiormq.AMQPError, ConnectionError, RuntimeError):
                await raw.basic_ack(delivery.tag, multiple=True)

    def cancelled(_: Basic.Cancel) -> None:
        if not done.done():
            done.set_exception(ConnectionError("the stream consumer was cancelled"))

    raw.on_consumer_cancel_callbacks.add(cancelled)
    await raw.basic_qos(prefetch_count=prefetch)
    await raw.basic_consume(stream, on_message, arguments={"x-stream-offset": offset})
    if until_offset is None:
        # Appended after everything in the stream now. Sent on the reading channel:
        # it needs no confirm (the read waits for the marker itself).
        await raw.basic_publish(
            b"{}", exchange="", routing_key=stream, properties=marker_properties(marker)
        )
    await done


async def declare_routing(channel: AbstractChannel) -> None:
    """``notifyd`` → (``#``) ``notifyd.route`` → alternate exchange ``notifyd.unrouted``.

    Both internal (nothing publishes to them but RabbitMQ), durable topic exchanges;
    idempotent, every replica declares them alike (an exchange declared again with
    other arguments is refused). Replica queues bind on ``notifyd.route``: what none
    of them takes goes on to ``notifyd.unrouted`` (:mod:`notifyd.offline`). Raises
    aio-pika's errors.
    """
    await channel.declare_exchange(
        UNROUTED_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True, internal=True
    )
    route = await channel.declare_exchange(
        ROUTE_EXCHANGE,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        internal=True,
        arguments={"alternate-exchange": UNROUTED_EXCHANGE},
    )
    await route.bind(EXCHANGE, "#")


def replica_queue_arguments(settings: AmqpSettings) -> dict[str, Any]:
    """A replica's queue: deleted once unused for ``queue_expires``, replicated if quorum."""
    arguments: dict[str, Any] = {"x-expires": int(settings.queue_expires * 1000)}
    if settings.queue_type == "quorum":
        # Raft-replicated on every node: the loss of one node, even the one leading
        # the queue, neither loses what it holds nor stops a reconnect to another.
        arguments["x-queue-type"] = "quorum"
    return arguments


def unrouted_queue_arguments(settings: AmqpSettings) -> dict[str, Any]:
    """``notifyd.unrouted``: one consumer at a time (the offline hook of one replica;
    another takes over when it goes), replicated if quorum."""
    arguments: dict[str, Any] = {"x-single-active-consumer": True}
    arguments.update(offline_queue_arguments(settings))
    return arguments


def offline_queue_arguments(settings: AmqpSettings) -> dict[str, Any]:
    """``notifyd.offline``, as the gateway and ``notifyd webpush`` both declare it:
    bounded by ``[amqp] offline_max_length`` (oldest dropped), replicated if quorum."""
    arguments: dict[str, Any] = {}
    if settings.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    if settings.offline_max_length:
        arguments["x-max-length"] = settings.offline_max_length
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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class BindingTable:
    """The routing keys the hub wants, reconciled with the broker in batches.

    Only keys that changed are looked at to find the next batch, and keys to bind
    apart from keys to unbind: scanning every wanted key per batch made a storm of
    new users cost O(users²), and scanning the thousands of keys a disconnect wave
    leaves to unbind (250 a batch) for each small batch of binds cost as much.

    ``always``: keys wanted from the start and never released; ``changed``: the event
    set when there is work (tables reconciled by one worker share one); ``gauge``:
    set to the number of bound keys.
    """

    def __init__(
        self,
        always: Iterable[str] = ALWAYS_BOUND,
        changed: asyncio.Event | None = None,
        gauge: Gauge | None = None,
    ) -> None:
        self.desired: set[str] = set(always)
        #: Keys that are (or may still be) bound on the broker.
        self.bound: set[str] = set()
        #: Keys of :attr:`bound` handed out to be unbound, not yet confirmed: no longer
        #: bound for a socket waiting to be routable, nor settled if wanted again.
        self.unbinding: set[str] = set()
        #: Keys that may need binding, and keys that may need unbinding, in the order
        #: they came (dicts as ordered sets).
        self._to_bind: dict[str, None] = dict.fromkeys(always)
        self._to_unbind: dict[str, None] = {}
        self.changed = changed if changed is not None else asyncio.Event()
        self._gauge = gauge
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        #: Waiters of keys just bound: a batch of thousands of binds (a connect storm)
        #: confirmed at once would wake every socket waiting for one in one pass.
        self._waking: PerPass[asyncio.Future[None]] = PerPass(WAKE_BATCH, _wake)

    def want(self, routing_key: str) -> None:
        """Have ``routing_key`` bound (in the next batch, unless it is already)."""
        self.desired.add(routing_key)
        self._to_unbind.pop(routing_key, None)
        if routing_key not in self.bound or routing_key in self.unbinding:
            self._to_bind[routing_key] = None
            self.changed.set()

    def release(self, routing_key: str) -> None:
        """Have ``routing_key`` unbound (in a coming batch, if it is bound)."""
        self.desired.discard(routing_key)
        self._to_bind.pop(routing_key, None)
        if routing_key in self.bound:
            self._to_unbind[routing_key] = None
            self.changed.set()

    def is_bound(self, routing_key: str) -> bool:
        """Whether ``routing_key`` is wanted and bound on the broker (and stays so)."""
        return (
            routing_key in self.bound
            and routing_key in self.desired
            and routing_key not in self.unbinding
        )

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
        """The next batch: keys to bind, keys to unbind (each handed out once).

        A key wanted again while its unbind is under way stays to be bound: it is
        bound anew in a batch after that unbind is confirmed.
        """
        desired, bound, unbinding = self.desired, self.bound, self.unbinding
        to_bind: list[str] = []
        done: list[str] = []
        for key in self._to_bind:
            if len(to_bind) >= _BIND_BATCH:
                break
            if key in unbinding:
                continue  # wanted again during its unbind: after it
            if key in desired and key not in bound:
                to_bind.append(key)
            done.append(key)
        to_unbind: list[str] = []
        gone: list[str] = []
        for key in self._to_unbind:
            if len(to_unbind) >= _UNBIND_BATCH:
                break
            if key in bound and key not in desired and key not in unbinding:
                to_unbind.append(key)
            gone.append(key)
        for key in done:
            del self._to_bind[key]
        for key in gone:
            del self._to_unbind[key]
        unbinding.update(to_unbind)
        return to_bind, to_unbind

    def applied(self, bound: list[str], unbound: list[str]) -> None:
        """Record a batch the broker has done; wakes those waiting for ``bound`` keys.

        A key released while its bind was under way is to be unbound now.
        """
        self.bound.update(bound)
        self.bound.difference_update(unbound)
        self.unbinding.difference_update(unbound)
        desired = self.desired
        for key in bound:
            self._waking.extend(self._waiters.pop(key, ()))
            if key not in desired:
                self._to_unbind[key] = None
                self.changed.set()
        if self._gauge is not None:
            self._gauge.set(len(self.bound))

    def forget_bound(self) -> None:
        """After a reconnect: bind everything wanted again (binding is idempotent).

        Keys no longer wanted stay in ``bound``: the queue may have outlived the
        disconnect with them, so they are unbound.
        """
        self.unbinding.clear()
        self.bound.difference_update(self.desired)
        self._to_bind = dict.fromkeys(self.desired)
        self._to_unbind = dict.fromkeys(self.bound)
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
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_notification = on_notification
        self.on_control = on_control
        self.replica_id = replica_id or settings.replica_id or default_replica_id()
        self.queue_name = f"notifyd.replica.{self.replica_id}"
        self.ids = ids or IdGenerator()
        #: Keys of the users and topics this replica holds (and ``broadcast``,
        #: ``control``), bound on ``notifyd.route``: what makes a user online.
        self.bindings = BindingTable(gauge=self.metrics.bindings)
        #: Keys bound on ``notifyd`` itself for the in-memory history only (users gone
        #: for longer than ``[ws] binding_grace``): they reach this replica's history
        #: without keeping the user from looking offline (see :mod:`notifyd.offline`).
        self.history_bindings = BindingTable(
            (), self.bindings.changed, self.metrics.history_bindings
        )
        self.connected = asyncio.Event()
        #: Awaited with the new connection after each (re)connect, before consuming.
        self.on_connected: list[Callable[[AbstractConnection], Awaitable[None]]] = []
        #: Awaited with the new connection and a unix time when this replica's queue
        #: was gone on reconnect (deleted, or expired with what it held): what was
        #: routed since about that time never reached this replica. Runs after
        #: :attr:`on_connected`, with every binding in place, before consuming.
        self.on_queue_lost: list[Callable[[AbstractConnection, float], Awaitable[None]]] = []
        #: The URL of the node this replica is connected to (or last tried).
        self.current_url = settings.node_urls[0]
        #: ``time.monotonic()`` since when there is no connection (None: connected).
        self.disconnected_since: float | None = time.monotonic()
        #: Receipts awaiting RabbitMQ's confirm at once before more are dropped.
        self.max_receipts_in_flight = MAX_RECEIPTS_IN_FLIGHT
        self._receipts_in_flight = 0
        self._connection: AbstractConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._lost = asyncio.Event()
        self._closing = False
        #: The last delivery tag handled on the consuming channel, and the last acked.
        self._ack_tag = 0
        self._acked_tag = 0
        #: Tags of dead-lettered messages whose dead letter RabbitMQ has not confirmed:
        #: no ack (they are all ``multiple``) may cover them until it has.
        self._unsettled: set[int] = set()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._consume_channel: RawChannel | None = None
        self._consumer_tag: str | None = None
        #: The task applying binding changes on the consuming channel (None before the
        #: first connect).
        self._binding_task: asyncio.Task[None] | None = None
        #: Every task this broker started: cancelled and awaited on disconnect.
        self._tasks: set[asyncio.Task[None]] = set()
        #: One log line per problem a minute.
        self._logged = Throttle()
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
                    self.metrics.broker_reconnects.inc()
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
        connection = await open_connection(url, f"notifyd {self.replica_id}")
        self._connection = connection
        connection.close_callbacks.add(self._on_lost)
        publisher = await connection.channel(publisher_confirms=True)
        publisher.close_callbacks.add(self._on_lost)
        await declare_topology(publisher)
        await declare_routing(publisher)
        await self._declare_dead_letter_queue(connection)
        existed = await self._declare_replica_queue(connection)
        consumer = await connection.channel(publisher_confirms=False)
        consumer.close_callbacks.add(self._on_lost)
        raw = await consumer.get_underlay_channel()
        self.bindings.forget_bound()
        self.history_bindings.forget_bound()
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
        # Delivery tags start again at 1 on a new channel.
        self._ack_tag = self._acked_tag = 0
        self._unsettled.clear()
        self._consume_channel = raw
        # RabbitMQ cancels the consumer if the queue goes away under it (deleted):
        # reconnecting declares it again, instead of staying connected to nothing.
        raw.on_consumer_cancel_callbacks.add(self._on_lost)
        consume_ok = await raw.basic_consume(self.queue_name, self._on_delivery, no_ack=False)
        self._consumer_tag = consume_ok.consumer_tag
        self._publisher = publisher
        self._binding_task = self._spawn(self._binding_worker(raw))
        self.disconnected_since = None
        self.connected.set()
        self.metrics.broker_connected.set(1)
        log.info(
            "broker connected to %s: queue %s, %d bindings",
            redact_url(url),
            self.queue_name,
            len(self.bindings.bound),
        )

    async def _declare_replica_queue(self, connection: AbstractConnection) -> bool:
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
            async with scratch_channel(connection) as channel:
                await channel.queue_delete(self.queue_name)
            refused = await declare_queue(connection, self.queue_name, arguments)
            if refused is not None:
                raise RuntimeError(f"cannot declare queue {self.queue_name}: {refused}")
        return existed

    async def _declare_dead_letter_queue(self, connection: AbstractConnection) -> None:
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

    def _on_lost(self, *_: object) -> None:
        self._lost.set()

    async def _disconnect(self) -> None:
        if self.disconnected_since is None:
            self.disconnected_since = time.monotonic()
        self.connected.clear()
        self.metrics.broker_connected.set(0)
        self._publisher = None
        self._consume_channel = None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        # Unacked deliveries (and those whose dead letter was under way) are
        # delivered again by RabbitMQ once the channel is gone.
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    async def close(self) -> None:
        """Unbind, stop consuming, delete this replica's queue and close.

        Called once every socket is gone, so nothing in the queue is for anyone here;
        deleted rather than left to expire. Unbound first: RabbitMQ 3.10 closes the
        connection (541 INTERNAL_ERROR) of every publisher with confirms whose message
        is routed to a quorum queue as it expires or is deleted, so a replica going
        away while still bound would cut off the backends publishing to its users
        (or to ``broadcast``) at that moment. (Later versions reject such messages
        instead, until rabbitmq-server#15333: the queue stops before its bindings
        are removed.)
        """
        self._closing = True
        self._lost.set()
        connection = self.connection
        if connection is not None:
            await self._unbind_everything(UNBIND_ALL_TIMEOUT)
            # Our own cancel first: deleting the queue under the consumer would have
            # RabbitMQ cancel it, which reads as a failure in the log.
            if self._consume_channel is not None and self._consumer_tag is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._consume_channel.basic_cancel(self._consumer_tag), 5
                    )
            with contextlib.suppress(Exception):
                async with scratch_channel(connection) as channel:
                    await asyncio.wait_for(channel.queue_delete(self.queue_name), 5)
        await self._disconnect()

    async def _unbind_everything(self, timeout: float) -> None:
        """Release every key of both tables and wait until the binding worker has
        unbound them all (at most ``timeout`` seconds, and only while it runs)."""
        for table in (self.bindings, self.history_bindings):
            for key in list(table.desired):
                table.release(key)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                # The worker reports no completion of its own; a shutdown can poll.
                worker = self._binding_task
                while (
                    self.connected.is_set()
                    and worker is not None
                    and not worker.done()
                    and (self.bindings.bound or self.history_bindings.bound)
                ):
                    await asyncio.sleep(0.02)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task of this broker's (awaited on disconnect)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- bindings ---------------------------------------------------------------------

    async def _apply_bindings(self, raw: RawChannel) -> None:
        """Send pending binds without waiting for each, one barrier, then the unbinds.

        Both tables in each batch, every bind before any unbind: a key moving from
        ``notifyd.route`` to the history-only binding on ``notifyd`` (released from
        one and wanted by the other at once) is bound anew before it is unbound.
        The binds are confirmed before the unbinds start: ``queue.unbind`` has no
        ``nowait``, so a batch of them waits for its replies (:func:`call_frames`),
        and the new sockets of a reconnect wave must not wait for their welcome
        behind the unbinds of the sockets that left.
        """
        while True:
            to_bind, to_unbind = self.bindings.pending()
            history_bind, history_unbind = self.history_bindings.pending()
            if not (to_bind or to_unbind or history_bind or history_unbind):
                return
            queue, number = self.queue_name, channel_number(raw)
            binds = _on_exchanges(to_bind, history_bind)
            if binds:
                await send_batched(
                    raw, (frames.bind(number, queue, exchange, key) for exchange, key in binds)
                )
                # The channel processes methods in order: when this answers, every
                # bind sent before it is in effect.
                await raw.exchange_declare(
                    EXCHANGE, exchange_type="topic", durable=True, passive=True
                )
                self.bindings.applied(to_bind, [])
                self.history_bindings.applied(history_bind, [])
            unbinds = _on_exchanges(to_unbind, history_unbind)
            if unbinds:
                await call_frames(
                    raw,
                    [frames.unbind(number, queue, exchange, key) for exchange, key in unbinds],
                    Queue.UnbindOk,
                )
            self.bindings.applied([], to_unbind)
            self.history_bindings.applied([], history_unbind)

    async def _binding_worker(self, raw: RawChannel) -> None:
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
            if not await self.bindings.wait_bound(key, timeout) and self._logged.due("slow-bind"):
                # Once a minute: in a connect storm, thousands of keys wait together.
                log.warning(
                    "binding %s (and maybe others) not confirmed by RabbitMQ within %.1fs: "
                    "welcome sent anyway; %d bindings still pending",
                    key,
                    timeout,
                    len(self.bindings.desired - self.bindings.bound),
                )
                return

    # --- consuming --------------------------------------------------------------------

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        self.handle_delivery(message)

    def handle_delivery(self, message: DeliveredMessage) -> None:
        """Hand one consumed message to the hub (or the control handler); never raises.

        What cannot be delivered is dead-lettered: acknowledged only once RabbitMQ has
        confirmed the dead letter. Everything else is acknowledged in the next batch.
        """
        delivery = Delivery.of(message)
        now = time.time()
        try:
            if delivery.routing_key == CONTROL_ROUTING_KEY:
                self.metrics.notifications_received.labels("control").inc()
                self.on_control(decode_control(delivery.body, delivery.published_at or now))
            else:
                notification = delivery.notification(
                    ids=self.ids, max_body_size=self.settings.max_body_size, now=now
                )
                published = notification.published_at
                self._caught_up_to = now if published is None else min(now, published)
                self.on_notification(notification)
        except InvalidMessage as exc:
            self._dead_letter(delivery, exc.reason, str(exc))
        except Exception:
            # A bug must not kill the consumer: park the message and carry on (the
            # traceback is logged with the once-a-minute line, not once per message).
            self._dead_letter(delivery, "internal_error", "notifyd failed to handle it", True)
        self._ack(delivery.tag)

    def _ack(self, tag: int) -> None:
        self._ack_tag = tag
        if self._ack_timer is None:
            # One ack (multiple=True) per interval instead of one write per message;
            # a crash re-delivers at most this window, which dedupe drops by id.
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_INTERVAL, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_timer = None
        channel, tag = self._consume_channel, self._ack_tag
        if self._unsettled:
            # An ack with multiple=True covers every earlier tag: stop short of the
            # first dead letter RabbitMQ has not confirmed yet. The rest is acked
            # once it has (or the message is handed back): see _settle_dead_letter.
            tag = min(self._unsettled) - 1
        if channel is None or tag <= self._acked_tag or channel.is_closed:
            return
        self._acked_tag = tag
        self._spawn(self._send_ack(channel, tag))

    @staticmethod
    async def _send_ack(channel: RawChannel, tag: int) -> None:
        # A failure means the channel is gone: RabbitMQ delivers these again.
        with contextlib.suppress(aiormq.AMQPError, ConnectionError, RuntimeError):
            await channel.basic_ack(tag, multiple=True)

    def _dead_letter(
        self, delivery: Delivery, reason: str, detail: str, exc_info: bool = False
    ) -> None:
        if self._logged.due(f"dead:{reason}"):
            log.warning(
                "dead-lettering message id=%r key=%r: %s (%s); further %s messages are "
                "counted in notifyd_dead_lettered_total",
                delivery.message_id,
                delivery.routing_key,
                detail,
                reason,
                reason,
                exc_info=exc_info,
            )
        channel = self._consume_channel
        if channel is None:  # not consumed through this broker (nothing to ack)
            return
        self._unsettled.add(delivery.tag)
        message = dead_letter_message(delivery, reason, detail, self.replica_id, time.time())
        self._spawn(self._settle_dead_letter(channel, delivery, reason, message))

    async def _settle_dead_letter(
        self, channel: RawChannel, delivery: Delivery, reason: str, message: aio_pika.Message
    ) -> None:
        """Publish a dead letter; the message it was is acked only once it is confirmed.

        Not confirmed (RabbitMQ refused it, no answer within the timeout): after
        :data:`DEAD_LETTER_RETRY_PAUSE`, the message is handed back (``basic.nack``
        with requeue) to be delivered and dead-lettered again, never acked unseen.
        """
        tag = delivery.tag
        try:
            # Not mandatory: with no queue bound to notifyd.dlx (notifyd.dead is on a
            # node that is down, or an operator unbound it), RabbitMQ confirms and
            # drops it, as it would with its own dead-lettering.
            await self._publish(DEAD_LETTER_EXCHANGE, delivery.routing_key, message, False)
        except BrokerUnavailable as exc:
            if self._logged.due("dead-letter-failed"):
                log.warning(
                    "dead letter for message id=%r not taken (%s): the message is delivered "
                    "again in %gs",
                    delivery.message_id,
                    exc,
                    DEAD_LETTER_RETRY_PAUSE,
                )
            await asyncio.sleep(DEAD_LETTER_RETRY_PAUSE)
            if channel is self._consume_channel:
                # Sent before the tag leaves _unsettled, so before any ack covering it.
                with contextlib.suppress(aiormq.AMQPError, ConnectionError, RuntimeError):
                    await channel.basic_nack(tag, multiple=False, requeue=True)
        else:
            self.metrics.dead_lettered.labels(reason).inc()
            self.metrics.notifications_dropped.labels("invalid").inc()
        finally:
            # Not after a reconnect: the tag was this channel's, and RabbitMQ delivers
            # everything unacked on it again.
            if channel is self._consume_channel:
                self._unsettled.discard(tag)
                self._ack(self._ack_tag)

    # --- publishing -------------------------------------------------------------------

    async def _publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, mandatory: bool
    ) -> None:
        """Publish and wait for RabbitMQ's confirm; raises :class:`BrokerUnavailable`
        while disconnected, on a publish error, a nack, a return (``mandatory``) or no
        confirm within :data:`PUBLISH_TIMEOUT`."""
        channel = self._publisher
        if channel is None or channel.is_closed:
            raise BrokerUnavailable("not connected to RabbitMQ")
        try:
            target = (
                channel.default_exchange
                if exchange == ""
                else await channel.get_exchange(exchange, ensure=False)
            )
            confirmation = await asyncio.wait_for(
                target.publish(message, routing_key, mandatory=mandatory), PUBLISH_TIMEOUT
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
        ttl: float | None = None,
        receipt: bool = False,
    ) -> str:
        """Publish a notification through the ``notifyd`` exchange (every replica sees it).

        As :class:`notifyd.publisher.Publisher` does (one format:
        :func:`notifyd.amqp.notification_message`): ``sender`` a user publishing from a
        socket, ``message_id`` (generated when None), ``ttl`` (seconds), ``receipt``.
        Returns the id once RabbitMQ confirmed it. Raises :class:`ProtocolError`
        (``too_deep``, ``too_big``) for one that the replicas would dead-letter, before
        anything is published, and :class:`BrokerUnavailable` when it is not confirmed.
        """
        now = time.time()
        notification_id = message_id or self.ids.new(int(now * 1000))
        message = notification_message(
            data,
            message_id=notification_id,
            now=now,
            event=event,
            sender=sender,
            ttl=ttl,
            receipt=receipt,
            max_body_size=self.settings.max_body_size,
        )
        # Nobody online for a notification is normal: RabbitMQ drops it, and that
        # is not a failure.
        await self._publish(EXCHANGE, channel.routing_key, message, mandatory=False)
        return notification_id

    async def send_upstream(self, user: str, session: str, event: str, data: Any) -> None:
        """A client's message to the backends (``notifyd.upstream``, key ``user.<id>``),
        stamped with who sent it. Raises :class:`BrokerUnavailable` when it is not
        confirmed, including when no backend's queue is bound for it (returned)."""
        now = time.time()
        message = upstream_message(
            user, session, event, data, message_id=self.ids.new(int(now * 1000)), now=now
        )
        await self._publish(UPSTREAM_EXCHANGE, Channel.user(user).routing_key, message, True)

    @property
    def connection(self) -> AbstractConnection | None:
        """The live AMQP connection, or None while disconnected."""
        return self._connection if self.connected.is_set() else None

    def send_receipt(self, notification: Notification, delivered: int) -> None:
        """Tell the publisher how many sockets on this replica got a notification.

        Published in the background. At most :attr:`max_receipts_in_flight` await
        RabbitMQ's confirm at once: past that a receipt is dropped and counted
        (``notifyd_receipts_total{outcome="dropped"}``), logged once a minute.
        """
        if self._receipts_in_flight >= self.max_receipts_in_flight:
            self.metrics.receipts.labels("dropped").inc()
            if self._logged.due("receipts-dropped"):
                log.warning(
                    "%d receipts await RabbitMQ's confirm: further receipts are dropped "
                    '(counted in notifyd_receipts_total{outcome="dropped"})',
                    self._receipts_in_flight,
                )
            return
        message = receipt_message(notification, delivered, self.replica_id, time.time())
        self._receipts_in_flight += 1
        task = self._spawn(self._receipt(notification.channel.routing_key, message, delivered))
        # A callback, not a ``finally``: a task cancelled before it ran never runs one.
        task.add_done_callback(self._receipt_done)

    def _receipt_done(self, _: asyncio.Task[None]) -> None:
        self._receipts_in_flight -= 1

    async def _receipt(self, routing_key: str, message: aio_pika.Message, delivered: int) -> None:
        try:
            await self._publish(RECEIPTS_EXCHANGE, routing_key, message, mandatory=True)
        except BrokerUnavailable as exc:
            log.info("receipt not published: %s", exc)
            self.metrics.receipts.labels("failed").inc()
        else:
            self.metrics.receipts.labels("delivered" if delivered else "offline").inc()


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
