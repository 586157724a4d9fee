"""Server-Sent Events: ``GET /sse``, ``POST /api/sse-ticket`` and ``POST /api/messages``.

For networks that block WebSockets. A stream is a hub subscriber like a
WebSocket, and its life is the same :class:`~notifyd.session.Session` state
machine: join the hub and hold live notifications, replay what was missed,
then welcome, the replay and the held notifications minus those replayed; the
send-buffer limit (4009), ``refresh_required`` and 4010 at expiry, 1001 on
drain. :class:`SseStream` only differs in how the session's output reaches the
client: each WebSocket frame the session queues is written as one SSE event
(``event:`` = the message ``type``, ``data:`` = the same JSON, ``id:`` = the
notification id), through aiohttp's :class:`~aiohttp.web.StreamResponse`.

A notification's frame is shared by every socket it goes to; its SSE bytes are
built once and kept in a small cache keyed by that frame (:meth:`SseServer.event_for`).

Client messages travel by ``POST /api/messages`` (the stream may live on another
replica), with the limits of the WebSocket: size, rate (per user), grants.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, Final, cast

from aiohttp import web

from .auth import Identity
from .config import Settings
from .connection import SocketServer, TimedSession, close_for_shutdown, credentials
from .errors import AuthError, BrokerUnavailable, ProtocolError
from .history_api import STATUS as HISTORY_STATUS
from .lifecycle import Drain, OwnedTasks
from .metrics import Metrics
from .protocol import (
    Channel,
    History,
    Ping,
    Publish,
    ResumePoint,
    Send,
    Subscribe,
    answer,
    dumps,
    error,
    loads,
    parse_channel,
    parse_client_message,
    resume_point,
)
from .responses import json_error
from .session import (
    RESUME_COST,
    Abort,
    Action,
    Join,
    Leave,
    Replay,
    State,
    Subscribe_,
    Unsubscribe_,
    Unwatch,
    Watch,
)
from .tickets import Redeemed, Tickets, derive_key, random_key
from .websocket import OP_CLOSE, OP_PING, OP_TEXT, PING_FRAME

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger(__name__)

_NEVER: Final = float("inf")
#: Sent once at the start: how long a browser waits before it reconnects (ms).
RETRY: Final = b"retry: 2000\n\n"
#: A comment line, every heartbeat interval: keeps proxies from timing the stream out.
PING_COMMENT: Final = b": ping\n\n"
#: Bytes of notification events kept built (one notification is built once, then
#: written to every stream it goes to; oldest first out).
CACHE_BYTES: Final = 8 << 20
#: Users whose ``POST /api/messages`` rate is tracked at once (least recent forgotten).
MAX_RATE_USERS: Final = 100_000
STREAM_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


# --- the wire format (pure) -------------------------------------------------------------


def sse_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One SSE event. ``data`` is one JSON line (split on line breaks to stay valid SSE);
    an ``id`` that could break the framing is left out."""
    parts = []
    if event_id and not any(c in event_id for c in "\r\n\0"):
        parts.append(b"id: " + event_id.encode() + b"\n")
    parts.append(b"event: " + event.encode() + b"\n")
    for line in data.splitlines() or [b""]:
        parts.append(b"data: " + line + b"\n")
    parts.append(b"\n")
    return b"".join(parts)


def frame_payload(frame: bytes) -> tuple[int, bytes]:
    """Opcode and payload of one unmasked frame the session queued for a client."""
    length = frame[1] & 0x7F
    start = 4 if length == 126 else 10 if length == 127 else 2
    return frame[0] & 0x0F, frame[start:]


def event_for_frame(frame: bytes) -> tuple[bytes, bool]:
    """The SSE bytes for one server frame, and whether they are a notification's (the
    same frame goes to many sockets: worth keeping)."""
    opcode, payload = frame_payload(frame)
    if opcode == OP_PING:
        return PING_COMMENT, False
    if opcode == OP_CLOSE:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        reason = payload[2:].decode("utf-8", "replace")
        return sse_event("close", dumps({"type": "close", "code": code, "reason": reason})), False
    if opcode != OP_TEXT:
        return b"", False
    message = loads(payload)
    kind = str(message.get("type", "message")) if isinstance(message, dict) else "message"
    if kind == "notification":
        return sse_event(kind, payload, str(message.get("id", ""))), True
    if kind == "welcome":
        payload = dumps({**message, "transport": "sse"})
    return sse_event(kind, payload), False


# --- one stream -------------------------------------------------------------------------


class LossWatch(asyncio.Protocol):
    """The transport's protocol while a stream is open: aiohttp's request handler in
    all but name (every event is passed on), and the stream hears at once that its
    client went away.

    A stream reads nothing from its client, so without this a closed tab is noticed
    only at the stream's next write: a heartbeat, or a notification for its user,
    perhaps never. The stream is let go when the connection ends (no cycle through
    the transport).
    """

    __slots__ = ("handler", "stream")

    def __init__(self, handler: asyncio.Protocol, stream: SseStream) -> None:
        self.handler = handler
        self.stream: SseStream | None = stream

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.gone()
        self.handler.connection_lost(exc)


class SseStream(TimedSession):
    """One ``GET /sse`` stream: a hub subscriber whose session's frames become SSE events.

    Its output is written by the request handler itself (:meth:`pump`); the hub
    and the timers only queue and wake it, so nothing on the fan-out path awaits.
    """

    NOUN = "SSE stream"

    __slots__ = (
        "_extra",
        "_ready",
        "_soon",
        "_watches",
        "server",
        "transport",
    )

    def __init__(
        self,
        server: SseServer,
        transport: asyncio.Transport,
        now: float,
        since: ResumePoint | None,
    ) -> None:
        super().__init__(server.session_config, now, None, since)
        self.server = server
        self.transport = transport
        self._ready = asyncio.Event()
        self._soon = False
        #: Answers to the ``subscribe`` query, sent after welcome (None: none left).
        self._extra: list[bytes] | None = None
        #: ``presence:<id>`` subscriptions of the query, made one at a time once open.
        self._watches: list[Channel] = []

    def open(
        self,
        identity: Identity,
        now: float,
        topics: list[str],
        watches: list[Channel],
        extra: list[bytes],
    ) -> None:
        """Start with an identity checked already (header or ticket) and the query's
        topics joined with the user's own, so that a resume's replay covers them."""
        self.topics.update(topics)
        self._watches = watches
        self._extra = extra or None
        self.state = State.VERIFYING
        self.close_at = _NEVER
        # The limits were checked before the stream started (an HTTP error then).
        self.verified(identity, now, 0, True)
        self.after(now)

    # --- the hub's and the heartbeat's view ----------------------------------------

    def write(self, frame: bytes, seq: int, now: float) -> bool:
        transport = self.transport
        if transport.is_closing():
            self.gone()
            return False
        queued = self.live(frame, seq, transport.get_write_buffer_size(), now)
        if queued:
            self._ready.set()
        if self._actions is not None and not self._soon:
            # An overflow asks to leave the hub: not while the hub iterates its sockets.
            self._soon = True
            self.server.loop.call_soon(self._after_soon)
        return queued

    def gone(self) -> None:
        """The client went away: end the stream (out of the hub in the next pass)."""
        if self.state < State.CLOSED:
            self.lost()
            self._ready.set()
            if not self._soon:
                self._soon = True
                self.server.loop.call_soon(self._after_soon)

    def heartbeat(self) -> None:
        """A comment line every interval; a client gone meanwhile ends the stream."""
        now = time.time()
        if self.transport.is_closing():
            self.gone()
        elif self.state is State.OPEN:
            self._queue(PING_FRAME)
        self.after(now)

    # --- carrying out what the session asks for --------------------------------------

    def _after_soon(self) -> None:
        self.after(time.time())

    def after(self, now: float) -> None:
        """After an event: run the session's requests, wake the writer, set the timer."""
        self._soon = False
        while True:
            actions = self.take_actions()
            if actions is None:
                if self.state is State.OPEN and not self.busy and (self._extra or self._watches):
                    self._opened(now)
                    continue
                break
            for action in actions:
                try:
                    self._do(action, now)
                except Exception:
                    self._internal_error(now)
        if self.out is not None or self.state >= State.CLOSING:
            self._ready.set()
        self._set_timer(self.wake_at if self.state < State.CLOSED else _NEVER, now)

    def _opened(self, now: float) -> None:
        """After welcome: the query's ``subscribed``/``error`` answers, then its
        presence subscriptions, one at a time (each waits for its routing)."""
        extra, self._extra = self._extra, None
        for payload in extra or ():
            self._send(payload)
        if self._watches and not self.busy:
            channel = self._watches.pop(0)
            try:
                self._subscribe(Subscribe(channel), channel)
            except ProtocolError as exc:
                self._error(exc.code, exc.message, None)

    def _do(self, action: Action, now: float) -> None:
        server = self.server
        sockets = server.sockets
        hub = sockets.hub
        if isinstance(action, Leave):
            hub.remove(self)
        elif isinstance(action, Abort):
            self.out = None
            self.transport.abort()
        elif isinstance(action, Join):
            hub.add(self)
            if sockets.routing_ready(hub.channels_of(self)):
                self.joined(now)
            else:
                server.spawn(self._join())
        elif isinstance(action, Replay):
            server.spawn(self._replay(action))
        elif isinstance(action, Subscribe_):
            hub.subscribe(self, action.topic)
        elif isinstance(action, Unsubscribe_):
            hub.unsubscribe(self, action.topic)
        elif isinstance(action, Watch):
            server.spawn(self._watch_presence(action.user))
        elif isinstance(action, Unwatch) and sockets.presence is not None:
            sockets.presence.unwatch(self, action.user)
        # Verify, Upstream, Acked, CloseTransport: a stream reads no client messages.

    async def _join(self) -> None:
        sockets = self.server.sockets
        await sockets.wait_routable(sockets.hub.channels_of(self))
        await sockets.admit()
        self._answered(self.joined)

    async def _replay(self, action: Replay) -> None:
        # read_replay reads only the hub's view of a socket (channels_of), which a
        # stream has as a WebSocket does.
        missed = await self.server.sockets.read_replay(cast("Connection", self), action)
        self._answered(lambda now: self.replayed(missed, now))

    async def _watch_presence(self, user: str) -> None:
        presence = self.server.sockets.presence
        if presence is None:
            self._answered(
                lambda now: self.failed("unavailable", "presence is not available here", now)
            )
            return
        await presence.watch(self, user)
        self._answered(lambda now: self.done(None, now))

    def _answered(self, event: Any) -> None:
        now = time.time()
        try:
            event(now)
        except Exception:
            self._internal_error(now)
        self.after(now)

    # --- the writer ----------------------------------------------------------------

    def take_events(self) -> bytes | None:
        """Everything queued, as SSE bytes (notifications built once per frame)."""
        out, self.out = self.out, None
        self.out_bytes = 0
        if not out:
            return None
        return b"".join(map(self.server.event_for, out))

    async def pump(self, response: web.StreamResponse) -> None:
        """Write what is queued until the session closes (its close event written)."""
        ready = self._ready
        while True:
            await ready.wait()
            ready.clear()
            data = self.take_events()
            if data:
                await response.write(data)
            if self.state >= State.CLOSING and self.out is None:
                return

    def finish(self) -> None:
        """The stream ended: out of the hub, no timer left."""
        self.lost()
        self.after(time.time())
        self._cancel_timer()


# --- the endpoints --------------------------------------------------------------------


class SseServer:
    """``GET /sse``, ``POST /api/sse-ticket``, ``POST /api/messages``; owns every stream
    and every task its streams wait on."""

    def __init__(self, settings: Settings, sockets: SocketServer, metrics: Metrics) -> None:
        self.settings = settings
        self.sockets = sockets
        self.session_config = sockets.session_config
        self.metrics = metrics
        self.tickets = Tickets(ticket_key(settings), settings.sse.ticket_ttl)
        self.redeemed = Redeemed()
        self.streams: set[SseStream] = set()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_bytes = 0
        #: ``POST /api/messages`` token buckets per user: (tokens, stamp).
        self._rates: OrderedDict[str, tuple[float, float]] = OrderedDict()
        #: What streams await; none is started after :meth:`close`.
        self._tasks = OwnedTasks("SSE tasks")
        self._drain = Drain()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Tells the other replicas a ticket was redeemed here (the gateway's cluster
        #: link; None: single use on this replica only).
        self.announce: Callable[[str, float], Awaitable[None]] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/sse", self.handle_stream)
        app.router.add_post("/api/sse-ticket", self.handle_ticket)
        app.router.add_route("OPTIONS", "/api/sse-ticket", self.preflight)
        app.router.add_post("/api/messages", self.handle_message)
        app.router.add_route("OPTIONS", "/api/messages", self.preflight)
        app.on_shutdown.append(self.on_shutdown)

    def streams_list(self) -> Collection[SseStream]:
        """The open streams (for the heartbeat)."""
        return list(self.streams)

    # --- the event cache -------------------------------------------------------------

    def event_for(self, frame: bytes) -> bytes:
        """The SSE bytes of one queued frame; a notification's are built once."""
        cache = self._cache
        data = cache.get(frame)
        if data is not None:
            return data
        data, shared = event_for_frame(frame)
        if shared:
            cache[frame] = data
            self._cache_bytes += len(frame) + len(data)
            while self._cache_bytes > CACHE_BYTES and cache:
                old, built = cache.popitem(last=False)
                self._cache_bytes -= len(old) + len(built)
        return data

    # --- CORS -----------------------------------------------------------------------

    def _cors(self, request: web.Request) -> dict[str, str] | None:
        """Headers for the request's ``Origin`` (none without one); None: refused.
        The WebSocket's allow-list (``[ws] allowed_origins``; empty: any origin)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return {}
        allowed = self.settings.ws.allowed_origins
        if allowed and origin not in allowed:
            log.info("refused origin %r on %s", origin, request.path)
            return None
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    async def preflight(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        if cors is None:
            return json_error(403, "origin_not_allowed", "origin not allowed", {})
        cors.update(
            {
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            }
        )
        return web.Response(status=204, headers=cors)

    async def _identity(self, request: web.Request) -> Identity | None:
        """The identity of the request's ``Authorization: Bearer`` token; None: no header.
        Raises AuthError (counted) for a token that is refused."""
        token, _ = credentials(request.headers, "", dict, False)
        if token is None:
            return None
        try:
            return await self.sockets.verifier.verify(token)
        except AuthError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise

    # --- POST /api/sse-ticket ----------------------------------------------------------

    async def handle_ticket(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        if cors is None:
            return json_error(403, "origin_not_allowed", "origin not allowed", {})
        try:
            identity = await self._identity(request)
        except AuthError as exc:
            return json_error(401, "unauthorized", str(exc), cors)
        if identity is None:
            return json_error(401, "unauthorized", "Authorization: Bearer <token> required", cors)
        ticket = self.tickets.issue(identity, time.time())
        self.metrics.sse_tickets.labels("issued").inc()
        cors["Cache-Control"] = "no-store"
        body = {"ticket": ticket, "expires_in": int(self.tickets.ttl)}
        return web.json_response(body, headers=cors)

    def _redeem(self, ticket: str, now: float) -> Identity:
        try:
            opened = self.tickets.open(ticket, now)
        except AuthError as exc:
            self.metrics.sse_tickets.labels(exc.reason).inc()
            raise
        if not self.redeemed.redeem(opened.id, opened.expires_at, now):
            self.metrics.sse_tickets.labels("reused").inc()
            log.info("SSE ticket used twice (user %s)", opened.identity.user)
            raise AuthError("reused", "ticket already used")
        if self.announce is not None:
            self.spawn(self._announce(opened.id, opened.expires_at))
        if self.sockets.verifier.is_revoked(opened.identity.token_id, now):
            raise AuthError("revoked", "token revoked")
        self.metrics.sse_tickets.labels("redeemed").inc()
        return opened.identity

    async def _announce(self, ticket_id: str, expires_at: float) -> None:
        assert self.announce is not None
        try:
            await self.announce(ticket_id, expires_at)
        except BrokerUnavailable:
            log.info("SSE ticket redeemed while RabbitMQ is away: not announced to replicas")

    def redeemed_elsewhere(self, ticket_id: str, expires_at: float) -> None:
        """Another replica redeemed this ticket (its own announcement comes back too)."""
        self.redeemed.redeem(ticket_id, expires_at, time.time())

    # --- GET /sse ------------------------------------------------------------------------

    def _refuse(
        self, status: int, code: str, message: str, outcome: str, cors: dict[str, str]
    ) -> web.Response:
        self.metrics.connection_attempts.labels(outcome).inc()
        if status == 503:
            cors = {**cors, "Retry-After": "1"}
        return json_error(status, code, message, cors)

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        cors = self._cors(request)
        if cors is None:
            self.metrics.connection_attempts.labels("origin").inc()
            return json_error(403, "origin_not_allowed", "origin not allowed", {})
        sockets = self.sockets
        if sockets.draining or self._tasks.closed:
            return self._refuse(503, "unavailable", "server going away", "overloaded", cors)
        if len(sockets.connections) + len(self.streams) >= self.settings.server.max_connections:
            return self._refuse(503, "overloaded", "server full", "overloaded", cors)
        now = time.time()
        query = request.query
        try:
            identity = await self._identity(request)
            if identity is None:
                ticket = query.get("ticket")
                if ticket is None:
                    raise AuthError("missing", "a ticket or Authorization: Bearer <token>")
                identity = self._redeem(ticket, now)
        except AuthError as exc:
            outcome = "expired" if exc.reason == "expired" else "unauthorized"
            return self._refuse(401, "unauthorized", str(exc), outcome, cors)
        try:
            since = resume_point(
                request.headers.get("Last-Event-ID") or query.get("lastEventId") or None,
                query.get("since_ts"),
            )
        except ProtocolError as exc:
            return self._refuse(400, exc.code, exc.message, "protocol_error", cors)
        hub = sockets.hub
        config = self.session_config
        if hub.connections_of(identity.user) >= config.max_connections_per_user:
            log.info("SSE refused: user %s is at max_connections_per_user", identity.user)
            text = "too many connections"
            return self._refuse(403, "too_many_connections", text, "forbidden", cors)
        topics, watches, extra = self._subscriptions(identity, query.getall("subscribe", []))
        response = web.StreamResponse(headers={**STREAM_HEADERS, **cors})
        response.force_close()  # the end of a stream is the end of the connection
        transport = request.transport
        if transport is None or transport.is_closing():
            return response
        await response.prepare(request)
        stream = SseStream(self, transport, now, since)
        transport.set_protocol(LossWatch(cast(asyncio.Protocol, request.protocol), stream))
        self.streams.add(stream)
        self.metrics.sse_connections.set(len(self.streams))
        try:
            await response.write(RETRY)
            stream.open(identity, time.time(), topics, watches, extra)
            await stream.pump(response)
            await response.write_eof()
        except (ConnectionError, OSError):
            pass  # the client went away
        except Exception:
            # Never a trace to the client: the stream just ends (it reconnects).
            log.exception("SSE stream %s of %s failed", stream.id, stream.user)
        finally:
            stream.finish()
            self.streams.discard(stream)
            self.metrics.sse_connections.set(len(self.streams))
        return response

    def _subscriptions(
        self, identity: Identity, wanted: list[str]
    ) -> tuple[list[str], list[Channel], list[bytes]]:
        """The ``subscribe`` query: topics to join with the user's own, presence
        subscriptions, and the answers (``subscribed``/``error``) sent after welcome.
        Checked as the WebSocket's ``subscribe``."""
        config = self.session_config
        topics: list[str] = []
        watches: list[Channel] = []
        extra: list[bytes] = []
        own = set(identity.topics.exact)
        user_topics = self.sockets.hub.topics_of(identity.user) | own
        per_user = self.settings.ws.max_topics_per_user
        client_errors = self.metrics.client_errors

        def refuse(code: str, text: str) -> None:
            # No ref to match on a stream: the channel, as asked, says which.
            extra.append(error(code, text, channel=item))
            client_errors.labels(code).inc()

        for item in wanted:
            try:
                channel = parse_channel(item, presence=True)
            except ProtocolError as exc:
                refuse(exc.code, exc.message)
                continue
            name = channel.name
            if channel.kind == "presence":
                if name not in identity.presence:
                    refuse("forbidden", f"token does not allow {channel}")
                elif channel not in watches:
                    watches.append(channel)
                continue
            if channel.kind != "topic":
                refuse("invalid_channel", "only topic:<name> and presence:<id> can be subscribed")
            elif not identity.topics.allows(name):
                refuse("forbidden", f"token does not allow {channel}")
            elif name in own or name in topics:
                extra.append(answer("subscribed", channel=str(channel)))
            elif len(own) + len(topics) >= config.max_topics:
                refuse("too_many_topics", f"a socket may subscribe to {config.max_topics} topics")
            elif name not in user_topics and len(user_topics) >= per_user:
                refuse("too_many_topics", f"a user may read {per_user} topics")
            else:
                topics.append(name)
                user_topics.add(name)
                extra.append(answer("subscribed", channel=str(channel)))
        return topics, watches, extra

    # --- POST /api/messages ------------------------------------------------------------

    def _take_token(self, user: str, now: float, cost: int = 1) -> bool:
        """The WebSocket's per-socket token bucket, per user here (a POST has no socket)."""
        config = self.session_config
        rates = self._rates
        tokens, stamp = rates.pop(user, (float(config.rate_burst), now))
        if now > stamp:
            tokens = min(float(config.rate_burst), tokens + (now - stamp) * config.rate_limit)
        allowed = tokens >= cost
        rates[user] = (tokens - cost if allowed else tokens, max(now, stamp))
        if len(rates) > MAX_RATE_USERS:
            rates.popitem(last=False)
        return allowed

    async def handle_message(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        if cors is None:
            return json_error(403, "origin_not_allowed", "origin not allowed", {})
        kind = "other"

        def reply(status: int, payload: bytes) -> web.Response:
            self.metrics.sse_messages.labels(kind, str(status)).inc()
            return web.Response(
                body=payload, status=status, content_type="application/json", headers=cors
            )

        try:
            identity = await self._identity(request)
        except AuthError as exc:
            return reply(401, error("unauthorized", str(exc)))
        if identity is None:
            return reply(401, error("unauthorized", "Authorization: Bearer <token> required"))
        limit = self.session_config.max_message_size
        if request.content_length is not None and request.content_length > limit:
            return reply(413, error("too_big", f"a message may be {limit} bytes"))
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            return reply(413, error("too_big", f"a message may be {limit} bytes"))
        try:
            message = parse_client_message(body)
        except ProtocolError as exc:
            message = None
            refusal = exc
        # As on the WebSocket: every message takes a token, a history page as many as a
        # resume (it may read the shared stream).
        cost = RESUME_COST if isinstance(message, History) else 1
        if not self._take_token(identity.user, time.time(), cost):
            self.metrics.rate_limited.inc()
            return reply(429, error("rate_limited", "too many messages; slow down"))
        if message is None:
            self.metrics.client_errors.labels(refusal.code).inc()
            return reply(400, error(refusal.code, refusal.message, refusal.ref))
        kind = type(message).__name__.lower()
        if kind not in ("ping", "publish", "send", "history"):
            kind = "other"
        status, payload = await self._message(identity, message)
        return reply(status, payload)

    async def _message(self, identity: Identity, message: Any) -> tuple[int, bytes]:
        """What the WebSocket would answer to ``message``, and the HTTP status."""
        upstream = self.sockets.upstream
        counted = self.metrics.upstream_messages
        if isinstance(message, Ping):
            return 200, answer("pong", message.ref)
        if isinstance(message, Publish):
            if not identity.publish.allows(message.channel.name):
                counted.labels("publish", "forbidden").inc()
                text = f"token does not allow publishing to {message.channel}"
                return 403, error("forbidden", text, message.ref)
            try:
                notification_id = await upstream.publish(
                    message.channel, message.event, message.data, sender=identity.user
                )
            except BrokerUnavailable:
                counted.labels("publish", "broker_down").inc()
                text = "cannot publish right now; retry"
                return 503, error("broker_unavailable", text, message.ref)
            except ProtocolError as exc:
                counted.labels("publish", "refused").inc()
                return 400, error(exc.code, exc.message, message.ref)
            counted.labels("publish", "accepted").inc()
            channel = str(message.channel)
            return 200, answer("published", message.ref, id=notification_id, channel=channel)
        if isinstance(message, Send):
            try:
                # No socket: the session field says the message came over HTTP.
                await upstream.send_upstream(identity.user, "http", message.event, message.data)
            except BrokerUnavailable:
                counted.labels("send", "broker_down").inc()
                return 503, error("broker_unavailable", "cannot send right now; retry", message.ref)
            except ProtocolError as exc:
                counted.labels("send", "refused").inc()
                return 400, error(exc.code, exc.message, message.ref)
            counted.labels("send", "accepted").inc()
            return 200, answer("sent", message.ref)
        if isinstance(message, History):
            return await self._history(identity, message)
        ref = getattr(message, "ref", None)
        text = "only publish, send, history and ping can be posted; subscribe with GET /sse"
        return 400, error("bad_message", text, ref)

    async def _history(self, identity: Identity, message: History) -> tuple[int, bytes]:
        """A page, as the WebSocket's ``history`` answer (:mod:`notifyd.history_api`)."""
        history = self.sockets.history
        ref = message.ref
        if history is None:
            return 404, error("history_off", "this gateway keeps no history", ref)
        try:
            page = await history.read_page(
                identity, message.channel, message.limit, message.before, "sse"
            )
        except ProtocolError as exc:
            return HISTORY_STATUS.get(exc.code, 400), error(exc.code, exc.message, ref)
        fields = {k: page[k] for k in ("channel", "notifications", "next_before")}
        return 200, answer("history", ref, **fields)

    # --- tasks and shutdown ----------------------------------------------------------

    def spawn(self, coroutine: Any) -> None:
        """Run a stream's awaited request as a task this server owns (:meth:`close`
        cancels and awaits it); after :meth:`close` nothing is run."""
        self._tasks.spawn(coroutine)

    async def drain(self, window: float) -> None:
        """Close every stream with ``event: close`` 1001, spread over ``window`` seconds
        (all at once after :meth:`hurry`), then give them a moment to end."""
        await self._drain.run(self.streams, close_for_shutdown, window, "SSE streams")

    async def on_shutdown(self, app: web.Application) -> None:
        """aiohttp waits for open request handlers before the app's cleanup (where the
        gateway drains): the streams, being handlers, end here first, with 1001.
        (:func:`notifyd.app.serve` has drained them already.)"""
        self.hurry()
        await self.drain(0.0)

    def hurry(self) -> None:
        self._drain.hurry()

    async def close(self) -> None:
        """Drop the streams still open, cancel and await their tasks."""
        self._tasks.stop_spawning()
        for stream in list(self.streams):
            stream.transport.abort()
        await self._tasks.close()


def ticket_key(settings: Settings) -> bytes:
    """``[sse] ticket_secret``, else derived from ``[auth] secret``, else random (logged:
    then a ticket is only good on the process that issued it)."""
    if settings.sse.ticket_secret:
        return derive_key(settings.sse.ticket_secret)
    if settings.auth.secret:
        return derive_key(settings.auth.secret)
    log.warning(
        "[sse] ticket_secret is not set and there is no [auth] secret: SSE tickets are "
        "valid only on this process; behind a load balancer set the same "
        "[sse] ticket_secret (NOTIFYD_SSE_TICKET_SECRET) on every replica"
    )
    return random_key()
