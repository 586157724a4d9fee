"""A Python client for notifyd's WebSocket (``/ws``), on asyncio and aiohttp.

::

    from notifyd.client import Client

    async with Client("wss://notify.example.com/ws", token_factory=get_token) as client:
        await client.subscribe("topic:news")
        async for notification in client:
            print(notification.channel, notification.event, notification.data)

It behaves like the browser client (``notifyd/static/notifyd.js``): it authenticates
with the first message, answers ``refresh_required`` with a token from the
``token_factory``, reconnects with full-jitter exponential backoff, resumes from the
last notification it saw (``since`` and ``since_ts``) and drops duplicates by id.

This module imports only the standard library and aiohttp's client: nothing of the
server (no ``aiohttp.web``, PyJWT or prometheus_client).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

import aiohttp

__all__ = [
    "Client",
    "ClientError",
    "ConnectionClosed",
    "Notification",
    "NotifydError",
    "RecentIds",
    "State",
    "StateEvent",
    "backoff_delay",
    "should_reconnect",
]

log = logging.getLogger("notifyd.client")

SUBPROTOCOL: Final = "notifyd.v1"

#: Close codes after which reconnecting cannot help: the client broke the protocol
#: (``1002``, ``1007``, ``1009``, ``4000``) or was shut out (``4003``: per-user limit,
#: refresh for another user, disconnected by the backend).
FATAL_CODES: Final = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4000, 4003})
#: Close codes that call for a new token (``4001`` unauthorized, ``4010`` expired):
#: the client reconnects only if it has a ``token_factory`` to ask for one.
TOKEN_CODES: Final = frozenset({4001, 4010})
#: HTTP statuses refusing the upgrade that are worth retrying (the rest, e.g. ``403``
#: for a refused ``Origin`` or ``404`` for a wrong path, stop the client).
RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})

TokenFactory = Callable[[], Awaitable[str] | str]
Overflow = Literal["block", "drop_oldest"]


# --- pure parts: backoff, reconnect policy, dedupe -----------------------------------------


def backoff_delay(
    attempt: int,
    base: float = 0.5,
    cap: float = 30.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before reconnect number ``attempt + 1``: "full jitter".

    The delay is uniform in ``[0, min(cap, base * 2 ** attempt)]`` (AWS Architecture
    Blog, "Exponential Backoff And Jitter"), so clients cut off together spread their
    reconnects over the whole window instead of returning in waves.

    Args:
        attempt: Reconnects since the last successful ``welcome``, from 0.
        base: Ceiling of the first delay, in seconds.
        cap: Largest ceiling, in seconds.
        rand: Source of uniform numbers in ``[0, 1)``; tests pass their own.

    Raises:
        ValueError: If ``attempt`` is negative.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # 2.0 ** 1024 overflows a float: past 64 doublings the cap has long won.
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))
    return rand() * ceiling


def should_reconnect(code: int | None, has_token_factory: bool, status: int | None = None) -> bool:
    """Whether a connection that ended with ``code`` is worth trying again.

    Args:
        code: The WebSocket close code, or None when there was no WebSocket (network
            failure, refused upgrade). ``1006`` means the connection was lost without a
            close frame.
        has_token_factory: Whether the client can ask for a new token; ``4001`` and
            ``4010`` are retried only then.
        status: The HTTP status of a refused upgrade, if that is how it ended.

    Returns:
        True for network failures and "try again" codes (``1001`` going away, ``1006``,
        ``1011``, ``1013``, ``4008``, ``4009``, ``4029`` and any code not listed as
        fatal); False for :data:`FATAL_CODES`, for :data:`TOKEN_CODES` without a
        ``token_factory``, and for an HTTP status outside :data:`RETRY_STATUSES`.
    """
    if status is not None:
        return status in RETRY_STATUSES
    if code is None:
        return True
    if code in FATAL_CODES:
        return False
    if code in TOKEN_CODES:
        return has_token_factory
    return True


class RecentIds:
    """The ids seen last, bounded: the least recently seen are forgotten first."""

    def __init__(self, size: int = 1000) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def seen(self, notification_id: str) -> bool:
        """True if ``notification_id`` was seen already; remembers it either way."""
        if notification_id in self._ids:
            self._ids.move_to_end(notification_id)
            return True
        self._ids[notification_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return False

    def __contains__(self, notification_id: object) -> bool:
        return notification_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification, as notifyd sent it.

    Attributes:
        id: The notification id (the AMQP ``message_id``, or one notifyd generated).
        channel: ``user:<id>``, ``topic:<name>`` or ``broadcast``.
        event: The event name, or None.
        data: Any JSON value.
        ts: Publish time, unix milliseconds.
        sender: For a client's ``publish``: the user id of that client (``from`` on the
            wire); None for notifications from backends.
    """

    id: str
    channel: str
    event: str | None
    data: Any
    ts: int
    sender: str | None = None

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Notification:
        """Build one from a decoded ``notification`` message."""
        return cls(
            id=str(message["id"]),
            channel=str(message.get("channel", "")),
            event=message.get("event"),
            data=message.get("data"),
            ts=int(message.get("ts") or 0),
            sender=message.get("from"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form (``from`` and ``event`` only when set), without ``type``."""
        out: dict[str, Any] = {"id": self.id, "channel": self.channel}
        if self.event is not None:
            out["event"] = self.event
        out["data"] = self.data
        out["ts"] = self.ts
        if self.sender is not None:
            out["from"] = self.sender
        return out


class State(enum.StrEnum):
    """Where a :class:`Client` is in its life."""

    IDLE = "idle"  #: created, not connected yet
    CONNECTING = "connecting"  #: an attempt is under way (upgrade, auth, welcome)
    OPEN = "open"  #: ``welcome`` received: notifications flow, requests are answered
    RECONNECTING = "reconnecting"  #: the connection ended; waiting ``delay`` to try again
    CLOSED = "closed"  #: for good: :meth:`Client.close`, or a close code not worth retrying


@dataclass(frozen=True, slots=True)
class StateEvent:
    """A change of :attr:`Client.state`, passed to ``on_state``.

    Attributes:
        state: The new state.
        attempt: Reconnects since the last ``welcome`` (0 on the first attempt).
        delay: For ``RECONNECTING``: seconds until the next attempt.
        code: For ``RECONNECTING`` and ``CLOSED``: the close code that ended the
            connection (None: no WebSocket, e.g. a network failure or refused upgrade).
        reason: The close reason, or what went wrong.
        resumed: For ``OPEN``: ``welcome.resumed`` (None: nothing to resume from yet;
            False: the gap was too old, nothing was replayed: re-fetch state).
        url: The URL of this attempt or connection.
    """

    state: State
    attempt: int = 0
    delay: float | None = None
    code: int | None = None
    reason: str = ""
    resumed: bool | None = None
    url: str | None = None


class NotifydError(Exception):
    """Base class of this module's errors."""


class ClientError(NotifydError):
    """notifyd answered a request with an ``error`` (the socket stays open).

    Attributes:
        code: The error code (``forbidden``, ``invalid_channel``, ``too_big``,
            ``broker_unavailable``, ...; see the README's wire protocol).
        message: notifyd's explanation.
        answer: The whole ``error`` message.
    """

    def __init__(self, code: str, message: str, answer: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.answer = dict(answer or {})


class ConnectionClosed(NotifydError):
    """The connection is gone: a request could not be answered, or the client stopped.

    Attributes:
        code: The close code (None when there was no WebSocket).
        reason: The close reason, or what went wrong.
        status: The HTTP status, when notifyd refused the upgrade.
    """

    def __init__(self, code: int | None, reason: str = "", status: int | None = None) -> None:
        super().__init__(f"connection closed ({code}): {reason}" if code else reason)
        self.code = code
        self.reason = reason
        self.status = status


# --- the inbox -------------------------------------------------------------------------------


class _Inbox:
    """A bounded queue of notifications between the socket and the application."""

    def __init__(self, size: int, overflow: Overflow) -> None:
        self.size = size
        self.overflow = overflow
        self.dropped = 0
        self.closed = False
        self._items: collections.deque[Notification] = collections.deque()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Notification) -> None:
        while len(self._items) >= self.size and not self.closed:
            if self.overflow == "drop_oldest":
                self._items.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("notification queue full: %d dropped so far", self.dropped)
                break
            self._room.clear()
            await self._room.wait()
        if not self.closed:  # after Client.close(), what still arrives is not queued
            self._items.append(item)
            self._readable.set()

    async def get(self) -> Notification | None:
        """The oldest notification; None once closed and empty."""
        while not self._items:
            if self.closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        self._room.set()
        return self._items.popleft()

    def close(self) -> None:
        self.closed = True
        self._readable.set()
        self._room.set()


# --- the client ------------------------------------------------------------------------------


class Client:
    """A notifyd WebSocket client that stays connected until :meth:`close`.

    ::

        async with Client(url, token_factory=fetch_token, topics=["news"]) as client:
            async for notification in client:
                ...

    Args:
        url: notifyd's WebSocket URL (``ws://host:8080/ws``), or several: each reconnect
            tries the next one (replicas without a load balancer in front).
        token: A JWT. Without ``token_factory``, the client stops when notifyd closes
            with ``4001`` (unauthorized) or ``4010`` (expired), and cannot answer
            ``refresh_required``.
        token_factory: A callable returning a JWT, or an awaitable of one, called for
            each connection attempt and for each ``refresh_required``. With one, ``4001``
            and ``4010`` are retried with a new token. If it raises, the attempt counts
            as failed and is retried with backoff.
        topics: Topics to subscribe after each ``welcome`` (``"news"`` or
            ``"topic:news"``); topics the token lists exactly are joined by notifyd
            without asking. :meth:`subscribe` adds to them, :meth:`unsubscribe` removes.
        backoff_base: Ceiling of the first reconnect delay, in seconds.
        backoff_cap: Largest reconnect delay, in seconds (see :func:`backoff_delay`).
        open_timeout: Seconds an attempt may take from TCP connect to ``welcome``.
        request_timeout: Default seconds a request waits for its answer (including,
            while the client is reconnecting, for the connection to open).
        heartbeat: Send a WebSocket ping every this many seconds and drop the
            connection (then reconnect) when its pong does not come back within half
            of it; None to rely on notifyd's pings and TCP alone.
        max_queue: Notifications received and not yet read by the application.
        overflow: What happens when ``max_queue`` is reached. ``"block"`` (default):
            the client stops reading the socket until the application reads, so no
            notification is dropped here; requests are not answered meanwhile, and if
            it lasts, notifyd closes the socket (``4009``, its send buffer is bounded)
            or the heartbeat gives up, and the client reconnects and resumes from the
            last notification it queued. ``"drop_oldest"``: the oldest queued
            notification is discarded (counted in :attr:`dropped`, logged).
        dedupe_size: How many recent notifications (channel and id) are remembered
            to drop duplicates (a resume may repeat what arrived live).
        on_state: Called with a :class:`StateEvent` at each change of :attr:`state`.
        on_error: Called with a :class:`ClientError` for an ``error`` that answers no
            request, and for a ``token_factory`` failure (code ``token_unavailable``).
        session: An :class:`aiohttp.ClientSession` to connect with (its connector,
            SSL and proxy settings); by default the client makes and closes its own.
        headers: More headers for the upgrade request (not for the token: it is sent
            in the first message).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        token_factory: TokenFactory | None = None,
        topics: Iterable[str] = (),
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        open_timeout: float = 20.0,
        request_timeout: float = 10.0,
        heartbeat: float | None = 30.0,
        max_queue: int = 1000,
        overflow: Overflow = "block",
        dedupe_size: int = 1000,
        on_state: Callable[[StateEvent], None] | None = None,
        on_error: Callable[[ClientError], None] | None = None,
        session: aiohttp.ClientSession | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.urls: tuple[str, ...] = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ValueError("url: give at least one")
        if token is None and token_factory is None:
            raise ValueError("give token= or token_factory=")
        if overflow not in ("block", "drop_oldest"):
            raise ValueError("overflow must be 'block' or 'drop_oldest'")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._token = token
        self._token_factory = token_factory
        self._topics: dict[str, None] = dict.fromkeys(_topic(t) for t in topics)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self.heartbeat = heartbeat
        self._on_state = on_state
        self._on_error = on_error
        self._session = session
        self._headers = dict(headers or {})
        self._inbox = _Inbox(max_queue, overflow)
        self._recent = RecentIds(dedupe_size)

        #: Current state; see :class:`State`.
        self.state = State.IDLE
        #: Id and ``ts`` of the newest notification delivered: the resume point.
        self.last_id: str | None = None
        self.last_ts: int | None = None
        #: From the last ``welcome``: the user id, session id, token expiry (unix s),
        #: and whether the gap was replayed (None when there was no resume point).
        self.user: str | None = None
        self.session_id: str | None = None
        self.expires_at: int | None = None
        self.resumed: bool | None = None
        #: The URL of the current (or last) connection attempt.
        self.url = self.urls[0]
        #: Reconnects since the last ``welcome``; total reconnects; duplicates dropped.
        self.attempt = 0
        self.reconnects = 0
        self.duplicates = 0

        self._url_index = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._open = asyncio.Event()
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False
        self._failure: ConnectionClosed | None = None
        self._refs = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._refreshes: collections.deque[int] = collections.deque()
        self._helpers: set[asyncio.Task[Any]] = set()

    # --- lifecycle -------------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> Client:
        """Start the client and wait for the first ``welcome``.

        Network failures and "try again" close codes are retried with backoff while
        this waits (a notifyd still starting is fine).

        Args:
            timeout: Give up after this many seconds (None: keep trying).

        Returns:
            The client, open.

        Raises:
            ConnectionClosed: The client stopped first: a close code or HTTP status not
                worth retrying (e.g. ``4001`` with a bad static token), or :meth:`close`.
            TimeoutError: ``timeout`` passed; the client is closed.
        """
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._run(), name="notifyd-client")
        try:
            await self._wait_open(timeout)
        except TimeoutError:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Close the connection (code ``1000``) and stop reconnecting.

        Notifications already queued can still be read; then iteration ends.
        """
        self._closing = True
        self._wake.set()
        # Unblocks a reader waiting for room (overflow="block"); what is queued stays.
        self._inbox.close()
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close(code=1000, message=b"client closed")
        task = self._task
        if task is None:
            self._finish(1000, "client closed")
        elif task is not asyncio.current_task():
            await asyncio.shield(task)

    async def wait_closed(self) -> ConnectionClosed | None:
        """Wait until the client stops; returns why (None after :meth:`close`)."""
        await self._done.wait()
        return self._failure

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- notifications ---------------------------------------------------------------------

    async def notifications(self) -> AsyncIterator[Notification]:
        """Yield notifications as they arrive, oldest first, each id once.

        Meant for one consumer at a time. Iteration ends after :meth:`close` (once
        what was queued has been read).

        Raises:
            ConnectionClosed: The client stopped on its own: notifyd closed with a code
                not worth retrying (``4003``, or ``4001``/``4010`` without a
                ``token_factory``) or refused the upgrade.
        """
        while True:
            notification = await self._inbox.get()
            if notification is None:
                if self._failure is not None:
                    raise self._failure
                return
            yield notification

    def __aiter__(self) -> AsyncIterator[Notification]:
        return self.notifications()

    @property
    def dropped(self) -> int:
        """Notifications discarded by ``overflow="drop_oldest"``."""
        return self._inbox.dropped

    @property
    def queued(self) -> int:
        """Notifications received and not yet read."""
        return len(self._inbox)

    @property
    def topics(self) -> tuple[str, ...]:
        """Topics (re)subscribed after each ``welcome``."""
        return tuple(self._topics)

    # --- requests --------------------------------------------------------------------------

    async def subscribe(self, channel: str, timeout: float | None = None) -> dict[str, Any]:
        """Join a topic the token allows, now and after each reconnect.

        Args:
            channel: ``"topic:<name>"`` (or just the name).

        Returns:
            notifyd's ``subscribed`` answer, sent once RabbitMQ routes the topic here.

        Raises:
            ClientError: e.g. ``forbidden`` (the token does not allow it; the topic is
                not kept), ``too_many_topics``.
            ConnectionClosed, TimeoutError: as for :meth:`ping`.
        """
        channel = _topic(channel)
        self._topics[channel] = None
        try:
            return await self._request({"type": "subscribe", "channel": channel}, timeout)
        except ClientError:
            self._topics.pop(channel, None)
            raise

    async def unsubscribe(self, channel: str, timeout: float | None = None) -> dict[str, Any]:
        """Leave a topic; returns the ``unsubscribed`` answer.

        Raises:
            ClientError: ``not_subscribed``.
        """
        channel = _topic(channel)
        self._topics.pop(channel, None)
        return await self._request({"type": "unsubscribe", "channel": channel}, timeout)

    async def publish(
        self, channel: str, data: Any, event: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Publish to everyone on a topic (the token's ``publish`` claim must list it).

        Returns:
            The ``published`` answer (``id``, ``channel``), once RabbitMQ confirmed it.

        Raises:
            ClientError: ``forbidden``, ``too_big``, ``too_deep``,
                ``broker_unavailable``, ``bad_message``...
        """
        message: dict[str, Any] = {"type": "publish", "channel": _topic(channel), "data": data}
        if event is not None:
            message["event"] = event
        return await self._request(message, timeout)

    async def send(self, event: str, data: Any, timeout: float | None = None) -> dict[str, Any]:
        """Send a message to the backends (exchange ``notifyd.upstream``, key ``user.<id>``).

        Returns:
            The ``sent`` answer, once RabbitMQ confirmed it.
        """
        return await self._request({"type": "send", "event": event, "data": data}, timeout)

    async def history(
        self,
        channel: str,
        limit: int | None = None,
        before: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One page of a channel's history (``user:<id>``, ``topic:<name>``, ``broadcast``),
        newest first.

        Returns:
            The ``history`` answer: ``notifications`` (newest first) and ``next_before``
            (pass it as ``before`` for the next, older page; None when there is none).

        Raises:
            ClientError: ``forbidden`` (a channel the token may not read),
                ``gone`` (``before`` fell out of the retention window),
                ``history_off``, ``broker_unavailable``, ``bad_message``.
        """
        message: dict[str, Any] = {"type": "history", "channel": channel}
        if limit is not None:
            message["limit"] = limit
        if before is not None:
            message["before"] = before
        return await self._request(message, timeout)

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Round-trip a ``ping``; returns the ``pong``.

        Like every request, it waits (within the timeout) for the connection to be
        open if the client is reconnecting.

        Raises:
            ConnectionClosed: Not connected and not going to be (closed), or the
                connection was lost before the answer came (the request may or may not
                have been carried out).
            TimeoutError: No answer within ``timeout`` (default ``request_timeout``).
        """
        return await self._request({"type": "ping"}, timeout)

    async def ack(self, notification_id: str) -> None:
        """Acknowledge a notification (optional; notifyd only counts it, no answer)."""
        ws = await self._open_socket(self.request_timeout)
        await ws.send_str(json.dumps({"type": "ack", "id": notification_id}))

    async def resume(
        self, since: str | None = None, since_ts: int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Ask for what this socket's channels missed after ``since`` (default: the last
        notification seen). Repeats are dropped by id. Returns the ``resumed`` answer."""
        since, since_ts = (since, since_ts) if since else (self.last_id, self.last_ts)
        if since is None:
            raise ValueError("nothing to resume from: no notification seen yet")
        message: dict[str, Any] = {"type": "resume", "since": since}
        if since_ts is not None:
            message["since_ts"] = since_ts
        return await self._request(message, timeout)

    async def refresh(
        self, token: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Swap the connection's token in place (done on ``refresh_required`` already).

        Args:
            token: The new token; by default one from ``token_factory``. A token given
                here is also used for later reconnects when there is no factory.

        Returns:
            The ``refreshed`` answer (``expires_at``).

        Raises:
            ClientError: ``invalid_token``. (A token for another user makes notifyd
                close with ``4003``.)
        """
        if token is None:
            token = await self._get_token()
        elif self._token_factory is None:
            self._token = token
        answer = await self._request({"type": "refresh", "token": token}, timeout, refresh=True)
        self.expires_at = answer.get("expires_at", self.expires_at)
        return answer

    async def _request(
        self, message: dict[str, Any], timeout: float | None, refresh: bool = False
    ) -> dict[str, Any]:
        timeout = self.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ws = await self._open_socket(timeout)
        ref = next(self._refs)
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[ref] = future
        if refresh:
            self._refreshes.append(ref)
        try:
            try:
                await ws.send_str(json.dumps({**message, "ref": ref}))
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                raise ConnectionClosed(1006, f"send failed: {exc}") from exc
            async with asyncio.timeout_at(deadline):
                return await future
        finally:
            self._pending.pop(ref, None)
            with contextlib.suppress(ValueError):
                self._refreshes.remove(ref)

    async def _open_socket(self, timeout: float) -> aiohttp.ClientWebSocketResponse:
        await self._wait_open(timeout)
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionClosed(1006, "not connected")
        return ws

    async def _wait_open(self, timeout: float | None) -> None:
        if self._open.is_set():
            return
        if self._done.is_set() or self._task is None:
            raise self._failure or ConnectionClosed(None, "client is closed or not started")
        waiters = {
            asyncio.ensure_future(self._open.wait()),
            asyncio.ensure_future(self._done.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._open.is_set():
            return
        if self._done.is_set():
            raise self._failure or ConnectionClosed(1000, "client closed")
        raise TimeoutError(f"not connected within {timeout} s")

    # --- the connection loop ---------------------------------------------------------------

    async def _run(self) -> None:
        http = self._session or aiohttp.ClientSession()
        code: int | None = 1000
        reason = "client closed"
        try:
            while not self._closing:
                closed = await self._connection(http)
                if self._stopping():
                    break
                code, reason = closed.code, closed.reason
                if not should_reconnect(code, self._token_factory is not None, closed.status):
                    log.warning("notifyd closed the connection for good: %s", closed)
                    self._failure = closed
                    break
                delay = backoff_delay(self.attempt, self.backoff_base, self.backoff_cap)
                self.attempt += 1
                self.reconnects += 1
                log.info("connection ended (%s %s): reconnecting in %.2f s", code, reason, delay)
                self._set_state(
                    State.RECONNECTING,
                    delay=delay,
                    code=code,
                    reason=reason,
                )
                self._url_index = (self._url_index + 1) % len(self.urls)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            if self._failure is None:
                code, reason = 1000, "client closed"
        finally:
            if self._session is None:
                await http.close()
            self._finish(code, reason)

    def _stopping(self) -> bool:
        return self._closing  # a call: mypy would keep the loop condition's narrowing

    def _finish(self, code: int | None, reason: str) -> None:
        if self._done.is_set():
            return
        self._closing = True
        self._open.clear()
        self._fail_pending(ConnectionClosed(code, reason))
        for helper in self._helpers:
            helper.cancel()
        self._inbox.close()
        self._set_state(State.CLOSED, code=code, reason=reason)
        self._done.set()

    async def _connection(self, http: aiohttp.ClientSession) -> ConnectionClosed:
        """One attempt and, if it opens, the connection's life; returns how it ended."""
        self.url = self.urls[self._url_index]
        self._set_state(State.CONNECTING)
        try:
            token = await self._get_token()
        except Exception as exc:
            log.warning("token_factory failed: %s", exc)
            self._report(ClientError("token_unavailable", str(exc)))
            return ConnectionClosed(None, f"token unavailable: {exc}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.open_timeout
        try:
            async with asyncio.timeout_at(deadline):
                ws = await http.ws_connect(
                    self.url,
                    protocols=(SUBPROTOCOL,),
                    heartbeat=self.heartbeat,
                    headers=self._headers,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                )
        except aiohttp.WSServerHandshakeError as exc:
            return ConnectionClosed(None, f"upgrade refused: HTTP {exc.status}", exc.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return ConnectionClosed(None, f"cannot connect: {exc!r}")
        if self._closing:
            await ws.close()
            return ConnectionClosed(1000, "client closed")
        self._ws = ws
        point = (self.last_id, self.last_ts)
        try:
            auth: dict[str, Any] = {"type": "auth", "token": token}
            if self.last_id is not None:
                auth["since"] = self.last_id
                if self.last_ts is not None:
                    auth["since_ts"] = self.last_ts
            await ws.send_str(json.dumps(auth))
            return await self._read(ws, deadline, point)
        except (ConnectionError, aiohttp.ClientError) as exc:
            return ConnectionClosed(1006, f"connection lost: {exc!r}")
        finally:
            self._ws = None
            self._open.clear()
            for helper in self._helpers:
                helper.cancel()
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
            self._fail_pending(ConnectionClosed(ws.close_code or 1006, "connection lost"))

    async def _read(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        welcome_deadline: float,
        point: tuple[str | None, int | None],
    ) -> ConnectionClosed:
        loop = asyncio.get_running_loop()
        reason = ""
        while True:
            timeout = None if self._open.is_set() else welcome_deadline - loop.time()
            if timeout is not None and timeout <= 0:
                return ConnectionClosed(None, "no welcome within open_timeout")
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                return ConnectionClosed(None, "no welcome within open_timeout")
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    message = json.loads(msg.data)
                except ValueError:
                    log.warning("notifyd sent text that is not JSON; ignored")
                    continue
                if isinstance(message, dict):
                    await self._dispatch(message, point)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                reason = str(msg.extra or "")
            elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                break
            elif msg.type is aiohttp.WSMsgType.ERROR:
                reason = f"{msg.data!r}"
                break
        code = ws.close_code if ws.close_code is not None else 1006
        return ConnectionClosed(code, reason)

    async def _dispatch(
        self, message: dict[str, Any], point: tuple[str | None, int | None]
    ) -> None:
        """Handle one message from notifyd (in the reading task)."""
        kind = message.get("type")
        if kind == "notification":
            await self._notification(message)
        elif kind == "welcome":
            self.attempt = 0
            self.user = message.get("user")
            self.session_id = message.get("session")
            self.expires_at = message.get("expires_at")
            self.resumed = message.get("resumed")
            self._open.set()
            self._set_state(State.OPEN, resumed=self.resumed)
            if self._topics:
                self._spawn(self._resubscribe(tuple(self._topics), point))
        elif kind == "refresh_required":
            if self._token_factory is not None:
                self._spawn(self._refresh_required())
            else:
                log.warning(
                    "token expires at %s and there is no token_factory to refresh it",
                    message.get("expires_at"),
                )
        elif kind == "refreshed":
            self.expires_at = message.get("expires_at", self.expires_at)
            ref = message.get("ref")
            if ref is None and self._refreshes:
                ref = self._refreshes.popleft()
            self._settle(ref, message)
        elif kind == "error":
            error = ClientError(str(message.get("code")), str(message.get("message", "")), message)
            if not self._settle(message.get("ref"), error):
                log.warning("notifyd error: %s", error)
                self._report(error)
        elif "ref" in message:
            self._settle(message["ref"], message)

    async def _notification(self, message: dict[str, Any]) -> None:
        try:
            notification = Notification.from_message(message)
        except (KeyError, TypeError, ValueError):
            log.warning("malformed notification ignored")
            return
        # Ids are the publisher's, unique per channel (notifyd dedupes the same way).
        if self._recent.seen(f"{notification.channel} {notification.id}"):
            self.duplicates += 1
            return
        await self._inbox.put(notification)
        self.last_id, self.last_ts = notification.id, notification.ts or self.last_ts

    async def _resubscribe(
        self, topics: tuple[str, ...], point: tuple[str | None, int | None]
    ) -> None:
        """Subscribe ``topics`` after a ``welcome``; after a resumed reconnect, also ask
        for what they missed (``welcome`` replays only the user's channel, the token's
        topics and broadcasts)."""
        subscribed = False
        for channel in topics:
            try:
                await self._request({"type": "subscribe", "channel": channel}, None)
                subscribed = True
            except ClientError as exc:
                log.warning("subscribe %s refused: %s", channel, exc)
                self._topics.pop(channel, None)
                self._report(exc)
        since, since_ts = point
        if subscribed and since is not None and self.resumed:
            await self.resume(since, since_ts)

    async def _refresh_required(self) -> None:
        try:
            await self.refresh()
        except ClientError as exc:
            log.warning("refresh refused: %s", exc)
            self._report(exc)
        except Exception as exc:
            log.warning("refresh failed: %s", exc)
            self._report(ClientError("token_unavailable", str(exc)))

    # --- helpers ---------------------------------------------------------------------------

    async def _get_token(self) -> str:
        if self._token_factory is None:
            assert self._token is not None
            return self._token
        result = self._token_factory()
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str) or not result:
            raise TypeError(f"token_factory returned {type(result).__name__}, not a token")
        return result

    def _settle(self, ref: object, outcome: dict[str, Any] | ClientError) -> bool:
        if not isinstance(ref, int):
            return False
        future = self._pending.get(ref)
        if future is None or future.done():
            return False
        if isinstance(outcome, ClientError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
        return True

    def _fail_pending(self, error: ConnectionClosed) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._refreshes.clear()

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._helpers.add(task)
        task.add_done_callback(self._helper_done)

    def _helper_done(self, task: asyncio.Task[Any]) -> None:
        self._helpers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("background request failed: %r", task.exception())

    def _set_state(self, state: State, **details: Any) -> None:
        self.state = state
        if self._on_state is None:
            return
        event = StateEvent(state, attempt=self.attempt, url=self.url, **details)
        try:
            self._on_state(event)
        except Exception:
            log.exception("on_state callback failed")

    def _report(self, error: ClientError) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(error)
        except Exception:
            log.exception("on_error callback failed")


def _topic(channel: str) -> str:
    """``news`` → ``topic:news``; a full channel name is kept as it is."""
    return channel if ":" in channel or channel == "broadcast" else f"topic:{channel}"
