"""Who is online on this replica, and fan-out of notifications to their sockets.

The hub is synchronous on purpose: :meth:`Hub.deliver` writes one pre-built frame
to every matching socket without awaiting any of them (a socket that cannot keep
up closes itself with 4009), so one slow client never delays the others.

It also decides which routing keys this replica needs from RabbitMQ: a user's
key is wanted from their first socket and released ``linger`` seconds after the
last one left, so a reloading tab does not churn bindings.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

from . import metrics
from .history import MemoryHistory, RecentIds
from .protocol import BROADCAST, Channel, CloseCode, Notification

_DROPPED_OFFLINE = metrics.NOTIFICATIONS_DROPPED.labels("offline")
_DROPPED_EXPIRED = metrics.NOTIFICATIONS_DROPPED.labels("expired")
_DROPPED_DUPLICATE = metrics.NOTIFICATIONS_DROPPED.labels("duplicate")
_DROPPED_TOKEN_EXPIRED = metrics.NOTIFICATIONS_DROPPED.labels("token_expired")
_RECEIVED = {
    kind: metrics.NOTIFICATIONS_RECEIVED.labels(kind) for kind in ("user", "topic", "broadcast")
}


class Subscriber(Protocol):
    """The hub's view of one socket (implemented by :class:`notifyd.connection.Session`)."""

    user: str
    #: Token expiry plus leeway; nothing is written to the socket after it.
    deadline: float
    topics: set[str]

    def write(self, frame: bytes, seq: int, now: float) -> bool:
        """Queue one frame without blocking; False if it was not queued."""

    def close_soon(self, code: int, reason: str) -> None:
        """Start closing the socket; must not call back into the hub synchronously."""


class Bindings(Protocol):
    """The broker side: which routing keys this replica's queue should be bound to."""

    def want(self, routing_key: str) -> None: ...

    def release(self, routing_key: str) -> None: ...


class Hub:
    def __init__(
        self,
        bindings: Bindings,
        linger: float,
        history: MemoryHistory | None = None,
        dedupe: RecentIds | None = None,
        on_delivered: Callable[[Notification, int], None] | None = None,
    ) -> None:
        self.bindings = bindings
        self.linger = linger
        self.history = history
        self.dedupe = dedupe
        #: Called after each notification's fan-out with the number of sockets written.
        self.on_delivered = on_delivered
        self._all: set[Subscriber] = set()
        self._users: dict[str, set[Subscriber]] = {}
        self._topics: dict[str, set[Subscriber]] = {}
        #: Keys to release and when (loop time), oldest first; one timer for all.
        self._releases: OrderedDict[str, float] = OrderedDict()
        self._release_timer: asyncio.TimerHandle | None = None
        self._seq = 0
        #: Running total of sockets removed (for the collector policy).
        self.left = 0

    # --- membership -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(list(self._all))

    @property
    def users_online(self) -> int:
        return len(self._users)

    @property
    def last_seq(self) -> int:
        """Sequence number of the last notification handled (for resume seams)."""
        return self._seq

    def connections_of(self, user: str) -> int:
        return len(self._users.get(user, ()))

    def sockets_of(self, user: str) -> list[Subscriber]:
        return list(self._users.get(user, ()))

    def topics_of(self, user: str) -> set[str]:
        """The topics any socket of ``user`` reads here: the bindings the user costs."""
        topics: set[str] = set()
        for subscriber in self._users.get(user, ()):
            topics.update(subscriber.topics)
        return topics

    def add(self, subscriber: Subscriber) -> None:
        self._all.add(subscriber)
        sockets = self._users.get(subscriber.user)
        if sockets is None:
            sockets = self._users[subscriber.user] = set()
            self._want(f"user.{subscriber.user}")
        sockets.add(subscriber)
        for topic in subscriber.topics:
            self._join(subscriber, topic)
        metrics.CONNECTIONS.set(len(self._all))
        metrics.USERS_ONLINE.set(len(self._users))

    def remove(self, subscriber: Subscriber) -> None:
        if subscriber not in self._all:
            return
        self._all.discard(subscriber)
        self.left += 1
        sockets = self._users.get(subscriber.user)
        if sockets is not None:
            sockets.discard(subscriber)
            if not sockets:
                del self._users[subscriber.user]
                self._release_later(f"user.{subscriber.user}")
        for topic in subscriber.topics:
            self._leave(subscriber, topic)
        metrics.CONNECTIONS.set(len(self._all))
        metrics.USERS_ONLINE.set(len(self._users))

    def subscribe(self, subscriber: Subscriber, topic: str) -> None:
        if topic not in subscriber.topics:
            subscriber.topics.add(topic)
            if subscriber in self._all:
                self._join(subscriber, topic)

    def unsubscribe(self, subscriber: Subscriber, topic: str) -> None:
        if topic in subscriber.topics:
            subscriber.topics.discard(topic)
            if subscriber in self._all:
                self._leave(subscriber, topic)

    def _join(self, subscriber: Subscriber, topic: str) -> None:
        members = self._topics.get(topic)
        if members is None:
            members = self._topics[topic] = set()
            self._want(f"topic.{topic}")
        members.add(subscriber)

    def _leave(self, subscriber: Subscriber, topic: str) -> None:
        members = self._topics.get(topic)
        if members is not None:
            members.discard(subscriber)
            if not members:
                del self._topics[topic]
                self._release_later(f"topic.{topic}")

    def _want(self, key: str) -> None:
        if self._releases.pop(key, None) is None:
            self.bindings.want(key)
        # else: still bound: a reconnecting tab costs no binding churn

    def _release_later(self, key: str) -> None:
        """Release ``key`` ``linger`` seconds from now.

        One timer for all keys, not one per key: ``linger`` is the same for every
        key, so keys fall due in the order they were released, and thousands of
        users leaving at once cost a dict entry each.
        """
        if self.linger <= 0:
            self.bindings.release(key)
            return
        loop = asyncio.get_running_loop()
        self._releases[key] = loop.time() + self.linger
        if self._release_timer is None:
            self._release_timer = loop.call_later(self.linger, self._release_due)

    def _release_due(self) -> None:
        self._release_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        releases = self._releases
        while releases:
            key, due = next(iter(releases.items()))
            if due > now:
                self._release_timer = loop.call_at(due, self._release_due)
                return
            releases.popitem(last=False)
            self.bindings.release(key)

    def close(self) -> None:
        """Cancel pending releases (on shutdown the queue goes away anyway)."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        self._releases.clear()

    # --- fan-out --------------------------------------------------------------------

    def deliver(self, notification: Notification, now: float | None = None) -> int:
        """Write a notification to every matching socket; returns how many got it."""
        if now is None:
            now = time.time()
        channel = notification.channel
        _RECEIVED[channel.kind].inc()
        if self.dedupe is not None and self.dedupe.seen(notification.id, now):
            _DROPPED_DUPLICATE.inc()
            return 0
        if notification.expires_at is not None and notification.expires_at <= now:
            _DROPPED_EXPIRED.inc()
            return 0
        if self.history is not None:
            seq = self.history.record(notification, now)
        else:
            self._seq += 1
            seq = self._seq
        self._seq = seq
        if channel.kind == "user":
            targets = self._users.get(channel.name)
        elif channel.kind == "topic":
            targets = self._topics.get(channel.name)
        else:
            targets = self._all
        written = 0
        if targets:
            frame = notification.frame
            for subscriber in targets:
                if subscriber.deadline <= now:
                    _DROPPED_TOKEN_EXPIRED.inc()
                elif subscriber.write(frame, seq, now):
                    written += 1
        if written:
            metrics.FRAMES_DELIVERED.inc(written)
            if notification.published_at is not None:
                metrics.DELIVERY_LATENCY.observe(max(0.0, time.time() - notification.published_at))
        else:
            _DROPPED_OFFLINE.inc()
        if self.on_delivered is not None:
            self.on_delivered(notification, written)
        return written

    def channels_of(self, subscriber: Subscriber) -> list[Channel]:
        """Every channel a socket currently reads."""
        channels = [Channel("user", subscriber.user), BROADCAST]
        channels.extend(Channel("topic", topic) for topic in subscriber.topics)
        return channels

    # --- control --------------------------------------------------------------------

    def disconnect_user(self, user: str, code: int = CloseCode.FORBIDDEN) -> int:
        sockets = self.sockets_of(user)
        for subscriber in sockets:
            subscriber.close_soon(code, "disconnected by the backend")
        return len(sockets)
