"""The HTTP application and the process lifecycle, in one place.

:class:`Gateway` creates and closes everything a replica owns: the token
verifier, the hub, the broker connection and its supervisor task, the history,
the WebSocket endpoint, the heartbeat and outage tasks. :func:`serve` runs one
process until SIGTERM/SIGINT and shuts it down in order: not ready at once,
sockets closed with 1001 spread over ``drain_seconds``, listener closed, broker
closed (unacked deliveries return to RabbitMQ), exit.

Both are one ordered list of steps (uvicorn's start-up and shutdown are the
model): each step that acquires something pushes its undoing onto an exit
stack, so whatever started is undone in reverse order on every path (a clean
stop, a failure midway through start-up, a port that is taken), and every task
started is cancelled and awaited (:func:`notifyd.lifecycle.cancel_and_wait`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractConnection
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import gcpolicy, redact
from .admin import AdminApi
from .amqp import ControlCommand, Disconnect, Revoke
from .auth import TokenVerifier, mint_token
from .broker import Broker, default_replica_id
from .closes import CloseReason
from .cluster import ClusterLink
from .config import Settings
from .connection import Connection, SocketServer
from .errors import BrokerUnavailable, ProtocolError, ServeError
from .heartbeat import Heartbeat
from .history import MemoryHistory, RecentIds
from .history_api import add_history_routes
from .hub import Hub
from .lifecycle import cancel_and_wait
from .metrics import Metrics, process_registry
from .offline import OfflineHook
from .protocol import (
    MAX_ID_LENGTH,
    Channel,
    Notification,
    ResumePoint,
    channel_for_routing_key,
    loads,
    parse_channel,
    valid_event,
    valid_name,
)
from .push_api import add_push_routes
from .responses import json_error
from .revocations import RevocationLog
from .sse import SseServer, SseStream
from .stream import StreamHistory

log = logging.getLogger(__name__)

STATIC_DIR = Path(str(resources.files("notifyd") / "static"))
#: Seconds between looks at the broker connection for ``[amqp] close_sockets_after``.
OUTAGE_POLL = 0.2


class Gateway:
    """Everything one replica owns, created in :meth:`start` and closed in :meth:`stop`."""

    def __init__(
        self, settings: Settings, replica_id: str | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        #: Every metric of this replica, on a registry of its own (served on /metrics),
        #: handed to everything that counts.
        self.metrics = metrics if metrics is not None else Metrics(process_registry())
        self.verifier = TokenVerifier(settings.auth)
        self.revocations = RevocationLog(
            self.verifier, settings.auth.revocation_max_age, self._close_revoked
        )
        history_settings = settings.history
        self.history: MemoryHistory | None = None
        if history_settings.backend == "memory":
            self.history = MemoryHistory(
                history_settings.max_per_user, history_settings.max_age, history_settings.max_total
            )
        self.broker = Broker(
            settings.amqp,
            self._on_notification,
            self._on_control,
            replica_id=replica_id,
            metrics=self.metrics,
        )
        # A user's key stays bound on notifyd.route (the user is online, for the offline
        # hook) for binding_grace after their last socket left. With in-memory history it
        # then stays bound on notifyd itself for the rest of the retention window: what
        # is published while they are away reaches this process's history, and
        # notifyd.offline too.
        self.hub = Hub(
            self.broker.bindings,
            linger=settings.ws.binding_grace,
            history=self.history,
            dedupe=RecentIds(settings.amqp.dedupe_window) if settings.amqp.dedupe_window else None,
            on_delivered=self._on_delivered,
            retain=history_settings.max_age if self.history is not None else 0.0,
            retained=self.broker.history_bindings,
            metrics=self.metrics,
        )
        #: Sends what no replica holds to notifyd.offline (one replica at a time).
        self.offline = OfflineHook(
            settings.amqp, self.broker.replica_id, self.broker.ids, self.metrics
        )
        # Cluster-wide presence, stats, admin commands and the per-user limit.
        self.cluster = ClusterLink(
            self.broker.replica_id,
            self.hub,
            beacon_interval=settings.cluster.beacon_interval,
            query_timeout=settings.cluster.query_timeout,
            grace=settings.ws.binding_grace,
            max_connections_per_user=settings.ws.max_connections_per_user,
            queue_type=settings.amqp.queue_type,
            presence_log_max_age=settings.cluster.presence_log_max_age,
            ids=self.broker.ids,
            metrics=self.metrics,
        )
        self.hub.on_change = self.cluster.socket_changed
        self.sockets = SocketServer(
            settings,
            self.hub,
            self.verifier,
            self.broker,
            replay=self._replay_memory if self.history is not None else None,
            routing=self.broker,
            metrics=self.metrics,
        )
        self.sockets.presence = self.cluster
        #: GET /sse, POST /api/sse-ticket, POST /api/messages (served when [sse] enabled).
        self.sse = SseServer(settings, self.sockets, self.metrics)
        self.sockets.other_connections = lambda: len(self.sse.streams)
        # A ticket redeemed here is refused on every replica (announced on notifyd.cluster).
        self.sse.announce = self.cluster.announce_ticket
        self.cluster.on_ticket = self.sse.redeemed_elsewhere
        self.stream: StreamHistory | None = None
        if history_settings.backend == "stream":
            self.stream = StreamHistory(settings.history, self.broker, self.metrics)
            self.sockets.replay = self.stream.replay
        self.draining = False
        self._drained = False
        self._broker_task: asyncio.Task[None] | None = None
        #: What :meth:`stop` undoes, in reverse order (None: not started).
        self._stack: contextlib.AsyncExitStack | None = None

    # --- routing callbacks ------------------------------------------------------------

    def _on_notification(self, notification: Notification) -> None:
        self.hub.deliver(notification)

    def _on_delivered(self, notification: Notification, written: int) -> None:
        if notification.receipt:
            self.broker.send_receipt(notification, written)

    def _on_control(self, command: ControlCommand) -> None:
        if isinstance(command, Disconnect):
            closed = self.hub.disconnect_user(command.user)
            log.info("control: disconnected user %s (%d sockets here)", command.user, closed)
        elif isinstance(command, Revoke):
            if not self.verifier.revoke(command.token_ids, command.until):
                log.info("control: revocation of %d token ids has expired", len(command.token_ids))
                return
            closed = self._close_revoked(set(command.token_ids))
            log.info(
                "control: revoked %d token ids (%d sockets here)", len(command.token_ids), closed
            )
            max_age = self.settings.auth.revocation_max_age
            if command.until > time.time() + max_age:
                log.warning(
                    "control: a revocation lasts past [auth] revocation_max_age (%.0fs): "
                    "replicas that start after that will not know it",
                    max_age,
                )

    def _close_revoked(self, token_ids: set[str]) -> int:
        """Close the sockets whose tokens were revoked; returns how many."""
        closed = 0
        subscribers: list[Connection | SseStream] = [*self.sockets.sessions(), *self.sse.streams]
        for subscriber in subscribers:
            identity = subscriber.identity
            if identity is not None and identity.token_id in token_ids:
                subscriber.close_soon(CloseReason.TOKEN_REVOKED)
                closed += 1
        return closed

    async def _recover_queue_gap(self, connection: AbstractConnection, since: float) -> None:
        """This replica's queue was lost: deliver what was routed since ``since`` from
        the shared stream into the hub (which drops what it delivered already, by id),
        before consuming the new queue and reporting ready."""
        if self.stream is None:
            log.warning(
                'no shared history to recover from ([history] backend = "stream"): what '
                "was routed to this replica's users meanwhile is lost to their open sockets"
            )
            return
        keys = self.broker.bindings.desired
        channels = [c for c in map(channel_for_routing_key, keys) if c is not None]
        missed = await self.stream.read_gap(connection, since, channels)
        now = time.time()
        delivered = sum(1 for notification in missed if self.hub.deliver(notification, now))
        log.info(
            "recovered %d notifications from the stream (%d to sockets here)",
            len(missed),
            delivered,
        )

    async def _close_sockets_in_outage(self) -> None:
        """``[amqp] close_sockets_after``: sockets on a replica cut off from RabbitMQ get
        nothing, so they are closed with 1001 and their clients resume on a replica
        that has a connection. New sockets are refused (503) until it is back."""
        limit = self.settings.amqp.close_sockets_after
        while True:
            await asyncio.sleep(OUTAGE_POLL)
            since = self.broker.disconnected_since
            if since is None or time.monotonic() - since < limit or self.draining:
                continue
            self.sockets.draining = True
            connections = list(self.sockets.connections)
            log.warning(
                "no broker connection for %.1fs: closing %d sockets with 1001 (their "
                "clients resume elsewhere) and refusing new ones until it is back",
                limit,
                len(connections),
            )
            for connection in connections:
                connection.close_soon(CloseReason.BROKER_OUTAGE)
            for stream in list(self.sse.streams):
                stream.close_soon(CloseReason.BROKER_OUTAGE)
            # Woken as the broker reports itself connected, before anyone sees it ready.
            await self.broker.connected.wait()
            if not self.draining:
                self.sockets.draining = False
            log.info("broker connection back: accepting sockets again")

    async def _replay_memory(
        self, since: ResumePoint, channels: list[Channel], before_seq: int | None
    ) -> list[Notification] | None:
        assert self.history is not None
        self.history.expire(time.time())
        return self.history.replay(since.id, channels, before_seq)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.broker.connected.is_set() and not self.draining

    async def start(self) -> None:
        """Start the replica's parts in order; :meth:`stop` undoes them in reverse.

        1. the token verifier (undone: a JWKS fetch under way cancelled and awaited)
        2. the shared history's reader (``[history] backend = "stream"``)
        3. the broker connection's supervisor task (undone: consumer cancelled,
           queue deleted, connection closed, task awaited), with the offline hook
           started on each connect (undone first: its consumer of notifyd.unrouted
           cancelled, what it had not sent on left to another replica)
        4. the hub (undone: pending binding releases dropped)
        5. the WebSocket endpoint (undone: sockets still open dropped, their
           tasks cancelled and awaited; nothing is spawned after that)
        6. the outage watcher (``[amqp] close_sockets_after``)
        7. the heartbeat
        8. the drain, undone first: readiness fails, sockets are closed with 1001

        When a step fails, the ones before it are undone before the error is raised.
        """
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.verifier.close)
            self.broker.on_connected.append(self.revocations.on_connected)
            if self.stream is not None:
                self.broker.on_connected.append(self.stream.on_connected)
                stack.push_async_callback(self.stream.close)
            self.broker.on_queue_lost.append(self._recover_queue_gap)
            self.broker.on_connected.append(self.offline.on_connected)
            self._broker_task = loop.create_task(self.broker.run(), name="notifyd-broker")
            stack.push_async_callback(self._close_broker)
            # Stops consuming notifyd.unrouted before the broker closes (what it had not
            # sent yet goes to another replica).
            stack.push_async_callback(self.offline.close)
            self.broker.on_connected.append(self.cluster.on_connected)
            self.cluster.start()
            stack.push_async_callback(self.cluster.close)  # says goodbye before the broker
            stack.callback(self.hub.close)
            stack.push_async_callback(self.sockets.close)
            stack.push_async_callback(self.sse.close)
            if self.settings.amqp.close_sockets_after:
                outage = loop.create_task(self._close_sockets_in_outage(), name="notifyd-outage")
                stack.push_async_callback(cancel_and_wait, outage)
            if self.settings.ws.heartbeat:
                heartbeat = Heartbeat(self.settings.ws.heartbeat, self.sockets.sessions)
                beating = loop.create_task(heartbeat.run(), name="notifyd-heartbeat")
                stack.push_async_callback(cancel_and_wait, beating)
                # SSE streams get a comment line instead of a ping (no pong to wait for).
                sse_heartbeat = Heartbeat(self.settings.ws.heartbeat, self.sse.streams_list)
                sse_beating = loop.create_task(sse_heartbeat.run(), name="notifyd-sse-heartbeat")
                stack.push_async_callback(cancel_and_wait, sse_beating)
            stack.push_async_callback(self.drain)
            self.metrics.draining.set(0)
            self._stack = stack.pop_all()

    async def _close_broker(self) -> None:
        try:
            await self.broker.close()
        finally:
            await cancel_and_wait(self._broker_task)

    def begin_drain(self) -> None:
        """Fail readiness and refuse new sockets; existing ones stay for now."""
        if not self.draining:
            log.info("draining: readiness now fails")
        self.draining = True
        self.sockets.draining = True
        self.metrics.draining.set(1)
        self.metrics.ready.set(0)

    async def drain(self) -> None:
        """Fail readiness, refuse new sockets, and close the open ones with 1001 spread
        over ``[server] drain_seconds``.

        The one place sockets are drained. It runs once: first in :func:`serve`'s stop
        list, while the listener still answers (503), else as the first step of
        :meth:`stop`; a later call returns at once.
        """
        if self._drained:
            return
        self._drained = True
        self.begin_drain()
        window = self.settings.server.drain_seconds
        await asyncio.gather(self.sockets.drain(window), self.sse.drain(window))

    def hurry(self) -> None:
        """Close the sockets a drain has not reached yet at once (a second signal)."""
        self.sockets.hurry()
        self.sse.hurry()

    async def stop(self) -> None:
        """Undo :meth:`start` in reverse order; a no-op when it has not started."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()


GATEWAY = web.AppKey("gateway", Gateway)
#: The metrics an app serves on /metrics (the gateway's; the Web Push worker's own).
METRICS = web.AppKey("metrics", Metrics)


# --- HTTP handlers --------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    ready = gateway.ready
    gateway.metrics.ready.set(1 if ready else 0)
    body = {
        "ready": ready,
        "broker": gateway.broker.connected.is_set(),
        "draining": gateway.draining,
    }
    return web.json_response(body, status=200 if ready else 503)


#: ``notifyd_gc_tracked_objects``, counted at most once per GC_TRACKED_MAX_AGE (the
#: count is the process's, whichever registry shows it).
_TRACKED = gcpolicy.TrackedObjects()


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if GATEWAY in request.app:
        metrics.ready.set(1 if request.app[GATEWAY].ready else 0)
    metrics.gc_tracked.set(_TRACKED())
    response = web.Response(body=generate_latest(metrics.registry))
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def _publish_from_http(request: web.Request) -> web.Response:
    """Validate an HTTP publish body and send it through RabbitMQ."""
    gateway = request.app[GATEWAY]
    try:
        body = loads(await request.read())
    except ValueError:
        return json_error(400, "bad_json", "body must be JSON")
    if not isinstance(body, dict):
        return json_error(400, "bad_body", "body must be a JSON object")
    try:
        channel = parse_channel(body.get("channel"))
    except ProtocolError as exc:
        return json_error(400, exc.code, exc.message)
    event = body.get("event")
    if event is not None and not valid_event(event):
        return json_error(400, "bad_body", "'event' must be a short name")
    if "data" not in body:
        return json_error(400, "bad_body", "'data' is required")
    message_id = body.get("id")
    if message_id is not None and (
        not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_ID_LENGTH
    ):
        return json_error(400, "bad_body", "'id' must be a string of 1..128 characters")
    try:
        notification_id = await gateway.broker.publish(
            channel, event, body["data"], message_id=message_id
        )
    except ProtocolError as exc:
        # What the replicas would dead-letter is refused here, not answered 202.
        return json_error(413 if exc.code == "too_big" else 400, exc.code, exc.message)
    except BrokerUnavailable as exc:
        return json_error(503, "broker_unavailable", str(exc))
    return web.json_response({"id": notification_id}, status=202)


async def api_publish(request: web.Request) -> web.Response:
    keys = request.app[GATEWAY].settings.api.service_keys
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if not keys:
        return json_error(403, "disabled", "no [api] service_keys are configured")
    if scheme.lower() != "bearer" or not any(
        hmac.compare_digest(key.strip().encode(), k.encode()) for k in keys
    ):
        return json_error(401, "unauthorized", "a valid service key is required")
    return await _publish_from_http(request)


async def client_js(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        STATIC_DIR / "notifyd.js", headers={"Content-Type": "text/javascript; charset=utf-8"}
    )


async def demo_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "demo.html")


async def demo_token(request: web.Request) -> web.Response:
    """Dev only: mint a token for whoever asks (the demo is never for production)."""
    auth = request.app[GATEWAY].settings.auth
    if not auth.secret or not auth.algorithms[0].startswith("HS"):
        return json_error(400, "unsupported", "the demo mints HS* tokens; set [auth] secret")
    try:
        body = loads(await request.read() or b"{}")
    except ValueError:
        return json_error(400, "bad_json", "body must be JSON")
    if not isinstance(body, dict):
        return json_error(400, "bad_body", "body must be a JSON object")
    user = body.get("user")
    topics = body.get("topics") or []
    publish = body.get("publish") or []
    ttl = body.get("ttl", 3600)
    if not valid_name(user):
        return json_error(400, "bad_body", "'user' must be a valid user id")
    names = [*topics, *publish]
    if (
        not isinstance(topics, list)
        or not isinstance(publish, list)
        or not all(isinstance(t, str) and valid_name(t.removesuffix(".*")) for t in names)
    ):
        return json_error(400, "bad_body", "'topics' and 'publish' must be lists of topic names")
    # Users whose presence:<id> the demo may watch (the token's `presence` claim).
    presence = body.get("presence") or []
    if not isinstance(presence, list) or not all(valid_name(u) for u in presence):
        return json_error(400, "bad_body", "'presence' must be a list of user ids")
    if not isinstance(ttl, int) or not 10 <= ttl <= 86_400:
        return json_error(400, "bad_body", "'ttl' must be 10..86400 seconds")
    claims = {"presence": presence} if presence else {}
    token = mint_token(
        auth.secret, user, ttl, topics, publish, algorithm=auth.algorithms[0], **claims
    )
    return web.json_response({"token": token, "expires_at": int(time.time()) + ttl})


async def demo_presence(request: web.Request) -> web.Response:
    """Dev only: who of ``?user=`` is online now, for the demo's badges until the first
    transition (``/api/presence`` without its service key; the demo is never for
    production)."""
    users = list(dict.fromkeys(request.query.getall("user", [])))
    if not 0 < len(users) <= 20 or not all(valid_name(u) for u in users):
        return json_error(400, "bad_query", "name 1..20 valid user ids: ?user=a&user=b")
    try:
        merged, _ = await request.app[GATEWAY].cluster.presence(users)
    except BrokerUnavailable as exc:
        return json_error(503, "broker_unavailable", str(exc))
    return web.json_response({"users": merged})


async def index(request: web.Request) -> web.Response:
    if request.app[GATEWAY].settings.demo.enabled:
        raise web.HTTPFound("/demo")
    return web.json_response({"service": "notifyd", "websocket": "/ws"})


def create_app(settings: Settings, replica_id: str | None = None) -> web.Application:
    """The aiohttp application; its cleanup context owns the gateway's lifecycle."""
    # Before anything is served: aiohttp's reports of malformed requests quote them.
    redact.install()
    app = web.Application(client_max_size=settings.api.max_body_size)
    gateway = Gateway(settings, replica_id)
    app[GATEWAY] = gateway
    app[METRICS] = gateway.metrics
    # Started with the app and stopped (drain first) once aiohttp has closed the listener
    # and its own handlers; serve() drains earlier, while the listener still answers.
    app.cleanup_ctx.append(gateway.lifespan)
    app.router.add_get("/", index)
    # The bound method itself: a wrapper would be one more frame kept per open socket.
    app.router.add_get("/ws", gateway.sockets.handle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_post("/api/publish", api_publish)
    app.router.add_get("/client/notifyd.js", client_js)
    if settings.sse.enabled:
        # GET /sse, POST /api/sse-ticket, POST /api/messages (and their CORS preflights).
        gateway.sse.add_routes(app)
    # Web Push subscriptions (/api/push/*), when [webpush] vapid_private_key is set.
    add_push_routes(app, settings, gateway.verifier, gateway.metrics)
    # GET /api/history; the sockets' history message reads through the same object.
    add_history_routes(app, gateway)
    # /api/presence, /api/stats, /api/disconnect, /api/revoke (service key).
    AdminApi(
        gateway.cluster, settings.api.service_keys, settings.auth.revocation_max_age
    ).add_routes(app)
    if settings.demo.enabled:
        app.router.add_get("/demo", demo_page)
        app.router.add_post("/demo/token", demo_token)
        app.router.add_post("/demo/publish", _publish_from_http)
        app.router.add_get("/demo/presence", demo_presence)
        app.router.add_static("/demo/", STATIC_DIR)
    return app


def metrics_app(metrics: Metrics) -> web.Application:
    """/metrics alone (``[server] metrics_port``), serving ``metrics``."""
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_endpoint)
    return app


class AccessLogger(AbstractAccessLogger):
    """Access log without query strings: ``?token=`` must never reach a log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %.3fs',
            request.remote,
            request.method,
            request.path,
            response.status,
            time,
        )


def runner_options(settings: Settings, metrics: Metrics) -> dict[str, Any]:
    """Options for every aiohttp runner that serves the app (also used by the tests):
    the access log without query strings, the request handlers' logger counting
    malformed requests in ``metrics``, and the settings' handshake timeout.

    aiohttp's keep-alive timeout also runs from the moment a connection opens until
    its first request is whole: as the handshake timeout it cuts off clients that
    never send a request, or dribble its header lines.
    """
    return {
        "access_log_class": AccessLogger,
        "logger": redact.server_log(metrics),
        "keepalive_timeout": settings.server.handshake_timeout,
    }


#: Pending-connection queue of the listening socket (capped by net.core.somaxconn).
LISTEN_BACKLOG = 4096


# --- running a process ---------------------------------------------------------------


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _listen(site: web.TCPSite, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:  # taken, not permitted, or a host name that does not resolve
        # asyncio's message repeats the address: the errno's own text says it all
        # (a resolver error has a negative one and its text in strerror).
        if exc.errno is not None and exc.errno > 0:
            reason = os.strerror(exc.errno)
        else:
            reason = exc.strerror or str(exc)
        raise ServeError(f"cannot listen on {_address(host, port)}: {reason}") from None


def raise_open_files_limit(max_connections: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the limit in force.

    Every socket is a file descriptor: a shell's usual soft limit of 1024 would cap a
    replica at ~1,000 sockets whatever ``max_connections`` says, and only the hard
    limit needs privileges to raise.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover (Windows)
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    # An unlimited hard limit (macOS) cannot be the soft one: a file count needs a number.
    target = hard if hard != unlimited else 1_048_576
    raised = ""
    if soft != unlimited and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
        else:
            raised, soft = f" (raised from {soft})", target
    if soft != unlimited and soft < max_connections:
        log.warning(
            "open files limit: %d%s, below [server] max_connections (%d): raise the hard "
            "limit (ulimit -Hn, LimitNOFILE=) to hold that many sockets",
            soft,
            raised,
            max_connections,
        )
    else:
        log.info("open files limit: %s%s", "unlimited" if soft == unlimited else soft, raised)
    return soft


#: The signals that stop a replica: the first one drains, a second one hurries the drain.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopSignals:
    """SIGTERM/SIGINT while serving: the first one stops, a later one hurries."""

    def __init__(self, hurry: Callable[[], None]) -> None:
        self.stop = asyncio.Event()
        self._hurry = hurry

    def received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.stop.is_set():
            log.info("%s: shutting down", name)
            self.stop.set()
        else:
            log.warning("%s again: closing the remaining sockets now", name)
            self._hurry()


def _restore_signal(loop: asyncio.AbstractEventLoop, signum: int, handler: Any) -> None:
    """Give ``signum`` back to the handler it had before serve() (asyncio.run's own
    SIGINT handler, say)."""
    loop.remove_signal_handler(signum)
    if handler is not None:
        signal.signal(signum, handler)


async def _start_runner(
    stack: contextlib.AsyncExitStack,
    runner: web.AppRunner,
    host: str,
    port: int,
    sockets: SocketServer | None = None,
    **site_options: Any,
) -> None:
    """Set ``runner`` up and listen on ``host:port``; its cleanup (listener closed,
    handlers awaited, the app's cleanup context) goes onto ``stack``. With
    ``sockets``, new connections' requests are paced by it from the first one."""
    stack.push_async_callback(runner.cleanup)
    await runner.setup()
    if sockets is not None:
        assert runner.server is not None
        sockets.pace_requests(runner.server)
    await _listen(web.TCPSite(runner, host, port, **site_options), host, port)


async def serve(
    settings: Settings, replica_id: str | None = None, reuse_port: bool = False
) -> None:
    """Run one replica until SIGTERM/SIGINT, then shut down in order.

    Start-up, each step's undoing pushed onto one exit stack:

    1. SIGTERM/SIGINT handlers (a signal during start-up stops it once started;
       undone: the handlers found before are back)
    2. the metrics listener, if ``[server] metrics_port`` (its own runner)
    3. the app's runner, which starts the :class:`Gateway`, then its listener
    4. the drain (:meth:`Gateway.drain`), so that it runs while the listener still
       answers: readiness fails and new sockets get 503 while the open ones close
    5. the collector policy and its task (:mod:`notifyd.gcpolicy`)

    Then it waits for a signal and unwinds the stack: collector task cancelled and
    awaited and the collector as it was; drain; listener closed, aiohttp's handlers
    awaited, gateway stopped; metrics listener closed; signal handlers removed. A
    failure midway through start-up unwinds whatever had started before it is
    raised. The stop is bounded by ``[server] shutdown_timeout``: past it, the step
    under way is cut short and the ones after it still run.
    """
    server = settings.server
    loop = asyncio.get_running_loop()
    raise_open_files_limit(server.max_connections)
    app = create_app(settings, replica_id)
    gateway = app[GATEWAY]
    signals = _StopSignals(gateway.hurry)
    site_options: dict[str, Any] = {"reuse_port": reuse_port or None}
    async with contextlib.AsyncExitStack() as stack:
        for signum in STOP_SIGNALS:
            stack.callback(_restore_signal, loop, signum, signal.getsignal(signum))
            loop.add_signal_handler(signum, signals.received, signum)
        if server.metrics_port:
            metrics_runner = web.AppRunner(
                metrics_app(gateway.metrics),
                handle_signals=False,
                **runner_options(settings, gateway.metrics),
            )
            await _start_runner(
                stack, metrics_runner, server.host, server.metrics_port, **site_options
            )
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=server.shutdown_timeout,
            **runner_options(settings, gateway.metrics),
        )
        # A reconnect storm opens thousands of sockets at once: with aiohttp's default
        # backlog of 128 the kernel drops SYNs and clients stall for a 1 s retransmit.
        await _start_runner(
            stack,
            runner,
            server.host,
            server.port,
            gateway.sockets,
            backlog=LISTEN_BACKLOG,
            **site_options,
        )
        # Connections aiohttp still holds: requests in progress, keep-alive, and clients
        # that have not finished their request yet (cut off after handshake_timeout).
        http_server = runner.server
        assert http_server is not None
        http_connections = gateway.metrics.http_connections
        http_connections.set_function(lambda: len(http_server.connections))
        stack.callback(http_connections.set_function, lambda: 0)
        stack.push_async_callback(gateway.drain)
        # What start-up allocated lives as long as the process, and so, nearly, do the
        # sockets: both are kept out of the cycle collector's scans (notifyd.gcpolicy).
        # Undone before the drain: closing every socket is the churn the policy answers
        # with a full collection, no use pausing the drain for it.
        stack.enter_context(gcpolicy.installed())
        collector = loop.create_task(
            gcpolicy.run(lambda: gateway.sockets.admissions, gateway.metrics),
            name="notifyd-gc",
        )
        stack.push_async_callback(cancel_and_wait, collector)
        log.info(
            "notifyd listening on http://%s:%d (ws /ws, metrics %s)",
            server.host,
            server.port,
            f":{server.metrics_port}/metrics" if server.metrics_port else "/metrics",
        )
        await signals.stop.wait()
        started = time.monotonic()
        try:
            async with asyncio.timeout(server.shutdown_timeout):
                await stack.aclose()
        except TimeoutError:
            log.error("shutdown took longer than %.0fs; exiting anyway", server.shutdown_timeout)
    log.info("stopped in %.1fs", time.monotonic() - started)


def install_uvloop() -> None:
    """Use uvloop when it is installed (the ``speedups`` extra)."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


def run_worker(settings: Settings, replica_id: str | None, reuse_port: bool) -> None:
    install_uvloop()
    asyncio.run(serve(settings, replica_id, reuse_port))


def run(settings: Settings) -> None:
    """Run ``[server] workers`` processes sharing the port (SO_REUSEPORT)."""
    workers = settings.server.workers
    if workers == 1:
        run_worker(settings, None, reuse_port=False)
        return
    base = settings.amqp.replica_id or default_replica_id()
    context = multiprocessing.get_context("spawn")
    processes: list[Any] = []

    def forward(signum: int, _: Any) -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    # Forwarding before the first worker starts: no signal may end the parent alone.
    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        for index in range(workers):
            worker_settings = settings
            if settings.server.metrics_port:
                worker_settings = settings.replace(
                    "server", metrics_port=settings.server.metrics_port + index
                )
            process = context.Process(
                target=_worker_main,
                args=(worker_settings, f"{base}-w{index}", logging.getLogger().level),
                name=f"notifyd-worker-{index}",
            )
            process.start()
            processes.append(process)
        for process in processes:
            process.join()
    finally:
        for process in processes:  # on any failure here, no worker outlives the parent
            if process.is_alive():
                process.terminate()
                process.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    failed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode]
    if failed:
        raise ServeError(f"{', '.join(failed)}: see the log above")


def _worker_main(settings: Settings, replica_id: str, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Out of the terminal's process group: a Ctrl-C reaches the workers once, forwarded
    # by the parent, not twice (a second signal would hurry the drain).
    os.setpgid(0, 0)
    try:
        run_worker(settings, replica_id, reuse_port=True)
    except ServeError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
