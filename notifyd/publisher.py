"""A small publisher for backend services: ``await publisher.publish(user="42", data=...)``.

Uses publisher confirms: :meth:`Publisher.publish` returns only once RabbitMQ has
taken the message (and raises if it did not), so a backend knows what it sent.
Any AMQP client can do the same; see the README for the message format.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import aio_pika
from pamqp.commands import Basic

from .broker import EXCHANGE, declare_topology
from .errors import PublishError
from .protocol import (
    BROADCAST,
    PUBLISHED_AT_HEADER,
    RECEIPT_HEADER,
    Channel,
    IdGenerator,
    dumps,
    valid_event,
    valid_name,
)


def target_channel(
    user: str | None = None, topic: str | None = None, broadcast: bool = False
) -> Channel:
    """The channel named by exactly one of ``user``, ``topic`` or ``broadcast``."""
    if sum((user is not None, topic is not None, broadcast)) != 1:
        raise ValueError("name exactly one of user=, topic= or broadcast=True")
    if broadcast:
        return BROADCAST
    kind, name = ("user", user) if user is not None else ("topic", topic)
    if not valid_name(name):
        raise ValueError(f"invalid {kind} name {name!r}: no '*', '#', spaces; at most 128 chars")
    assert name is not None
    return Channel(kind, name)  # type: ignore[arg-type]


class Publisher:
    """Publishes notifications to the ``notifyd`` exchange with confirms."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: Any = None
        self._exchange: Any = None
        self._ids = IdGenerator()

    async def connect(self) -> Publisher:
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": "notifyd publisher"}
        )
        channel = await self._connection.channel(publisher_confirms=True)
        await declare_topology(channel)
        self._exchange = await channel.get_exchange(EXCHANGE)
        return self

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

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
        """Publish one notification; returns its id once RabbitMQ confirmed it."""
        if self._exchange is None:
            raise RuntimeError("call connect() first (or use 'async with Publisher(url)')")
        channel = target_channel(user, topic, broadcast)
        if event is not None and not valid_event(event):
            raise ValueError(f"invalid event name {event!r}")
        body: dict[str, Any] = {"data": data}
        if event is not None:
            body["event"] = event
        now = time.time()
        notification_id = message_id or self._ids.new(int(now * 1000))
        headers: dict[str, Any] = {PUBLISHED_AT_HEADER: int(now * 1000)}
        if receipt:
            headers[RECEIPT_HEADER] = True
        message = aio_pika.Message(
            dumps(body),
            message_id=notification_id,
            content_type="application/json",
            timestamp=now,
            headers=headers,
            expiration=ttl,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # Not mandatory: a notification for a user who is not online is dropped by
        # RabbitMQ, which is not an error (a receipt can report it).
        confirmation = await self._exchange.publish(message, channel.routing_key, mandatory=False)
        if not isinstance(confirmation, Basic.Ack):
            raise PublishError(f"RabbitMQ did not confirm {notification_id}")
        return notification_id
