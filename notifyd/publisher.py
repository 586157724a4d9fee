"""A small publisher for backend services: ``await publisher.publish(user="42", data=...)``.

Uses publisher confirms: :meth:`Publisher.publish` returns only once RabbitMQ has
taken the message (and raises if it did not), so a backend knows what it sent.
Any AMQP client can do the same; see the README for the message format.

Light to import into a backend service: aio-pika and notifyd's pure modules only
(no aiohttp server, no JWT library, no metrics registered in the service's registry).
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from pamqp.commands import Basic

from .amqp import EXCHANGE, EXCHANGES, notification_message
from .errors import ProtocolError, PublishError
from .protocol import BROADCAST, Channel, IdGenerator, valid_event


async def declare_topology(channel: AbstractChannel) -> None:
    """Declare the shared, durable exchanges every replica and publisher relies on
    (:data:`notifyd.amqp.EXCHANGES`; idempotent). Raises aio-pika's errors.

    Queues with arguments (``notifyd.dead``, the streams) are declared by the
    replicas only: a publisher that declared them with other arguments would be
    refused by RabbitMQ.
    """
    for name, kind in EXCHANGES:
        await channel.declare_exchange(name, kind, durable=True)


def target_channel(
    user: str | None = None, topic: str | None = None, broadcast: bool = False
) -> Channel:
    """The channel named by exactly one of ``user``, ``topic`` or ``broadcast``.

    Raises ValueError when not exactly one is given or the name is not valid.
    """
    if sum((user is not None, topic is not None, broadcast)) != 1:
        raise ValueError("name exactly one of user=, topic= or broadcast=True")
    if user is not None:
        return Channel.user(user)
    if topic is not None:
        return Channel.topic(topic)
    return BROADCAST


class Publisher:
    """Publishes notifications to the ``notifyd`` exchange with confirms."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._ids = IdGenerator()

    async def connect(self) -> Publisher:
        """Connect (reconnecting by itself later) and declare the exchanges; returns self.

        Raises aio-pika's connection errors when RabbitMQ cannot be reached.
        """
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": "notifyd publisher"}
        )
        channel = await self._connection.channel(publisher_confirms=True)
        await declare_topology(channel)
        self._exchange = await channel.get_exchange(EXCHANGE)
        return self

    async def close(self) -> None:
        """Close the connection (nothing happens if it is not open)."""
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
            self._exchange = None

    async def __aenter__(self) -> Publisher:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(
        self,
        data: Any,
        *,
        user: str | None = None,
        topic: str | None = None,
        broadcast: bool = False,
        event: str | None = None,
        message_id: str | None = None,
        ttl: float | None = None,
        receipt: bool = False,
    ) -> str:
        """Publish one notification; returns its id once RabbitMQ confirmed it.

        To exactly one of ``user``, ``topic`` or ``broadcast``; ``ttl`` in seconds
        (replicas drop it once older); ``receipt`` asks every replica holding the
        channel for a receipt on ``notifyd.receipts``. Raises ValueError for a bad
        channel, event or ``data`` (nested too deeply to write), RuntimeError before
        :meth:`connect`, :class:`PublishError` when RabbitMQ does not confirm it.
        """
        if self._exchange is None:
            raise RuntimeError("call connect() first (or use 'async with Publisher(url)')")
        channel = target_channel(user, topic, broadcast)
        if event is not None and not valid_event(event):
            raise ValueError(f"invalid event name {event!r}")
        now = time.time()
        notification_id = message_id or self._ids.new(int(now * 1000))
        try:
            message = notification_message(
                data, message_id=notification_id, now=now, event=event, ttl=ttl, receipt=receipt
            )
        except ProtocolError as exc:
            raise ValueError(exc.message) from None
        # Not mandatory: a notification for a user who is not online is dropped by
        # RabbitMQ, which is not an error (a receipt can report it).
        confirmation = await self._exchange.publish(message, channel.routing_key, mandatory=False)
        if not isinstance(confirmation, Basic.Ack):
            raise PublishError(f"RabbitMQ did not confirm {notification_id}")
        return notification_id
