"""Reading a channel's notification history, a page at a time, newest first.

- ``GET /api/history?channel=user:42&limit=50&before=<id>`` with
  ``Authorization: Bearer <service key or user JWT>``;
- the WebSocket ``history`` message (:mod:`notifyd.session` asks, :mod:`notifyd.connection`
  calls :meth:`HistoryApi.read_page`);
- any other transport that takes client messages: :meth:`HistoryApi.read_page` is the
  one entry point (``request.app[HISTORY_API]``).

A service key reads any channel; a user token reads its own ``user:<id>``, ``broadcast``
and the topics it may subscribe to (:func:`notifyd.history.may_read`). Pages come from
the in-memory history (this process's window) or the shared stream (every replica
answers alike); retention is ``[history] max_age`` either way. Errors are JSON
``{"error": "<code>", "message": "..."}`` like the other APIs'.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from .auth import Identity, TokenVerifier
from .config import Settings
from .errors import AuthError, BrokerUnavailable, ProtocolError
from .history import HistoryPage, MemoryHistory, may_read
from .metrics import Metrics
from .protocol import Channel, Notification, dumps, history_request, loads
from .responses import json_error

if TYPE_CHECKING:
    from .app import Gateway
    from .stream import StreamHistory

log = logging.getLogger(__name__)

#: ``limit`` when a request names none (never more than ``[history] page_max``).
DEFAULT_LIMIT: Final = 50

#: HTTP status of each error code a page read raises (anything else: 400).
STATUS: Final = {
    "forbidden": 403,
    "history_off": 404,
    "gone": 410,
    "broker_unavailable": 503,
}


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """A reader holding a service key (``[api] service_keys``): every channel."""


#: The one :class:`ServiceKey` reader.
SERVICE: Final = ServiceKey()
#: Who reads a page: a verified user token, or a service key.
Reader = Identity | ServiceKey


def entry(notification: Notification) -> dict[str, Any]:
    """A notification as a page lists it: the ``notification`` message a socket got
    live (``id``, ``channel``, ``event`` if any, ``data``, ``ts``, ``from`` if any),
    without its ``type``. Read back from the pre-built frame, which is all the
    histories keep."""
    frame = notification.frame
    length = frame[1] & 0x7F  # a server frame is unmasked: 2, 4 or 10 header bytes
    payload = frame[2 if length < 126 else 4 if length == 126 else 10 :]
    message: dict[str, Any] = loads(payload)
    message.pop("type", None)
    return message


class HistoryApi:
    """Reads history pages for any transport, and serves ``GET /api/history``."""

    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        memory: MemoryHistory | None,
        stream: StreamHistory | None,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.memory = memory
        self.stream = stream
        self.metrics = metrics

    @property
    def retention(self) -> int:
        """Seconds a notification stays in the history (both backends' ``max_age``)."""
        return int(self.settings.history.max_age)

    async def read_page(
        self,
        reader: Reader,
        channel: Channel,
        limit: int | None,
        before: str | None,
        transport: str = "http",
    ) -> dict[str, Any]:
        """A page of ``channel``: ``{"channel", "notifications" (newest first),
        "next_before" (the oldest id returned, or None when nothing older is retained),
        "retention" (seconds)}``.

        ``limit`` None: :data:`DEFAULT_LIMIT`; ``before`` None: from the newest.
        ``transport`` (``"http"``, ``"ws"``, ...) labels the metric. Raises
        ProtocolError with the code for the client: ``bad_message`` (``limit`` out of
        1..``[history] page_max``), ``forbidden``, ``history_off``, ``gone``
        (``before`` is not in the history: unknown, or past its retention) or
        ``broker_unavailable``; :data:`STATUS` maps them to HTTP.
        """
        try:
            page = await self._read(reader, channel, limit, before)
        except ProtocolError as exc:
            self.metrics.history_requests.labels(transport, exc.code).inc()
            raise
        self.metrics.history_requests.labels(transport, "ok").inc()
        return {
            "channel": str(channel),
            "notifications": [entry(n) for n in page.notifications],
            "next_before": page.next_before,
            "retention": self.retention,
        }

    async def _read(
        self, reader: Reader, channel: Channel, limit: int | None, before: str | None
    ) -> HistoryPage:
        page_max = self.settings.history.page_max
        if self.memory is None and self.stream is None:
            raise ProtocolError("history_off", "this gateway keeps no history")
        if limit is None:
            limit = min(DEFAULT_LIMIT, page_max)
        if not 1 <= limit <= page_max:
            raise ProtocolError("bad_message", f"'limit' must be 1..{page_max}")
        if isinstance(reader, Identity) and not may_read(reader, channel):
            raise ProtocolError("forbidden", f"token does not allow reading {channel}")
        if self.memory is not None:
            page = self.memory.page(channel, limit, before, time.time())
        else:
            assert self.stream is not None
            try:
                page = await self.stream.read_page(channel, limit, before)
            except BrokerUnavailable as exc:
                raise ProtocolError("broker_unavailable", str(exc)) from None
        if page is None:
            raise ProtocolError(
                "gone", "'before' is not in the history (unknown, or older than its retention)"
            )
        return page

    # --- GET /api/history --------------------------------------------------------------

    async def _reader(self, request: web.Request) -> Reader | web.Response:
        """The request's reader, or the answer refusing it."""
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return json_error(401, "unauthorized", "a service key or user token is required")
        if any(
            hmac.compare_digest(credential.encode(), key.encode())
            for key in self.settings.api.service_keys
        ):
            return SERVICE
        try:
            return await self.verifier.verify(credential)
        except AuthError as exc:
            if exc.reason == "revocations_unavailable":
                return json_error(503, "broker_unavailable", str(exc))
            return json_error(401, "unauthorized", str(exc))

    async def handle(self, request: web.Request) -> web.Response:
        reader = await self._reader(request)
        if isinstance(reader, web.Response):
            self.metrics.history_requests.labels("http", "unauthorized").inc()
            return reader
        query = request.query
        try:
            message = history_request(query.get("channel"), query.get("limit"), query.get("before"))
        except ProtocolError as exc:
            self.metrics.history_requests.labels("http", exc.code).inc()
            return json_error(400, exc.code, exc.message)
        try:
            body = await self.read_page(reader, message.channel, message.limit, message.before)
        except ProtocolError as exc:
            if exc.code == "broker_unavailable":
                return json_error(503, exc.code, exc.message, {"Retry-After": "1"})
            return json_error(STATUS.get(exc.code, 400), exc.code, exc.message)
        return web.Response(body=dumps(body), content_type="application/json")


#: The gateway's :class:`HistoryApi`, for other routes that read pages.
HISTORY_API: Final = web.AppKey("history_api", HistoryApi)


def add_history_routes(app: web.Application, gateway: Gateway) -> HistoryApi:
    """Serve ``GET /api/history`` and let the gateway's sockets read pages too."""
    api = HistoryApi(
        gateway.settings, gateway.verifier, gateway.history, gateway.stream, gateway.metrics
    )
    app[HISTORY_API] = api
    app.router.add_get("/api/history", api.handle)
    gateway.sockets.history = api
    return api
