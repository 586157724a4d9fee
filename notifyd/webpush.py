"""``notifyd webpush``: notifications for offline users, delivered as Web Push messages.

The gateway sends a ``user.<id>`` notification that no replica holds to the durable
topic exchange ``notifyd.offline`` (queue ``notifyd.offline``). This worker consumes
that queue, looks up the user's push subscriptions (:mod:`notifyd.pushstore`) and
posts the notification to each one's push service (RFC 8030), encrypted for the
browser (RFC 8291) and signed with the VAPID key (RFC 8292) — see :mod:`notifyd.vapid`.

Per subscription: 2xx is delivered; 404/410 means the subscription is gone, and it is
deleted; 429, 5xx, timeouts and network errors are retried with capped exponential
backoff and jitter (``Retry-After`` honoured) up to ``[webpush] max_attempts``; any
other 4xx is final. A notification that some subscription could not take is then
dead-lettered once to ``notifyd.dlx`` (reason ``webpush_failed``), and the message
is acknowledged only after that: a crash re-delivers it rather than losing it.

The payload is the WebSocket ``notification`` message itself (``{type, id, channel,
event, data, ts}``); when it is larger than a push message can carry, ``data`` is left
out and ``truncated: true`` added, for the page to fetch it (e.g. from history).

Sending is fully asynchronous on one aiohttp session (no thread pool): pywebpush has
an async path, but it imports ``requests`` for its sync one, reads whole response
bodies without a bound and follows redirects; the request itself is a few lines on top
of ``http_ece`` (which pywebpush uses too) and PyJWT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import aiormq
from aio_pika.abc import AbstractConnection, AbstractExchange
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage

from .amqp import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    OFFLINE_EXCHANGE,
    OFFLINE_QUEUE,
    Delivery,
    dead_letter_message,
)
from .broker import (
    CONNECT_TIMEOUT,
    dead_letter_arguments,
    declare_queue,
    default_replica_id,
    offline_queue_arguments,
    open_connection,
    scratch_channel,
)
from .config import Settings, WebPushSettings, redact_url
from .errors import BrokerUnavailable, ConfigError, InvalidMessage
from .metrics import Metrics, process_registry
from .protocol import IdGenerator, Notification, dumps, loads
from .publisher import declare_topology
from .push_api import endpoint_allowed
from .pushstore import PushStore, Subscription, open_until_done
from .vapid import MAX_PLAINTEXT, Vapid, encrypt, load_private_key

log = logging.getLogger(__name__)

#: Dead-letter reason for a notification some subscription could not take.
FAILED_REASON = "webpush_failed"
#: Seconds in-flight deliveries get to finish on shutdown before they are cancelled
#: (their messages are then redelivered: at least once, never lost).
STOP_GRACE = 10.0
#: Bytes of a push service's error answer kept for the log and the dead letter.
_DETAIL_BYTES = 200


def frame_payload(frame: bytes) -> bytes:
    """The JSON text inside a server->client WebSocket text frame (no mask)."""
    length = frame[1] & 0x7F
    return frame[2 + {126: 2, 127: 8}.get(length, 0) :]


def push_payload(notification: Notification) -> tuple[bytes, bool]:
    """What the service worker receives, and whether ``data`` had to be left out."""
    payload = frame_payload(notification.frame)
    if len(payload) <= MAX_PLAINTEXT:
        return payload, False
    message = loads(payload)
    message.pop("data", None)
    message["truncated"] = True
    return dumps(message), True


def backoff(attempt: int, settings: WebPushSettings, retry_after: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: doubling, capped, half of it random."""
    ceiling = min(settings.retry_max, settings.retry_min * 2 ** (attempt - 1))
    delay: float = ceiling / 2 + random.random() * ceiling / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.retry_max))
    return delay


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the HTTP-date form is rare here: ignored)."""
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


class PushSender:
    """One request to a push service: encrypt, sign, post, classify the answer."""

    def __init__(
        self,
        settings: WebPushSettings,
        vapid: Vapid,
        http: aiohttp.ClientSession,
        metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.vapid = vapid
        self.http = http
        self.timeout = aiohttp.ClientTimeout(total=settings.request_timeout)

    async def send(
        self, subscription: Subscription, payload: bytes, ttl: int
    ) -> tuple[str, float | None, str]:
        """``(outcome, retry_after, detail)``; outcome is ok, gone, retry or rejected."""
        started = time.monotonic()
        endpoint = subscription.endpoint
        refused = endpoint_allowed(endpoint, self.settings)
        if refused is not None:
            # Stored before [webpush] endpoint_hosts changed, or by something else.
            return "rejected", None, refused
        headers = {
            "Authorization": self.vapid.authorization(endpoint),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(ttl),
            "Urgency": self.settings.urgency,
        }
        try:
            body = encrypt(payload, subscription.p256dh, subscription.auth)
            # Never redirected: the endpoint was checked against endpoint_hosts, a
            # Location header was not.
            async with self.http.post(
                endpoint, data=body, headers=headers, allow_redirects=False, timeout=self.timeout
            ) as response:
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
                answer = await response.content.read(_DETAIL_BYTES)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return "retry", None, f"{type(exc).__name__} posting to {_host(endpoint)}"
        except ValueError as exc:  # keys that do not decode (stored before a check)
            return "rejected", None, f"cannot encrypt for this subscription: {exc}"
        finally:
            self.metrics.webpush_send_latency.observe(time.monotonic() - started)
        detail = f"HTTP {status} from {_host(endpoint)}"
        text = answer.decode("utf-8", "replace").strip()
        if text:
            detail += f": {text[:_DETAIL_BYTES]}"
        if 200 <= status < 300:
            return "ok", None, detail
        if status in (404, 410):
            return "gone", None, detail
        if status == 429 or status >= 500:
            return "retry", retry_after, detail
        return "rejected", None, detail


def _host(endpoint: str) -> str:
    return urlsplit(endpoint).hostname or "?"


class WebPushWorker:
    """Consumes ``notifyd.offline`` until :meth:`stop`; reconnects when the broker goes."""

    def __init__(
        self,
        settings: Settings,
        store: PushStore | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        webpush = settings.webpush
        if not webpush.vapid_subject:
            raise ConfigError(
                "[webpush] vapid_subject: required (mailto:you@example.com): push services "
                "refuse or throttle messages without a contact"
            )
        self.settings = settings
        #: The worker's metrics, served on its own ``[server] metrics_port``.
        self.metrics = metrics if metrics is not None else Metrics()
        self.webpush = webpush
        self.vapid = Vapid(load_private_key(webpush.vapid_private_key), webpush.vapid_subject)
        self.store = store
        self._own_store = store is None
        self.sleep = sleep
        self.ids = IdGenerator()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(webpush.concurrency)
        self._sender: PushSender | None = None
        self._dead_letters: AbstractExchange | None = None
        self._channel: RawChannel | None = None
        #: Names this worker in the dead letters it publishes (header notifyd-replica).
        self.worker_id = f"webpush-{default_replica_id()}"

    def stop(self) -> None:
        self._stopping.set()

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Open the store, then consume, reconnecting with backoff, until stopped."""
        if self.store is None:
            self.store = await open_until_done(
                self.webpush.database_url,
                self.webpush.max_subscriptions_per_user,
                self._stopping,
            )
            if self.store is None:
                return
        connector = aiohttp.TCPConnector(limit=self.webpush.concurrency)
        try:
            async with aiohttp.ClientSession(connector=connector) as http:
                self._sender = PushSender(self.webpush, self.vapid, http, self.metrics)
                await self._supervise()
        finally:
            if self._own_store:
                await self.store.close()

    async def _supervise(self) -> None:
        amqp = self.settings.amqp
        urls = amqp.node_urls
        failures = 0
        while not self._stopping.is_set():
            url = urls[failures % len(urls)]
            try:
                connection = await open_connection(url)
            except (OSError, aiormq.AMQPError, TimeoutError, RuntimeError) as exc:
                failures += 1
                delay = min(amqp.reconnect_max, amqp.reconnect_min * 2 ** (failures // len(urls)))
                log.warning(
                    "cannot reach RabbitMQ at %s (%s); retrying in %.1fs",
                    redact_url(url),
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), random.uniform(0, delay))
                continue
            failures = 0
            try:
                await self._consume(connection)
            except (aiormq.AMQPError, ConnectionError, RuntimeError) as exc:
                log.warning("lost RabbitMQ (%s): reconnecting", exc)
            finally:
                self.ready.clear()
                with contextlib.suppress(Exception):
                    await connection.close()

    async def declare(self, connection: AbstractConnection) -> None:
        """notifyd.offline (exchange, queue, binding ``#``) and the dead-letter path."""
        async with scratch_channel(connection) as channel:
            await declare_topology(channel)
            await channel.declare_exchange(
                OFFLINE_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
        amqp = self.settings.amqp
        # As the gateway's offline hook declares it (notifyd.offline.declare_offline), which
        # does so even with no worker running; declare_queue keeps a queue that exists
        # with other arguments instead of failing.
        refused = await declare_queue(connection, OFFLINE_QUEUE, offline_queue_arguments(amqp))
        if refused:
            log.info("queue %s exists with other arguments: used as it is", OFFLINE_QUEUE)
        with contextlib.suppress(aiormq.AMQPError, TimeoutError):
            await asyncio.wait_for(
                declare_queue(
                    connection, DEAD_LETTER_QUEUE, dead_letter_arguments(amqp), DEAD_LETTER_EXCHANGE
                ),
                CONNECT_TIMEOUT,
            )
        async with scratch_channel(connection) as channel:
            queue = await channel.get_queue(OFFLINE_QUEUE, ensure=False)
            await queue.bind(OFFLINE_EXCHANGE, "#")

    async def _consume(self, connection: AbstractConnection) -> None:
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        await self.declare(connection)
        publisher = await connection.channel(publisher_confirms=True)
        self._dead_letters = await publisher.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.webpush.concurrency)
        # aiormq's deliveries, read once into the contract's Delivery (as the Broker does).
        raw = await channel.get_underlay_channel()
        self._channel = raw
        # A channel closed by the broker (e.g. a queue deleted) ends this connection's
        # turn too: reconnecting declares everything again.
        for opened in (publisher, channel):
            opened.close_callbacks.add(lambda *_: lost.set())
        # So does RabbitMQ cancelling the consumer (the queue deleted under it).
        raw.on_consumer_cancel_callbacks.add(lambda *_: lost.set())
        consumer = await raw.basic_consume(OFFLINE_QUEUE, self._on_delivery)
        self.ready.set()
        log.info("consuming %s: Web Push to offline users", OFFLINE_QUEUE)
        stop = asyncio.ensure_future(self._stopping.wait())
        gone = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait([stop, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            gone.cancel()
        self.ready.clear()
        if self._stopping.is_set():
            with contextlib.suppress(Exception):
                await raw.basic_cancel(consumer.consumer_tag or "")
            if self._tasks:
                log.info("waiting for %d deliveries in progress", len(self._tasks))
                await asyncio.wait(list(self._tasks), timeout=STOP_GRACE)
        # What is still running cannot be acknowledged any more: RabbitMQ redelivers it.
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self._channel = None
        if not self._stopping.is_set():
            raise ConnectionError("connection or channel closed")

    # --- one message ------------------------------------------------------------------

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        delivery = Delivery.of(message)
        task = asyncio.get_running_loop().create_task(self._handle_safely(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ack(self, delivery: Delivery, requeue: bool | None = None) -> None:
        """Acknowledge (or, with ``requeue``, reject) on the channel it came on."""
        channel = self._channel
        if channel is None or channel.is_closed:
            return  # redelivered after the reconnect
        if requeue is None:
            await channel.basic_ack(delivery.tag)
        else:
            await channel.basic_reject(delivery.tag, requeue=requeue)

    async def _handle_safely(self, delivery: Delivery) -> None:
        self.metrics.webpush_in_flight.inc()
        try:
            await self.handle(delivery)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Not acknowledged: redelivered later (after a pause, not in a hot loop).
            log.exception("delivering message id=%r failed; it is requeued", delivery.message_id)
            await self.sleep(self.webpush.retry_max)
            with contextlib.suppress(Exception):
                await self._ack(delivery, requeue=True)
        finally:
            self.metrics.webpush_in_flight.dec()

    async def handle(self, delivery: Delivery) -> None:
        """Deliver one notification to every subscription of its user, then ack."""
        now = time.time()
        try:
            notification = delivery.notification(
                ids=self.ids, max_body_size=self.settings.amqp.max_body_size, now=now
            )
            if notification.channel.kind != "user":
                raise InvalidMessage("bad_key", "only user.<id> notifications are pushed")
        except InvalidMessage as exc:
            self.metrics.webpush_messages.labels("invalid").inc()
            await self._dead_letter(delivery, exc.reason, str(exc))
            await self._ack(delivery)
            return
        if notification.expires_at is not None and notification.expires_at <= now:
            self.metrics.webpush_messages.labels("expired").inc()
            await self._ack(delivery)
            return
        assert self.store is not None
        subscriptions = await self.store.for_user(notification.channel.name)
        if not subscriptions:
            self.metrics.webpush_messages.labels("no_subscription").inc()
            await self._ack(delivery)
            return
        payload, truncated = push_payload(notification)
        if truncated:
            self.metrics.webpush_truncated.inc()
        results = await asyncio.gather(
            *(self.deliver(s, payload, notification.expires_at) for s in subscriptions)
        )
        failures = [detail for detail in results if detail is not None]
        if failures:
            self.metrics.webpush_messages.labels("dead_lettered").inc()
            detail = f"{len(failures)} of {len(subscriptions)} subscriptions failed: {failures[0]}"
            log.warning("dead-lettering message id=%r: %s", delivery.message_id, detail)
            await self._dead_letter(delivery, FAILED_REASON, detail)
        else:
            self.metrics.webpush_messages.labels("delivered").inc()
        await self._ack(delivery)

    async def deliver(
        self, subscription: Subscription, payload: bytes, expires_at: float | None
    ) -> str | None:
        """Send to one subscription, retrying; None when done with it, else why not."""
        assert self._sender is not None and self.store is not None
        attempts = self.webpush.max_attempts
        for attempt in range(1, attempts + 1):
            ttl = self.webpush.ttl
            if expires_at is not None:
                left = int(expires_at - time.time())
                if left <= 0:
                    return None  # expired while retrying: nobody wants it any more
                ttl = min(ttl, left)
            async with self._limit:
                outcome, retry_after, detail = await self._sender.send(subscription, payload, ttl)
            self.metrics.webpush_sent.labels(outcome).inc()
            if outcome == "ok":
                return None
            if outcome == "gone":
                await self.store.expire(subscription)
                log.info("push subscription gone (%s): deleted", detail)
                return None
            if outcome == "rejected":
                return detail
            if attempt < attempts:
                await self.sleep(backoff(attempt, self.webpush, retry_after))
        return f"{detail} (after {attempts} attempts)"

    async def _dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Publish ``delivery`` to notifyd.dlx with why (confirmed before the ack)."""
        self.metrics.dead_lettered.labels(reason).inc()
        message = dead_letter_message(delivery, reason, detail[:500], self.worker_id, time.time())
        if self._dead_letters is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        await self._dead_letters.publish(message, delivery.routing_key)


async def serve_worker(settings: Settings) -> None:
    """Run the worker until SIGTERM/SIGINT (``notifyd webpush``)."""
    import signal

    worker = WebPushWorker(settings, metrics=Metrics(process_registry()))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    runner = None
    if settings.server.metrics_port:
        from aiohttp import web

        from .app import metrics_app

        app = metrics_app(worker.metrics)
        app.router.add_get("/healthz", _healthz)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, settings.server.host, settings.server.metrics_port).start()
        log.info(
            "metrics on http://%s:%d/metrics", settings.server.host, settings.server.metrics_port
        )
    try:
        await worker.run()
    finally:
        if runner is not None:
            await runner.cleanup()
    log.info("stopped")


async def _healthz(request: Any) -> Any:
    """Liveness of the worker process (as the gateway's, never about the broker)."""
    from aiohttp import web

    return web.json_response({"status": "ok"})
