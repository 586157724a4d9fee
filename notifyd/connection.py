"""One WebSocket from upgrade to close: authentication, its session, client messages.

A :class:`Session` is what the hub writes to. Frames are queued on the session
(never awaited) and written to its transport once per event-loop pass by the
:class:`Outbox`, so a burst of notifications costs each socket one write, not one
per frame. What is queued plus the transport's buffer is the socket's bounded
send buffer: a socket that would pass ``send_buffer_bytes`` is closed with 4009.
Everything a client sends is parsed by :mod:`notifyd.protocol` and answered here;
nothing a client sends can reach another user's channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aiohttp import WSMsgType, web

from . import metrics
from .auth import AuthError, Identity, TokenVerifier
from .config import Settings
from .hub import Hub
from .protocol import (
    PING_FRAME,
    Ack,
    Auth,
    Channel,
    CloseCode,
    Notification,
    Ping,
    ProtocolError,
    Publish,
    Refresh,
    Resume,
    ResumePoint,
    Send,
    Subscribe,
    Unsubscribe,
    answer,
    close_frame,
    close_reason,
    error,
    parse_client_message,
    resume_point,
    text_frame,
    welcome,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_SLOW = metrics.NOTIFICATIONS_DROPPED.labels("slow_consumer")
_ACCEPTED = metrics.CONNECTION_ATTEMPTS.labels("accepted")
#: Seconds after a resume during which live copies of replayed ids are dropped.
SKIP_WINDOW = 10.0
_NO_IDS: frozenset[str] = frozenset()  # shared: an empty frozenset() is a new object each time


class _PeerGone(Exception):
    """The client went away before authenticating."""


class _NotProtocol(Exception):
    """The first frame is not a notifyd.v1 message at all."""


class BrokerUnavailable(Exception):
    """RabbitMQ cannot take a message right now (disconnected, or no confirm)."""


class Upstream(Protocol):
    """Publishing on a client's behalf (implemented by :class:`notifyd.broker.Broker`)."""

    async def publish(
        self, channel: Channel, event: str | None, data: Any, sender: str | None = None
    ) -> str:
        """Publish a notification through RabbitMQ; returns its id."""

    async def send_upstream(self, user: str, session: str, event: str, data: Any) -> None:
        """Publish a client message to ``notifyd.upstream``."""


#: Replays everything after ``since`` on ``channels`` (oldest first) or None.
Replayer = Callable[[ResumePoint, list[Channel], int | None], Awaitable[list[Notification] | None]]


class TokenBucket:
    """Allows ``rate`` events per second with bursts of ``burst``."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class Outbox:
    """Sessions with queued frames, flushed together once per event-loop pass.

    Writing each frame as it comes costs a system call per frame and socket; a
    fan-out burst (several notifications read from RabbitMQ in one pass) then
    pays that many times per socket. Frames queued during one pass leave in one
    write per socket at the start of the next.
    """

    __slots__ = ("_pending", "_scheduled")

    def __init__(self) -> None:
        self._pending: list[Session] = []
        self._scheduled = False

    def add(self, session: Session) -> None:
        self._pending.append(session)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for session in pending:
            session.flush()


class Session:
    """One authenticated socket, as the hub sees it."""

    __slots__ = (
        "_close_task",
        "_held",
        "_held_bytes",
        "_out",
        "_out_bytes",
        "_outbox",
        "_ping_outstanding",
        "_read_done",
        "_skip",
        "_skip_timer",
        "_token_timer",
        "closing",
        "deadline",
        "first_live_seq",
        "id",
        "identity",
        "limit",
        "topics",
        "transport",
        "user",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: Any,
        identity: Identity,
        limit: int,
        leeway: float,
        outbox: Outbox,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self._outbox = outbox
        #: Frames queued for the next flush (None: nothing queued, not in the outbox).
        self._out: list[bytes] | None = None
        self._out_bytes = 0
        #: A heartbeat ping was sent and nothing has come back since.
        self._ping_outstanding = False
        self.identity = identity
        self.user = identity.user
        self.deadline = identity.expires_at + leeway
        self.id = secrets.token_urlsafe(12)
        self.topics: set[str] = set()
        self.limit = limit
        self.closing = False
        self.first_live_seq: int | None = None
        self._held: list[tuple[bytes, int]] | None = None
        #: Ids just replayed from a shared history; live copies still in flight
        #: to this replica are dropped for a short while after a resume.
        self._skip = _NO_IDS
        self._held_bytes = 0
        #: One timer for the token (refresh_required, then the 4010 close) and one
        #: for the resume skip window: bound methods, no closures, per socket.
        self._token_timer: asyncio.TimerHandle | None = None
        self._skip_timer: asyncio.TimerHandle | None = None
        self._close_task: asyncio.Task[None] | None = None
        #: Resolved when the read loop has ended (created only once closing starts).
        self._read_done: asyncio.Future[None] | None = None

    def write(self, frame: bytes, seq: int = 0) -> bool:
        if self.closing:
            return False
        if self._skip and seq and _frame_id(frame) in self._skip:
            return True
        if self._held is not None:
            # Resuming from a shared history: live traffic waits behind the replay.
            self._held_bytes += len(frame)
            if self._held_bytes > self.limit:
                self._overflow()
                return False
            self._held.append((frame, seq))
            return True
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        queued = self._out_bytes + len(frame)
        if transport.get_write_buffer_size() + queued > self.limit:
            self._overflow()
            return False
        out = self._out
        if out is None:
            self._out = [frame]
            self._outbox.add(self)
        else:
            out.append(frame)
        self._out_bytes = queued
        if seq and self.first_live_seq is None:
            self.first_live_seq = seq
        return True

    def flush(self) -> None:
        """Write what is queued (the outbox calls this once per loop pass)."""
        out, self._out = self._out, None
        self._out_bytes = 0
        if not out:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def send(self, payload: bytes) -> None:
        """A control answer (welcome, pong, error, ...), in order with notifications."""
        self.write(text_frame(payload))

    def hold(self) -> None:
        """Keep live frames back (bounded by the send buffer) while a replay is read."""
        self._held = []
        self._held_bytes = 0

    def release(self, first: bytes, replay: list[Notification]) -> None:
        """Write ``first`` (the answer), the replay, then held frames not replayed."""
        held, self._held = self._held or [], None
        self.send(first)
        for notification in replay:
            self.write(notification.frame)
        if replay:
            self._skip = frozenset(n.id for n in replay)
            if self._skip_timer is not None:
                self._skip_timer.cancel()
            self._skip_timer = asyncio.get_running_loop().call_later(SKIP_WINDOW, self._forget_skip)
        for frame, seq in held:
            self.write(frame, seq)

    def _forget_skip(self) -> None:
        self._skip = _NO_IDS
        self._skip_timer = None

    def _overflow(self) -> None:
        _SLOW.inc()
        metrics.SLOW_CONSUMER_DISCONNECTS.inc()
        log.info("closing slow consumer user=%s session=%s (send buffer full)", self.user, self.id)
        self.close_soon(CloseCode.SLOW_CONSUMER, "send buffer overflow", grace=2.0)

    def close_soon(self, code: int, reason: str, grace: float = 5.0) -> None:
        """Send a close frame now; cut the socket off if the client has not answered
        within ``grace`` seconds.

        The frame is written here, after what is queued, rather than with aiohttp's
        ``ws.close()``: called from another task while the read loop waits, that
        closes the TCP connection without waiting for the client's answer, and an
        aiohttp client answering it was seen to report 1006 instead of this code.
        The read loop keeps reading until the client's answer; then the connection
        is closed.
        """
        if self.closing:
            return
        self.flush()
        self._stop_writing()
        metrics.CLOSES.labels(str(code)).inc()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(close_frame(code, reason))
        loop = asyncio.get_running_loop()
        self._read_done = loop.create_future()
        self._close_task = loop.create_task(self._finish_close(grace))

    def _stop_writing(self) -> None:
        """Nothing more is written to this socket but a close frame."""
        self.closing = True
        self._held = None
        self.cancel_timers()

    def heartbeat(self) -> None:
        """Ping, or cut off a peer that has not answered the previous ping."""
        if self.closing:
            return
        if self._ping_outstanding:
            metrics.HEARTBEAT_TIMEOUTS.inc()
            log.info("no answer to ping: dropping user=%s session=%s", self.user, self.id)
            self._stop_writing()
            if self.transport is not None:
                self.transport.abort()  # the peer is gone: no close handshake to wait for
            return
        self._ping_outstanding = True
        self.write(PING_FRAME)

    def answered(self) -> None:
        """The client sent something (a pong or any message): it is alive."""
        self._ping_outstanding = False

    def reading_ended(self) -> None:
        """The read loop is over: the client answered the close, or is gone."""
        if self._read_done is not None and not self._read_done.done():
            self._read_done.set_result(None)

    async def _finish_close(self, grace: float) -> None:
        assert self._read_done is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._read_done), grace)
        await cut_off(self.transport, deadline)

    def watch_token(self, refresh_before: float) -> None:
        """Ask for a refresh ``refresh_before`` s ahead of expiry; close 4010 at the deadline.

        Called again after a refresh, with the new token's expiry.
        """
        if self._token_timer is not None:
            self._token_timer.cancel()
        delay = self.identity.expires_at - refresh_before - time.time()
        if delay > 0:
            self._token_timer = asyncio.get_running_loop().call_later(delay, self._refresh_due)
        else:
            self._refresh_due()

    def _refresh_due(self) -> None:
        self.send(answer("refresh_required", expires_at=int(self.identity.expires_at)))
        delay = max(0.0, self.deadline - time.time())
        self._token_timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._token_timer = None
        self.close_soon(CloseCode.TOKEN_EXPIRED, "token expired")

    def cancel_timers(self) -> None:
        for timer in (self._token_timer, self._skip_timer):
            if timer is not None:
                timer.cancel()
        self._token_timer = self._skip_timer = None
        self._skip = _NO_IDS


async def _through_broker(kind: str, ref: Any, publishing: Awaitable[T]) -> T:
    """Await a client's publish/send; a broker outage becomes an error to the client."""
    try:
        result = await publishing
    except BrokerUnavailable:
        metrics.UPSTREAM_MESSAGES.labels(kind, "broker_down").inc()
        raise ProtocolError("broker_unavailable", f"cannot {kind} right now; retry", ref) from None
    metrics.UPSTREAM_MESSAGES.labels(kind, "accepted").inc()
    return result


def _frame_id(frame: bytes) -> str | None:
    """The notification id inside a pre-built frame (only used at a resume seam)."""
    start = frame.find(b'"id":"')
    if start < 0:
        return None
    start += 6
    end = frame.find(b'"', start)
    return frame[start:end].decode() if end > start else None


def _has_query(request: web.Request) -> bool:
    """Whether the request target has a query (checked before ``request.query``,
    which parses and caches it for as long as the socket is open)."""
    return "?" in request.raw_path


async def close_socket(
    ws: web.WebSocketResponse, transport: Any, code: int, reason: str, grace: float
) -> None:
    """Close a socket that has no session yet (from its own handler, not reading).

    A peer that has not taken the close within ``grace`` is cut off.
    """
    metrics.CLOSES.labels(str(code)).inc()
    deadline = asyncio.get_running_loop().time() + grace
    with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
        await asyncio.wait_for(ws.close(code=code, message=close_reason(reason)), grace)
    await cut_off(transport, deadline)


async def cut_off(transport: Any, deadline: float) -> None:
    """Close the transport; abort what is left unsent at ``deadline``.

    A closed transport keeps flushing its buffer, and for a peer that stopped
    reading it would do so forever, holding the socket and its memory.
    """
    if transport is None:
        return
    transport.close()
    loop = asyncio.get_running_loop()
    while transport.get_write_buffer_size() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if transport.get_write_buffer_size():
        transport.abort()


class SocketServer:
    """The ``/ws`` endpoint: turns requests into sessions and serves their messages."""

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        verifier: TokenVerifier,
        upstream: Upstream,
        replay: Replayer | None,
        routable: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        #: Waits until RabbitMQ routes these keys to this replica.
        self.routable = routable
        self.hub = hub
        self.verifier = verifier
        self.upstream = upstream
        self.replay = replay
        self.draining = False
        self.open_sockets = 0
        self.outbox = Outbox()
        self.on_ack: Callable[[Session, str], None] | None = None

    # --- upgrade and authentication ------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws_settings = self.settings.ws
        origin = request.headers.get("Origin")
        if ws_settings.allowed_origins and origin not in ws_settings.allowed_origins:
            metrics.CONNECTION_ATTEMPTS.labels("origin").inc()
            log.info("refused origin %r", origin)
            raise web.HTTPForbidden(text="origin not allowed\n")
        if self.draining:
            metrics.CONNECTION_ATTEMPTS.labels("overloaded").inc()
            raise web.HTTPServiceUnavailable(text="draining\n", headers={"Retry-After": "1"})
        ws = web.WebSocketResponse(
            protocols=("notifyd.v1",),
            # Pings come from notifyd's Heartbeat (one task, spread over the interval),
            # so pings and pongs reach the read loop.
            autoping=False,
            max_msg_size=ws_settings.max_message_size,
            compress=False,  # one frame is shared by every socket: no per-socket deflate
            timeout=5.0,
            # A client's close is answered when the handler ends; a close notifyd
            # started must not be answered twice (see Session.close_soon).
            autoclose=False,
        )
        await ws.prepare(request)
        self.open_sockets += 1
        try:
            await self._serve(ws, request)
        finally:
            self.open_sockets -= 1
        return ws

    async def _refuse(
        self, ws: web.WebSocketResponse, request: web.Request, code: int, reason: str, outcome: str
    ) -> None:
        metrics.CONNECTION_ATTEMPTS.labels(outcome).inc()
        await close_socket(ws, request.transport, code, reason, grace=2.0)

    async def _authenticate(
        self, ws: web.WebSocketResponse, request: web.Request
    ) -> tuple[Identity, ResumePoint | None] | None:
        """The socket's identity and resume point, or None after closing it."""
        try:
            token, since = await self._credentials(ws, request)
            return await self.verifier.verify(token), since
        except _PeerGone:
            return None
        except _NotProtocol as exc:
            log.info("protocol error from %s: %s", request.remote, exc)
            await self._refuse(ws, request, CloseCode.PROTOCOL_ERROR, str(exc), "protocol_error")
            return None
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
            log.info("auth failed from %s: %s", request.remote, exc)
            if exc.reason == "timeout":
                await self._refuse(ws, request, CloseCode.AUTH_TIMEOUT, "auth timeout", "timeout")
            elif exc.reason == "expired":
                await self._refuse(ws, request, CloseCode.TOKEN_EXPIRED, "token expired", "expired")
            else:
                await self._refuse(
                    ws, request, CloseCode.UNAUTHORIZED, str(exc)[:100], "unauthorized"
                )
            return None

    @staticmethod
    def _query_resume_point(request: web.Request) -> ResumePoint | None:
        if not _has_query(request):
            return None
        try:
            return resume_point(request.query.get("since") or None, request.query.get("since_ts"))
        except ProtocolError as exc:
            raise _NotProtocol(exc.message) from None

    async def _credentials(
        self, ws: web.WebSocketResponse, request: web.Request
    ) -> tuple[str, ResumePoint | None]:
        """The token and resume point, from the header, the query or the first message."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError("malformed", "bad Authorization header")
            return value.strip(), self._query_resume_point(request)
        if _has_query(request) and "token" in request.query:
            if not self.settings.auth.query_token:
                raise AuthError("malformed", "?token= is disabled; use the auth message")
            return request.query["token"], self._query_resume_point(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.auth.auth_timeout
        while True:
            try:
                msg = await ws.receive(timeout=max(0.001, deadline - loop.time()))
            except TimeoutError:
                raise AuthError("timeout", "no auth message in time") from None
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is not WSMsgType.PONG:
                break
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            raise _PeerGone
        if msg.type is not WSMsgType.TEXT:
            raise _NotProtocol("first message must be a JSON text frame")
        try:
            first = parse_client_message(msg.data)
        except ProtocolError as exc:
            raise _NotProtocol(exc.message) from None
        if not isinstance(first, Auth):
            raise AuthError("missing", "first message must be {type: auth}")
        return first.token, first.since

    # --- the session ------------------------------------------------------------------

    async def _serve(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        settings = self.settings
        if self.open_sockets > settings.server.max_connections:
            await self._refuse(ws, request, CloseCode.TRY_AGAIN_LATER, "server full", "overloaded")
            return
        result = await self._authenticate(ws, request)
        if result is None:
            return
        identity, since = result
        if self.hub.connections_of(identity.user) >= settings.ws.max_connections_per_user:
            await self._refuse(
                ws, request, CloseCode.FORBIDDEN, "too many connections", "forbidden"
            )
            return
        if self.draining or ws.closed:
            await self._refuse(ws, request, CloseCode.GOING_AWAY, "server going away", "overloaded")
            return
        session = Session(
            ws,
            request.transport,
            identity,
            settings.ws.send_buffer_bytes,
            settings.auth.leeway,
            self.outbox,
        )
        session.topics.update(identity.topics.exact)
        _ACCEPTED.inc()
        try:
            await self._start(session, since)
            session.watch_token(self.settings.ws.refresh_before)
            await self._read_loop(session)
        except Exception:
            log.exception("session %s of %s failed", session.id, session.user)
            session.close_soon(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            session.reading_ended()
            self.hub.remove(session)
            session.cancel_timers()
            if session._close_task is not None:
                await asyncio.shield(session._close_task)

    async def _start(self, session: Session, since: ResumePoint | None) -> None:
        """Join the hub and say welcome, replaying what was missed when asked to."""
        expires_at = int(session.identity.expires_at)
        heartbeat = self.settings.ws.heartbeat
        # Join first and hold live frames, so nothing falls between replay and live;
        # welcome only once RabbitMQ routes the user here, so that whatever is
        # published after the client saw welcome reaches it.
        session.hold()
        self.hub.add(session)
        if self.routable is not None:
            await self.routable(
                [f"{c.kind}.{c.name}" for c in self.hub.channels_of(session) if c.name]
            )
        if since is None:
            session.release(welcome(session.user, session.id, expires_at, heartbeat, None), [])
            return
        missed = await self._replay(session, since, None)
        session.release(
            welcome(session.user, session.id, expires_at, heartbeat, missed is not None),
            missed or [],
        )

    async def _replay(
        self, session: Session, since: ResumePoint, before_seq: int | None
    ) -> list[Notification] | None:
        if self.replay is None:
            metrics.RESUMES.labels("unavailable").inc()
            return None
        missed = await self.replay(since, self.hub.channels_of(session), before_seq)
        metrics.RESUMES.labels("resumed" if missed is not None else "gap_too_old").inc()
        return missed

    async def _read_loop(self, session: Session) -> None:
        ws = session.ws
        bucket = TokenBucket(self.settings.ws.rate_limit, self.settings.ws.rate_burst)
        async for msg in ws:
            session.answered()
            if session.closing:
                continue
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
                continue
            if msg.type is WSMsgType.BINARY:
                session.send(error("bad_message", "binary frames are not supported"))
                continue
            if msg.type is not WSMsgType.TEXT:
                continue
            if not bucket.take():
                log.info("rate limit: closing user=%s session=%s", session.user, session.id)
                metrics.UPSTREAM_MESSAGES.labels("any", "rate_limited").inc()
                session.close_soon(CloseCode.RATE_LIMITED, "too many messages")
                continue
            try:
                message = parse_client_message(msg.data)
            except ProtocolError as exc:
                session.send(error(exc.code, exc.message, exc.ref))
                continue
            try:
                await self._handle(session, message)
            except ProtocolError as exc:
                session.send(error(exc.code, exc.message, message.ref))
        if ws.close_code == CloseCode.MESSAGE_TOO_BIG:
            metrics.CLOSES.labels(str(CloseCode.MESSAGE_TOO_BIG)).inc()

    # --- client messages ---------------------------------------------------------------

    async def _handle(self, session: Session, message: Any) -> None:
        hub = self.hub
        match message:
            case Ping(ref=ref):
                session.send(answer("pong", ref))
            case Ack(id=notification_id):
                metrics.ACKS.inc()
                if self.on_ack is not None:
                    self.on_ack(session, notification_id)
            case Subscribe(channel=channel, ref=ref):
                await self._subscribe(session, channel, ref)
            case Unsubscribe(channel=channel):
                if channel.kind != "topic" or channel.name not in session.topics:
                    raise ProtocolError("not_subscribed", f"not subscribed to {channel}")
                hub.unsubscribe(session, channel.name)
                session.send(answer("unsubscribed", message.ref, channel=str(channel)))
            case Refresh(token=token):
                await self._refresh(session, token)
            case Resume(since=since, ref=ref):
                await self._resume(session, since, ref)
            case Publish():
                await self._publish(session, message)
            case Send():
                await self._send(session, message)
            case Auth():
                raise ProtocolError("already_authenticated", "this socket is authenticated")

    async def _subscribe(self, session: Session, channel: Channel, ref: Any) -> None:
        if channel.kind != "topic":
            raise ProtocolError(
                "invalid_channel",
                "only topic:<name> can be subscribed; user and broadcast are implicit",
            )
        if not session.identity.topics.allows(channel.name):
            raise ProtocolError("forbidden", f"token does not allow {channel}")
        self.hub.subscribe(session, channel.name)
        if self.routable is not None:
            await self.routable([channel.routing_key])
        session.send(answer("subscribed", ref, channel=str(channel)))

    async def _refresh(self, session: Session, token: str) -> None:
        try:
            identity = await self.verifier.verify(token)
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
            raise ProtocolError("invalid_token", f"refresh refused: {exc}") from None
        if identity.user != session.user:
            log.warning("refresh for another user on session %s: closing", session.id)
            session.close_soon(CloseCode.FORBIDDEN, "refresh token is for another user")
            return
        session.identity = identity
        session.deadline = identity.expires_at + self.settings.auth.leeway
        # Topics the new token no longer allows are left; new exact grants are joined.
        for topic in list(session.topics):
            if not identity.topics.allows(topic):
                self.hub.unsubscribe(session, topic)
        for topic in identity.topics.exact:
            self.hub.subscribe(session, topic)
        session.watch_token(self.settings.ws.refresh_before)
        session.send(answer("refreshed", expires_at=int(identity.expires_at)))

    async def _resume(self, session: Session, since: ResumePoint, ref: Any) -> None:
        # What arrived live since this socket joined is not replayed again.
        before = session.first_live_seq
        session.hold()
        missed = await self._replay(
            session, since, before if before is not None else self.hub.last_seq + 1
        )
        count = len(missed or ())
        session.release(
            answer("resumed", ref, resumed=missed is not None, count=count), missed or []
        )

    async def _publish(self, session: Session, message: Publish) -> None:
        if not session.identity.publish.allows(message.channel.name):
            metrics.UPSTREAM_MESSAGES.labels("publish", "forbidden").inc()
            raise ProtocolError(
                "forbidden", f"token does not allow publishing to {message.channel}", message.ref
            )
        notification_id = await _through_broker(
            "publish",
            message.ref,
            self.upstream.publish(
                message.channel, message.event, message.data, sender=session.user
            ),
        )
        session.send(
            answer("published", message.ref, id=notification_id, channel=str(message.channel))
        )

    async def _send(self, session: Session, message: Send) -> None:
        await _through_broker(
            "send",
            message.ref,
            self.upstream.send_upstream(session.user, session.id, message.event, message.data),
        )
        session.send(answer("sent", message.ref))

    # --- shutdown ---------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        """Every open socket's session."""
        return [s for s in self.hub if isinstance(s, Session)]

    async def drain(self, window: float) -> None:
        """Close every socket with 1001, spread evenly over ``window`` seconds."""
        self.draining = True
        sessions = self.sessions()
        if not sessions:
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        step = window / len(sessions)
        log.info("draining %d sockets over %.1fs", len(sessions), window)
        for index, session in enumerate(sessions):
            delay = start + index * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            session.close_soon(CloseCode.GOING_AWAY, "server going away", grace=2.0)
        tasks = [s._close_task for s in sessions if s._close_task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=3.0)
