"""Who is online on this replica, and fan-out of notifications to their sockets.

The hub is synchronous on purpose: :meth:`Hub.deliver` writes one pre-built frame
to every matching socket without awaiting any of them (a socket that cannot keep
up closes itself with 4009), so one slow client never delays the others.

It also decides which routing keys this replica needs from RabbitMQ: a user's
key is wanted from their first socket and released ``linger`` seconds after the
last one left, so a reloading tab does not churn bindings. With ``retain`` (the
in-memory history's window, longer than ``linger``), a released key is then wanted
from ``retained`` bindings until ``retain`` seconds after the last socket left:
what is published meanwhile reaches the history without the user looking online.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

from .closes import CloseReason
from .history import MemoryHistory, RecentIds
from .metrics import Metrics
from .protocol import BROADCAST, Channel, Notification


class Subscriber(Protocol):
    """The hub's view of one socket (implemented by :class:`notifyd.connection.Session`)."""

    user: str
    #: Token expiry plus leeway; nothing is written to the socket after it.
    deadline: float
    topics: set[str]

    def write(self, frame: bytes, seq: int, now: float) -> bool:
        """Queue one frame without blocking; False if it was not queued."""

    def close_soon(self, why: CloseReason) -> None:
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
        retain: float = 0.0,
        retained: Bindings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.bindings = bindings
        self.metrics = metrics if metrics is not None else Metrics()
        self.linger = linger
        #: Bindings kept for the history only, until ``retain`` seconds after the last
        #: socket left (None, or ``retain`` not past ``linger``: none).
        self.retained = retained if retained is not None and retain > linger else None
        self.retain = retain
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
        #: Keys released that :attr:`retained` holds, and until when, oldest first.
        self._retains: OrderedDict[str, float] = OrderedDict()
        self._retain_timer: asyncio.TimerHandle | None = None
        self._seq = 0
        #: Called with a socket and True when it joins, False when it leaves
        #: (cluster-wide presence and per-user limit, notifyd.cluster).
        self.on_change: Callable[[Subscriber, bool], None] | None = None

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
            self._want(Channel("user", subscriber.user).routing_key)
        sockets.add(subscriber)
        for topic in subscriber.topics:
            self._join(subscriber, topic)
        self.metrics.connections.set(len(self._all))
        self.metrics.users_online.set(len(self._users))
        if self.on_change is not None:
            self.on_change(subscriber, True)

    def remove(self, subscriber: Subscriber) -> None:
        if subscriber not in self._all:
            return
        self._all.discard(subscriber)
        sockets = self._users.get(subscriber.user)
        if sockets is not None:
            sockets.discard(subscriber)
            if not sockets:
                del self._users[subscriber.user]
                self._release_later(Channel("user", subscriber.user).routing_key)
        for topic in subscriber.topics:
            self._leave(subscriber, topic)
        self.metrics.connections.set(len(self._all))
        self.metrics.users_online.set(len(self._users))
        if self.on_change is not None:
            self.on_change(subscriber, False)

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
            self._want(Channel("topic", topic).routing_key)
        members.add(subscriber)

    def _leave(self, subscriber: Subscriber, topic: str) -> None:
        members = self._topics.get(topic)
        if members is not None:
            members.discard(subscriber)
            if not members:
                del self._topics[topic]
                self._release_later(Channel("topic", topic).routing_key)

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
            if self.retained is not None:
                self._retain(key, asyncio.get_running_loop().time())
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
            if self.retained is not None:
                self._retain(key, due)

    def _retain(self, key: str, released: float) -> None:
        """Have :attr:`retained` hold ``key`` (released at loop time ``released``) until
        ``retain`` seconds after its last socket left. Due times only grow, as releases'."""
        assert self.retained is not None
        self.retained.want(key)
        retains = self._retains
        retains.pop(key, None)  # from an earlier absence: to the end, with its new time
        due = released + self.retain - self.linger
        retains[key] = due
        if self._retain_timer is None:
            self._retain_timer = asyncio.get_running_loop().call_at(due, self._retain_due)

    def _retain_due(self) -> None:
        self._retain_timer = None
        assert self.retained is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        retains = self._retains
        while retains:
            key, due = next(iter(retains.items()))
            if due > now:
                self._retain_timer = loop.call_at(due, self._retain_due)
                return
            retains.popitem(last=False)
            # Back meanwhile, the user is bound by :attr:`bindings` (history included).
            self.retained.release(key)

    def close(self) -> None:
        """Cancel pending releases (on shutdown the broker unbinds every key itself,
        before it deletes the queue)."""
        for timer in (self._release_timer, self._retain_timer):
            if timer is not None:
                timer.cancel()
        self._release_timer = self._retain_timer = None
        self._releases.clear()
        self._retains.clear()

    # --- fan-out --------------------------------------------------------------------

    def deliver(self, notification: Notification, now: float | None = None) -> int:
        """Write a notification to every matching socket; returns how many got it."""
        if now is None:
            now = time.time()
        channel = notification.channel
        metrics = self.metrics
        metrics.received[channel.kind].inc()
        if self.dedupe is not None and self.dedupe.seen(str(channel), notification.id, now):
            metrics.dropped_duplicate.inc()
            return 0
        if notification.expires_at is not None and notification.expires_at <= now:
            metrics.dropped_expired.inc()
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
                    metrics.dropped_token_expired.inc()
                elif subscriber.write(frame, seq, now):
                    written += 1
        if written:
            metrics.frames_delivered.inc(written)
            if notification.published_at is not None:
                metrics.delivery_latency.observe(max(0.0, time.time() - notification.published_at))
        else:
            metrics.dropped_offline.inc()
        if self.on_delivered is not None:
            self.on_delivered(notification, written)
        return written

    def channels_of(self, subscriber: Subscriber) -> list[Channel]:
        """Every channel a socket currently reads."""
        channels = [Channel("user", subscriber.user), BROADCAST]
        channels.extend(Channel("topic", topic) for topic in subscriber.topics)
        return channels

    # --- control --------------------------------------------------------------------

    def disconnect_user(self, user: str) -> int:
        """Close every socket of ``user`` here (4003); returns how many."""
        sockets = self.sockets_of(user)
        for subscriber in sockets:
            subscriber.close_soon(CloseReason.DISCONNECTED)
        return len(sockets)
