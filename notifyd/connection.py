"""The ``/ws`` endpoint's I/O: the upgrade, then each socket's transport.

aiohttp serves the upgrade request: :meth:`SocketServer.handle` checks it
(Origin, draining, header size, the RFC 6455 handshake) and writes the ``101``
itself. From then on the socket is notifyd's: the transport is handed to a
:class:`Connection` (``transport.set_protocol``) and aiohttp's request, handler,
parser and writer are released, so an idle socket costs one small object and
the transport. Everything the socket does is decided by its
:class:`~notifyd.session.Session`; the connection only carries bytes in and out,
runs what the session asks for (verify a token, join the hub, read a replay,
publish) and feeds the results back.

Memory: a connection holds no closure, no task and no callback that refers back
to it once it is closed. Its one timer handle (the session's next deadline) is
cancelled when the connection is lost, so every closed socket is freed by
reference counting, never left to the cycle collector.

Writes are corked: frames are queued on the session and written once per
event-loop pass by the :class:`Outbox`, so a burst of notifications costs each
socket one system call, not one per frame.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, ClassVar, Final, Protocol

from aiohttp import web

from .auth import Identity, TokenVerifier
from .closes import CloseReason
from .config import Settings
from .errors import AuthError, BrokerUnavailable, HandshakeError, ProtocolError
from .hub import Hub
from .lifecycle import Drain, OwnedTasks, PerPass, Turns
from .logs import Throttle
from .metrics import Metrics
from .protocol import (
    SUBPROTOCOL,
    Channel,
    Notification,
    Publish,
    ResumePoint,
    resume_point,
)
from .session import (
    ALL_SO_FAR,
    Abort,
    Acked,
    Action,
    CloseTransport,
    Join,
    Leave,
    ReadHistory,
    Replay,
    Session,
    SessionConfig,
    State,
    Subscribe_,
    Unsubscribe_,
    Unwatch,
    Upstream,
    Verify,
    Watch,
)
from .websocket import handshake

log = logging.getLogger(__name__)

#: The total size of an upgrade request's header lines; larger ones get 431.
MAX_REQUEST_HEAD: Final = 16_384
#: Unparsed client bytes kept while the session waits for an answer; past this
#: the transport stops reading until the session reads on.
READ_PAUSE_BYTES: Final = 1 << 18
_NEVER: Final = math.inf
#: Ended sockets cleaned up per event-loop pass (see :meth:`SocketServer.reap_later`).
#: Each is ~60 µs of CPU on a slow machine, most of it uvloop closing the socket:
#: 20 keep a pass near 1 ms (200 made each pass of a disconnect wave ~13 ms).
REAP_BATCH: Final = 20
#: Upgrades (and welcomes after a binding) handled per event-loop pass (see
#: :meth:`SocketServer.admit`): at ~0.5 ms of CPU each on a slow machine, 4 keep a
#: pass near 2 ms; 64 made every pass of a connect storm a 25-40 ms stall.
ADMIT_BATCH: Final = 4
#: New HTTP connections whose first bytes are parsed per event-loop pass (see
#: :meth:`SocketServer.pace_requests`): ~30-80 µs each (aiohttp's parser, its
#: request message and handler task), so 16 keep a pass near 1 ms; a wave's load
#: balancer or client pool sends hundreds in one burst (one 18 ms pass for 232).
PARSE_BATCH: Final = 16


class Upstream_(Protocol):
    """Publishing on a client's behalf (implemented by :class:`notifyd.broker.Broker`)."""

    async def publish(
        self, channel: Channel, event: str | None, data: Any, sender: str | None = None
    ) -> str:
        """Publish a notification through RabbitMQ; returns its id."""

    async def send_upstream(self, user: str, session: str, event: str, data: Any) -> None:
        """Publish a client message to ``notifyd.upstream``."""


class Routing(Protocol):
    """Whether RabbitMQ routes routing keys to this replica yet (the broker)."""

    def is_routable(self, routing_keys: Iterable[str]) -> bool:
        """True if every key is bound already (or there is no broker to wait for)."""

    async def wait_routable(self, routing_keys: list[str]) -> None:
        """Wait until these keys are bound (bounded by a timeout)."""


class Presence(Protocol):
    """``presence:<id>`` subscriptions (:class:`notifyd.cluster.ClusterLink`)."""

    async def watch(self, member: Any, user: str) -> None:
        """Write ``user``'s presence transitions to ``member`` (once they are routed here)."""

    def unwatch(self, member: Any, user: str) -> bool:
        """Stop; False if ``member`` did not watch ``user``."""


class HistoryReader(Protocol):
    """History pages (:class:`notifyd.history_api.HistoryApi`)."""

    async def read_page(
        self,
        reader: Identity,
        channel: Channel,
        limit: int | None,
        before: str | None,
        transport: str = "http",
    ) -> dict[str, Any]:
        """A page of ``channel``; raises ProtocolError with the code for the client."""


#: Replays everything after ``since`` on ``channels`` (oldest first) or None.
Replayer = Callable[[ResumePoint, list[Channel], int | None], Awaitable[list[Notification] | None]]


class Outbox:
    """Connections with queued frames, flushed together once per event-loop pass.

    Writing each frame as it comes costs a system call per frame and socket; a
    fan-out burst (several notifications read from RabbitMQ in one pass) then
    pays that many times per socket. Frames queued during one pass leave in one
    write per socket at the start of the next.
    """

    __slots__ = ("_pending", "_scheduled")

    def __init__(self) -> None:
        self._pending: list[Connection] = []
        self._scheduled = False

    def add(self, connection: Connection) -> None:
        self._pending.append(connection)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for connection in pending:
            connection.flush()


class _TakenOver(web.StreamResponse):
    """What the handler returns once the socket is notifyd's: aiohttp writes nothing."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


_TAKEN_OVER: Final = _TakenOver(status=101)


class _FirstBytes(asyncio.Protocol):
    """The protocol of a new HTTP connection until its first bytes have had their
    turn to be parsed (:meth:`SocketServer.pace_requests`); then aiohttp's handler
    is the transport's protocol again.

    While it holds bytes (one read, at most :data:`MAX_REQUEST_HEAD`), reading is
    paused. The handler stays registered with aiohttp's server, so its handshake
    timeout and a shutdown still close the connection; a loss or an EOF meanwhile
    goes to it.
    """

    __slots__ = ("data", "handler", "transport", "turns")

    def __init__(self, handler: Any, transport: asyncio.Transport, turns: Turns) -> None:
        self.handler = handler
        self.transport = transport
        self.turns = turns
        self.data = b""

    def data_received(self, data: bytes) -> None:
        # More than a request head's limit is not an upgrade request (aiohttp refuses
        # it at once): held, it would only hold memory.
        if self.turns.now() or len(data) > MAX_REQUEST_HEAD:
            self.transport.set_protocol(self.handler)
            self.handler.data_received(data)
        else:
            self.data = data
            self.transport.pause_reading()
            self.turns.later(self.go)

    def go(self) -> bool:
        """The held bytes' turn: to aiohttp's handler; False if the connection was
        closed meanwhile."""
        transport, handler = self.transport, self.handler
        if transport.is_closing():
            return False
        transport.set_protocol(handler)
        transport.resume_reading()
        handler.data_received(self.data)
        return True

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:  # pragma: no cover (nothing is written yet)
        self.handler.pause_writing()

    def resume_writing(self) -> None:  # pragma: no cover
        self.handler.resume_writing()


class TimedSession(Session):
    """A session driven by an I/O adapter: one event-loop timer for its deadlines, and
    an event that raises closes it with ``1011`` instead of escaping. Shared by the
    WebSocket adapter (:class:`Connection`) and SSE (:class:`notifyd.sse.SseStream`),
    which set ``server`` (anything with a ``loop``) and define :meth:`after`."""

    __slots__ = ("_timer", "_timer_at")

    #: What a failure log line calls one of these.
    NOUN: ClassVar[str] = "session"
    server: Any

    def __init__(
        self, config: SessionConfig, now: float, token: str | None, since: ResumePoint | None
    ) -> None:
        super().__init__(config, now, token, since)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER

    def after(self, now: float) -> None:
        raise NotImplementedError

    def close_soon(self, why: CloseReason) -> None:
        """Close for ``why`` after what is queued (drain, disconnect, revoke)."""
        now = time.time()
        self.close_for(why, now)
        self.after(now)

    def _set_timer(self, wake_at: float, now: float) -> None:
        """One timer, due at ``wake_at`` (never: none); moved only when that changed."""
        if wake_at != self._timer_at:
            self._cancel_timer()
            self._timer_at = wake_at
            if wake_at != _NEVER:
                self._timer = self.server.loop.call_later(max(0.0, wake_at - now), self._wake)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        self._timer = None
        self._timer_at = _NEVER
        now = time.time()
        try:
            self.wake(now)
        except Exception:
            self._internal_error(now)
        self.after(now)

    def _internal_error(self, now: float) -> None:
        log.exception(
            "%s %s of %s failed", self.NOUN, self.id or "(new)", self.user or "(anonymous)"
        )
        self.close_for(CloseReason.INTERNAL_ERROR, now)


class Connection(TimedSession):
    """One socket after the upgrade: an asyncio protocol around its session.

    The hub holds connections (``user``, ``deadline``, ``topics`` and
    :meth:`write` are its view); the heartbeat calls :meth:`heartbeat`.
    """

    __slots__ = (
        "_paused",
        "_pending_from",
        "_queued",
        "_reaping",
        "server",
        "transport",
    )

    def __init__(
        self,
        server: SocketServer,
        transport: asyncio.Transport,
        now: float,
        token: str | None,
        since: ResumePoint | None,
    ) -> None:
        super().__init__(server.session_config, now, token, since)
        self.server = server
        self.transport: asyncio.Transport | None = transport
        #: In the outbox, waiting for the next flush.
        self._queued = False
        self._paused = False
        #: The client address while the socket counts as pending (not authenticated).
        self._pending_from: str | None = None
        #: Waiting in the server's queue of ended sockets to be cleaned up.
        self._reaping = False

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        """Not called: the transport is handed over by ``set_protocol``."""

    def data_received(self, data: bytes) -> None:
        now = time.time()
        try:
            self.receive_data(data, now)
        except Exception:
            self._internal_error(now)
        if self.state is State.CLOSED:
            self.server.reap_later(self)  # the client closed: clean up in a later pass
        else:
            self.after(now)
            if self._queued:
                # The answer to what the client sent (a pong, an ack, an error) leaves
                # now: through the outbox it would wait for the next pass, behind
                # that pass's paced work (reaping, admissions) — the client's round trip.
                self.flush()

    def eof_received(self) -> bool:
        """A half-closed peer is a gone peer: the session ends now, and our side is
        closed by the reaper in a later pass (:meth:`SocketServer.reap_later`).

        Thousands of peers leaving at once (a network blip) send their EOFs
        together; were each socket closed where its EOF arrives, every ``close()``
        (and the TCP work the kernel does in it) would run in one pass of the event
        loop. Reading has stopped; the transport stays open until the reaper's turn.
        """
        self.lost()
        self.server.reap_later(self)
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost()
        self.transport = None
        self._cancel_timer()
        self.server.connections.discard(self)
        if self._actions is not None or self._pending_from is not None:
            self.server.reap_later(self)

    def reap(self) -> None:
        """Clean up after the socket ended (leave the hub, close the transport)."""
        self._reaping = False
        self.after(time.time())
        transport = self.transport
        if transport is not None and self.state is State.CLOSED and not transport.is_closing():
            transport.close()  # the peer's EOF ended the session (:meth:`eof_received`)

    def pause_writing(self) -> None:
        """The send buffer is bounded by :meth:`write`'s check, not by flow control."""

    def resume_writing(self) -> None:
        pass

    # --- the hub's and the heartbeat's view ------------------------------------------

    def write(self, frame: bytes, seq: int, now: float) -> bool:
        """Queue a live frame (the fan-out path: nothing awaited, nothing written yet)."""
        transport = self.transport
        if transport is None:
            return False
        queued = self.live(frame, seq, transport.get_write_buffer_size(), now)
        # A send buffer overflow starts the close: the next flush carries it out
        # (not here, while the hub iterates over its sockets).
        if not self._queued and (queued or self._actions is not None):
            self._queued = True
            self.server.outbox.add(self)
        return queued

    def heartbeat(self) -> None:
        now = time.time()
        self.tick(now)
        self.after(now)

    def flush(self) -> None:
        """Write what is queued (the outbox calls this once per loop pass)."""
        self._queued = False
        data = self.take_output()
        transport = self.transport
        if data is not None and transport is not None and not transport.is_closing():
            transport.write(data)
        if self._actions is not None:
            self.after(time.time())

    # --- carrying out what the session asks for --------------------------------------

    def after(self, now: float) -> None:
        """After an event: run the session's requests, queue its output, set its timer."""
        action = self._act(now)
        if action is not None:
            self.server.spawn(self._run(action))
        self._settle(now)

    def _settle(self, now: float) -> None:
        if self._pending_from is not None and (self.identity is not None or self.transport is None):
            self.server.not_pending(self._pending_from)
            self._pending_from = None
        if self.out is not None and not self._queued and self.transport is not None:
            self._queued = True
            self.server.outbox.add(self)
        wake_at = self.wake_at
        transport = self.transport
        if (
            transport is not None
            and transport.is_closing()
            and not transport.get_write_buffer_size()
        ):
            # Closed with nothing left to send: it is gone in a moment, and a
            # deadline to cut it off would only be set to be cancelled.
            wake_at = _NEVER
        if transport is not None:
            self._set_timer(wake_at, now)
            if self.busy and self.parser.buffered > READ_PAUSE_BYTES:
                if not self._paused:
                    self._paused = True
                    transport.pause_reading()
            elif self._paused:
                self._paused = False
                transport.resume_reading()

    def _act(self, now: float) -> Action | None:
        """Run the synchronous requests; return the one that must be awaited, if any.

        The session asks for at most one awaited thing at a time (it reads
        nothing more until it has the answer).
        """
        waiting: Action | None = None
        while (actions := self.take_actions()) is not None:
            for action in actions:
                try:
                    if not self._do(action, now):
                        waiting = action
                except Exception:
                    self._internal_error(now)
        return waiting

    def _do(self, action: Action, now: float) -> bool:
        """Carry out ``action`` if it needs no waiting; False if it must be awaited."""
        server = self.server
        hub = server.hub
        if isinstance(action, Leave):
            hub.remove(self)
        elif isinstance(action, CloseTransport):
            self.flush()
            if self.transport is not None:
                self.transport.close()
        elif isinstance(action, Abort):
            self.out = None
            if self.transport is not None:
                self.transport.abort()
        elif isinstance(action, Join):
            hub.add(self)
            if not server.routing_ready(hub.channels_of(self)):
                return False
            self.joined(now)
        elif isinstance(action, Subscribe_):
            if action.answer and self._over_user_topics(action.topic):
                self.failed(
                    "too_many_topics",
                    f"a user may read {server.settings.ws.max_topics_per_user} topics",
                    now,
                )
                return True
            hub.subscribe(self, action.topic)
            if action.answer:
                if not server.routing_ready([Channel("topic", action.topic)]):
                    return False
                self.done(None, now)
        elif isinstance(action, Unsubscribe_):
            hub.unsubscribe(self, action.topic)
        elif isinstance(action, Unwatch):
            if server.presence is not None:
                server.presence.unwatch(self, action.user)
        elif isinstance(action, Watch) and server.presence is None:
            self.failed("unavailable", "presence is not available here", now)
        elif isinstance(action, Acked):
            if server.on_ack is not None:
                server.on_ack(self, action.id)
        elif isinstance(action, Verify):
            identity = server.verify_now(action.token, now)
            if identity is None:
                return False
            self._feed_identity(identity, now)
        else:
            return False  # Replay, Upstream, Watch: always awaited
        return True

    def _over_user_topics(self, topic: str) -> bool:
        """Whether a new ``topic`` would pass the user's cap over all their sockets.

        Each topic the user reads may cost a binding on this replica's queue; a
        socket's own cap alone would let a user multiply it by their sockets.
        """
        topics = self.server.hub.topics_of(self.user)
        return topic not in topics and len(topics) >= self.server.settings.ws.max_topics_per_user

    def _feed_identity(self, identity: Identity | tuple[str, str], now: float) -> None:
        if isinstance(identity, tuple):
            self.refused(*identity, now)
        else:
            user_sockets = self.server.hub.connections_of(identity.user)
            self.verified(identity, now, user_sockets, not self.server.draining)

    async def _run(self, action: Action) -> None:
        """Await ``action`` and feed its result back; then the next awaited one, if any."""
        next_action: Action | None = action
        while next_action is not None:
            try:
                await self._await(next_action)
            except Exception:
                self._internal_error(time.time())
            now = time.time()
            next_action = self._act(now)
            self._settle(now)

    async def _await(self, action: Action) -> None:
        server = self.server
        if isinstance(action, Verify):
            try:
                identity = await server.verifier.verify(action.token)
            except AuthError as exc:
                # Handled here: an exception kept in a local would hold this frame
                # (and the connection) in a reference cycle through its traceback.
                self.refused(exc.reason, str(exc), time.time())
            else:
                self._feed_identity(identity, time.time())
        elif isinstance(action, Join):
            await server.wait_routable(server.hub.channels_of(self))
            # A binding batch wakes hundreds of new sockets at once: their welcomes
            # go out a batch per pass, as the upgrades came in.
            await server.admit()
            self.joined(time.time())
        elif isinstance(action, Subscribe_):
            await server.wait_routable([Channel("topic", action.topic)])
            self.done(None, time.time())
        elif isinstance(action, Watch) and server.presence is not None:
            await server.presence.watch(self, action.user)
            self.done(None, time.time())
        elif isinstance(action, Replay):
            missed = await server.read_replay(self, action)
            self.replayed(missed, time.time())
        elif isinstance(action, Upstream):
            await self._upstream(action)
        elif isinstance(action, ReadHistory):
            await self._read_history(action)

    async def _read_history(self, action: ReadHistory) -> None:
        history = self.server.history
        message = action.message
        if history is None:
            self.failed("history_off", "this gateway keeps no history", time.time())
            return
        try:
            page = await history.read_page(
                action.identity, message.channel, message.limit, message.before, "ws"
            )
        except ProtocolError as exc:
            self.failed(exc.code, exc.message, time.time())
            return
        self.done(page, time.time())

    async def _upstream(self, action: Upstream) -> None:
        message = action.message
        upstream = self.server.upstream
        try:
            if isinstance(message, Publish):
                result: str | None = await upstream.publish(
                    message.channel, message.event, message.data, sender=self.user
                )
            else:
                await upstream.send_upstream(self.user, self.id, message.event, message.data)
                result = None
        except BrokerUnavailable:
            kind = "publish" if isinstance(message, Publish) else "send"
            self.failed("broker_unavailable", f"cannot {kind} right now; retry", time.time())
            return
        except ProtocolError as exc:  # what would be published is not acceptable
            self.failed(exc.code, exc.message, time.time(), outcome="refused")
            return
        self.done(result, time.time())


def credentials(
    headers: Any, raw_path: str, query: Callable[[], Any], query_token: bool
) -> tuple[str | None, ResumePoint | None]:
    """The token and resume point an upgrade request carries, if any.

    From the ``Authorization`` header, or ``?token=`` when ``query_token`` is on;
    ``?since=`` (and ``since_ts``) may come with either. ``query()`` parses the
    query string; it is called only when there is one. Raises AuthError for a
    malformed header or a disabled ``?token=``, ProtocolError for a bad ``since``.
    """
    header = headers.get("Authorization", "")
    has_query = "?" in raw_path
    params = query() if has_query else None
    since = resume_point(params.get("since") or None, params.get("since_ts")) if params else None
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("malformed", "bad Authorization header")
        return value.strip(), since
    if params is not None and "token" in params:
        if not query_token:
            raise AuthError("malformed", "?token= is disabled; use the auth message")
        return params["token"], since
    return None, since


class SocketServer:
    """The ``/ws`` endpoint: upgrades requests and owns every connection it took over."""

    #: What a socket becomes after the upgrade (the tests' echo endpoint uses another).
    connection_class: type[Connection] = Connection

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        verifier: TokenVerifier,
        upstream: Upstream_,
        replay: Replayer | None,
        routing: Routing | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        #: The server's metrics (the hub's unless given); the sessions count in them too.
        self.metrics = metrics if metrics is not None else hub.metrics
        ws = settings.ws
        self.session_config = SessionConfig(
            max_message_size=ws.max_message_size,
            send_buffer_bytes=ws.send_buffer_bytes,
            auth_timeout=settings.auth.auth_timeout,
            leeway=settings.auth.leeway,
            refresh_before=ws.refresh_before,
            heartbeat=ws.heartbeat,
            rate_limit=ws.rate_limit,
            rate_burst=ws.rate_burst,
            max_connections_per_user=ws.max_connections_per_user,
            max_topics=ws.max_topics,
            metrics=self.metrics,
        )
        self.hub = hub
        self.verifier = verifier
        self.upstream = upstream
        self.replay = replay
        self.routing = routing
        self.draining = False
        #: Every socket taken over and not yet gone, authenticated or not.
        self.connections: set[Connection] = set()
        #: Connections of other transports (SSE streams) that count against
        #: ``[server] max_connections`` with these.
        self.other_connections: Callable[[], int] = lambda: 0
        self.outbox = Outbox()
        self.on_ack: Callable[[Connection, str], None] | None = None
        #: ``presence:<id>`` subscriptions (the gateway's cluster link), if any.
        self.presence: Presence | None = None
        #: History pages for the ``history`` message (None: history is off).
        self.history: HistoryReader | None = None
        #: What connections await; none is started after :meth:`close`.
        self._tasks = OwnedTasks("socket tasks")
        #: Done once a drain is to close the sockets it has not reached yet at once.
        self._drain = Drain()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Turns to be upgraded (and welcomed), a batch per event-loop pass.
        self._admission = Turns(ADMIT_BATCH)
        #: Turns for new HTTP connections' first bytes (:meth:`pace_requests`).
        self._parsing = Turns(PARSE_BATCH)
        #: Turns asked for at the admission gate so far (:meth:`admit`): how the
        #: collector policy (:mod:`notifyd.gcpolicy`) tells a connect storm.
        self.admissions = 0
        #: Ended sockets still to be cleaned up, a batch per event-loop pass.
        self._reaping: PerPass[Connection] = PerPass(REAP_BATCH, Connection.reap)
        #: Sockets upgraded and not yet authenticated, in total and by client address.
        self.pending = 0
        self._pending_by_address: dict[str, int] = {}
        self._pending_logged = Throttle()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # --- the upgrade ------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await self.admit()
        ws = self.settings.ws
        origin = request.headers.get("Origin")
        if ws.allowed_origins and origin not in ws.allowed_origins:
            self.metrics.connection_attempts.labels("origin").inc()
            log.info("refused origin %r", origin)
            raise web.HTTPForbidden(text="origin not allowed\n")
        if self.draining:
            self.metrics.connection_attempts.labels("overloaded").inc()
            raise web.HTTPServiceUnavailable(text="draining\n", headers={"Retry-After": "1"})
        if sum(len(k) + len(v) + 4 for k, v in request.raw_headers) > MAX_REQUEST_HEAD:
            self.metrics.connection_attempts.labels("bad_request").inc()
            raise web.HTTPRequestHeaderFieldsTooLarge(text="request headers too large\n")
        address = request.remote or ""
        per_address = ws.max_pending_per_address
        if self.pending >= ws.max_pending or (
            per_address and self._pending_by_address.get(address, 0) >= per_address
        ):
            self.metrics.connection_attempts.labels("pending_limit").inc()
            self._log_pending_limit(address)
            raise web.HTTPServiceUnavailable(
                text="too many unauthenticated sockets\n", headers={"Retry-After": "1"}
            )
        try:
            response = handshake(request.headers, (SUBPROTOCOL,))
        except HandshakeError as exc:
            self.metrics.connection_attempts.labels("bad_request").inc()
            return web.Response(status=exc.status, text=exc.message + "\n", headers=exc.headers)
        refusal: AuthError | ProtocolError | None = None
        token = since = None
        try:
            token, since = credentials(
                request.headers,
                request.raw_path,
                lambda: request.query,
                self.settings.auth.query_token,
            )
        except (AuthError, ProtocolError) as exc:
            refusal = exc
        transport = request.transport
        handler = request.protocol
        if transport is None or transport.is_closing():
            return _TAKEN_OVER  # the client is gone already
        self._take_over(transport, handler, response, token, since, refusal, address)
        return _TAKEN_OVER

    def _log_pending_limit(self, address: str) -> None:
        if self._pending_logged.due():  # once a minute, not once per refusal
            log.warning(
                "refusing upgrades: %d sockets pending authentication (%d from %s)",
                self.pending,
                self._pending_by_address.get(address, 0),
                address,
            )

    def _now_pending(self, connection: Connection, address: str) -> None:
        connection._pending_from = address
        self.pending += 1
        self._pending_by_address[address] = self._pending_by_address.get(address, 0) + 1
        self.metrics.pending_sockets.set(self.pending)

    def not_pending(self, address: str) -> None:
        """A pending socket authenticated, or went away."""
        self.pending -= 1
        left = self._pending_by_address.pop(address, 1) - 1
        if left > 0:
            self._pending_by_address[address] = left
        self.metrics.pending_sockets.set(self.pending)

    def _take_over(
        self,
        transport: Any,
        handler: Any,
        response: bytes,
        token: str | None,
        since: ResumePoint | None,
        refusal: AuthError | ProtocolError | None,
        address: str,
    ) -> None:
        """Write the 101 and make the socket a :class:`Connection`.

        aiohttp's handler keeps what the client sent after the request line and
        headers (``_message_tail``: often the auth message, in the same packet);
        it is passed on. The handler is then detached as if its connection were
        lost, with its transport unset first so that it does not close it: that
        removes it from the server's connection table and drops its parser, and
        the request it served ends with this handler's return.
        """
        now = time.time()
        tail: bytes = handler._message_tail
        handler._message_tail = b""
        transport.write(response)
        connection = self.connection_class(self, transport, now, token, since)
        handler.transport = None
        handler.connection_lost(None)
        transport.set_protocol(connection)
        self.connections.add(connection)
        self._now_pending(connection, address)
        if len(self.connections) + self.other_connections() > self.settings.server.max_connections:
            connection.close_for(CloseReason.SERVER_FULL, now)
        elif isinstance(refusal, AuthError):
            connection.refused(refusal.reason, str(refusal), now)
        elif refusal is not None:
            log.info("protocol error on a new socket: %s", refusal.message)
            connection.close_for(CloseReason.BAD_FIRST_MESSAGE, now, refusal.message)
        if tail:
            connection.data_received(tail)
        else:
            connection.after(now)

    # --- pacing: connect and disconnect storms ------------------------------------------

    def pace_requests(self, http_server: web.Server) -> None:
        """Parse the first bytes of :data:`PARSE_BATCH` new connections per pass.

        A reconnect wave's clients send their upgrade requests in bursts of
        hundreds; aiohttp parses each where it arrives, every one in the same pass
        of the event loop (its request message, then its handler task's first
        step), which holds every open socket's traffic up for tens of
        milliseconds before :meth:`admit` is reached. Each new connection of
        ``http_server`` gets a :class:`_FirstBytes` protocol until its turn.
        """
        turns = self._parsing
        registered = http_server.connection_made

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            registered(handler, transport)
            transport.set_protocol(_FirstBytes(handler, transport, turns))

        # aiohttp's handler reports each new connection to its server object: the
        # one place a connection is seen before its bytes are.
        http_server.connection_made = connection_made  # type: ignore[method-assign]

    async def admit(self) -> None:
        """Wait for a turn to be upgraded.

        A reconnect wave brings thousands of upgrade requests at once; handled as
        they come (the token check is most of it), they would all run in one pass
        of the event loop and hold up every open socket's traffic for as long.
        :data:`ADMIT_BATCH` per pass are let through; the rest wait their turn,
        in order. New sockets whose binding came into effect (hundreds at once,
        when RabbitMQ confirms a batch of bindings) take the same turns for their
        welcome.
        """
        self.admissions += 1
        await self._admission.wait()

    def reap_later(self, connection: Connection) -> None:
        """Queue an ended socket's clean-up.

        When thousands of clients leave at once (a load balancer restart, a network
        blip), cleaning each up where its close arrives would run them all in one
        pass of the event loop and stall every other socket for as long. A batch
        of :data:`REAP_BATCH` per pass lets other traffic through between batches.
        """
        if connection._reaping:
            return
        connection._reaping = True
        self._reaping.add(connection)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a connection's awaited request as a task this server owns (and
        :meth:`close` awaits); after :meth:`close` nothing is run."""
        self._tasks.spawn(coroutine)

    def verify_now(self, token: str, now: float) -> Identity | tuple[str, str] | None:
        """The Identity, or the refusal's (reason, message), when the token can be
        checked without waiting (a local key); None when it must be awaited."""
        try:
            return self.verifier.verify_local(token, now)
        except AuthError as exc:
            return (exc.reason, str(exc))

    def routing_ready(self, channels: list[Channel]) -> bool:
        return self.routing is None or self.routing.is_routable(c.routing_key for c in channels)

    async def wait_routable(self, channels: list[Channel]) -> None:
        if self.routing is not None:
            await self.routing.wait_routable([c.routing_key for c in channels])

    async def read_replay(
        self, connection: Connection, request: Replay
    ) -> list[Notification] | None:
        if self.replay is None:
            self.metrics.resumes.labels("unavailable").inc()
            return None
        before = request.before_seq
        if before == ALL_SO_FAR:
            before = self.hub.last_seq + 1
        missed = await self.replay(request.since, self.hub.channels_of(connection), before)
        self.metrics.resumes.labels("resumed" if missed is not None else "gap_too_old").inc()
        return missed

    # --- shutdown ---------------------------------------------------------------------

    def sessions(self) -> list[Connection]:
        """Every authenticated socket."""
        return [s for s in self.hub if isinstance(s, Connection)]

    async def drain(self, window: float) -> None:
        """Close every socket with 1001, spread evenly over ``window`` seconds (all at
        once after :meth:`hurry`), then give them a moment to go."""
        self.draining = True
        await self._drain.run(self.connections, close_for_shutdown, window, "sockets")

    def hurry(self) -> None:
        """Have a drain (under way or to come) close the remaining sockets at once."""
        self._drain.hurry()

    async def close(self) -> None:
        """Drop whatever is still connected, cancel what connections still await, and
        wait for those tasks to end; nothing is spawned after this."""
        self._tasks.stop_spawning()
        self.draining = True
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        self._admission.close()
        self._parsing.close()
        await self._tasks.close()


def close_for_shutdown(session: TimedSession) -> None:
    """What a drain does to each WebSocket and SSE stream: close it with 1001."""
    session.close_soon(CloseReason.SHUTDOWN)
