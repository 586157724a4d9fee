"""What was sent recently, so that a reconnecting client can resume without loss.

:class:`MemoryHistory` keeps per-channel windows in one process, bounded by count
per channel, by age and by a total. It answers "everything on these channels
after notification X" exactly, or says that it cannot (the gap is too old, or X
was never seen here), so a client is never given a silent partial replay.

:class:`RecentIds` remembers message ids for a while so that a message published
twice with the same ``message_id`` on the same channel is delivered once.

Retained entries are tuples of strings, numbers and bytes only: CPython's cycle
collector stops tracking such tuples the first time it sees them, so a full
history costs the collector nothing, however many notifications it holds.

The replicated variant, read from a RabbitMQ stream, lives in :mod:`notifyd.stream`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .protocol import Channel, Notification

if TYPE_CHECKING:
    from .auth import Identity

#: Bytes of notification frames one history page holds at most (past it the page is
#: cut short, its ``next_before`` pointing on): 200 large notifications would otherwise
#: make one answer of tens of MB, written past a socket's send buffer in one go.
PAGE_BYTES: Final = 1 << 20

#: (sequence number, notification id, frame, ts): atomic values, never GC-tracked.
_Entry = tuple[int, str, bytes, int]


@dataclass(slots=True)
class _Window:
    entries: deque[_Entry] = field(default_factory=deque)
    #: Highest sequence number evicted from this channel: a resume point older
    #: than this would miss something, so it is refused.
    evicted_upto: int = 0


class MemoryHistory:
    """Per-channel notification windows for one process."""

    def __init__(self, max_per_channel: int, max_age: float, max_total: int) -> None:
        self.max_per_channel = max_per_channel
        self.max_age = max_age
        self.max_total = max_total
        #: Windows by channel name (``str(channel)``).
        self._windows: dict[str, _Window] = {}
        #: Every retained entry in arrival order, for age and total eviction.
        self._order: deque[tuple[int, float, str]] = deque()
        #: id -> sequence number of retained notifications (the latest with that id).
        self._index: dict[str, int] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._order)

    @property
    def last_seq(self) -> int:
        return self._seq

    def record(self, notification: Notification, now: float) -> int:
        """Retain a notification; returns its sequence number."""
        self._seq += 1
        seq = self._seq
        channel = str(notification.channel)
        window = self._windows.get(channel)
        if window is None:
            window = self._windows[channel] = _Window()
        window.entries.append((seq, notification.id, notification.frame, notification.ts))
        if len(window.entries) > self.max_per_channel:
            self._evict_from(window)
        self._order.append((seq, now, channel))
        self._index[notification.id] = seq
        self.expire(now)
        return seq

    def _evict_from(self, window: _Window) -> None:
        old_seq, old_id, _, _ = window.entries.popleft()
        window.evicted_upto = old_seq
        if self._index.get(old_id) == old_seq:
            del self._index[old_id]

    def expire(self, now: float) -> None:
        """Drop entries past ``max_age`` and beyond ``max_total``."""
        cutoff = now - self.max_age
        order = self._order
        while order and (order[0][1] < cutoff or len(order) > self.max_total):
            seq, _, channel = order.popleft()
            window = self._windows[channel]
            if window.entries and window.entries[0][0] == seq:
                self._evict_from(window)
            if not window.entries:
                # Age and total eviction go in sequence order, so everything this
                # window held is older than any id still in the index.
                del self._windows[channel]

    def page(
        self, channel: Channel, limit: int, before: str | None, now: float
    ) -> HistoryPage | None:
        """Up to ``limit`` notifications of ``channel``, newest first, strictly older
        than ``before`` (None: from the newest). None when ``before`` is not in the
        channel's window (never seen here, or evicted already)."""
        self.expire(now)
        window = self._windows.get(str(channel))
        found = before is None
        newest_first: list[Notification] = []
        for _, notification_id, frame, ts in reversed(window.entries if window else ()):
            if not found:
                found = notification_id == before
                continue
            newest_first.append(Notification(notification_id, channel, frame, ts))
            if len(newest_first) > limit:  # one more than asked: there is an older page
                break
        if not found:
            return None
        return page_of(newest_first, limit, more=False)

    def replay(
        self, since: str, channels: Iterable[Channel], before_seq: int | None = None
    ) -> list[Notification] | None:
        """Notifications on ``channels`` after ``since``, oldest first.

        None when the window does not cover the gap: ``since`` is unknown here, or
        something after it was already evicted from one of the channels.
        ``before_seq`` leaves out what the session has already received live.
        """
        channels = list(channels)
        start = self._start(since, channels)
        if start is None:
            return None
        found: list[tuple[int, Notification]] = []
        for channel in channels:
            window = self._windows.get(str(channel))
            if window is None:
                continue
            if window.evicted_upto > start:
                return None
            for seq, notification_id, frame, ts in reversed(window.entries):
                if seq <= start:
                    break
                if before_seq is None or seq < before_seq:
                    found.append((seq, Notification(notification_id, channel, frame, ts)))
        found.sort(key=lambda pair: pair[0])
        return [notification for _, notification in found]

    def _start(self, since: str, channels: list[Channel]) -> int | None:
        """The sequence number of ``since``: its first entry on one of ``channels``
        (another user's notification may have the same id: a publisher's ids are its
        own), else its latest anywhere (a topic the socket joins only after resuming)."""
        starts = []
        for channel in channels:
            window = self._windows.get(str(channel))
            for seq, notification_id, _, _ in window.entries if window is not None else ():
                if notification_id == since:
                    starts.append(seq)
                    break
        return min(starts) if starts else self._index.get(since)


@dataclass(slots=True)
class HistoryPage:
    """One page of a channel's history."""

    #: Newest first.
    notifications: list[Notification]
    #: Something older than the last of them is still retained.
    more: bool

    @property
    def next_before(self) -> str | None:
        """Where the next (older) page starts: the oldest id returned, or None when
        nothing older is retained."""
        return self.notifications[-1].id if self.more and self.notifications else None


def page_of(newest_first: Iterable[Notification], limit: int, more: bool) -> HistoryPage:
    """The first ``limit`` of ``newest_first`` and at most :data:`PAGE_BYTES` of frames
    (one at least); ``more`` says whether anything older than all of them exists."""
    page: list[Notification] = []
    size = 0
    for notification in newest_first:
        size += len(notification.frame)
        if len(page) >= limit or (page and size > PAGE_BYTES):
            return HistoryPage(page, True)
        page.append(notification)
    return HistoryPage(page, more)


def may_read(identity: Identity, channel: Channel) -> bool:
    """Whether a user token may read ``channel``'s history: the user's own channel,
    ``broadcast``, and the topics the token grants (as for ``subscribe``)."""
    if channel.kind == "user":
        return channel.name == identity.user
    if channel.kind == "topic":
        return identity.topics.allows(channel.name)
    return channel.kind == "broadcast"


class RecentIds:
    """Message ids seen in the last ``window`` seconds (at most ``limit`` of them), per
    channel: a publisher's retry goes to the same routing key, while two users'
    messages may carry the same id (a publisher's own counter, say)."""

    def __init__(self, window: float, limit: int = 100_000) -> None:
        self.window = window
        self.limit = limit
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def seen(self, channel: str, message_id: str, now: float) -> bool:
        """True if ``message_id`` was seen on ``channel`` within the window; remembers
        it otherwise."""
        seen = self._seen
        cutoff = now - self.window
        while seen:
            oldest_id, at = next(iter(seen.items()))
            if at >= cutoff and len(seen) < self.limit:
                break
            del seen[oldest_id]
        key = (channel, message_id)
        if key in seen:
            return True
        if self.window > 0:
            seen[key] = now
        return False
