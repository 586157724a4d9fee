"""In-memory history and duplicate detection, without I/O."""

from __future__ import annotations

import gc
import json

from notifyd.auth import NO_GRANTS, Grants, Identity
from notifyd.history import PAGE_BYTES, HistoryPage, MemoryHistory, RecentIds, may_read, page_of
from notifyd.protocol import BROADCAST, Channel, Notification

ALICE, BOB, NEWS = Channel("user", "alice"), Channel("user", "bob"), Channel("topic", "news")


def n(notification_id: str, channel: Channel = ALICE) -> Notification:
    return Notification(id=notification_id, channel=channel, frame=notification_id.encode(), ts=0)


def ids(notifications: list[Notification] | None) -> list[str] | None:
    return None if notifications is None else [x.id for x in notifications]


def test_replay_merges_channels_in_arrival_order() -> None:
    history = MemoryHistory(max_per_channel=10, max_age=60, max_total=100)
    for i, channel in enumerate([ALICE, BROADCAST, BOB, NEWS, ALICE, BROADCAST]):
        history.record(n(f"n{i}", channel), now=0)
    assert ids(history.replay("n0", [ALICE, BROADCAST, NEWS])) == ["n1", "n3", "n4", "n5"]
    assert ids(history.replay("n5", [ALICE, BROADCAST])) == []
    assert ids(history.replay("n2", [ALICE])) == ["n4"]  # since may lie on another channel


def test_unknown_resume_point_is_not_resumable() -> None:
    history = MemoryHistory(10, 60, 100)
    history.record(n("a"), 0)
    assert history.replay("zzz", [ALICE]) is None


def test_a_channel_that_lost_entries_after_the_point_refuses() -> None:
    history = MemoryHistory(max_per_channel=3, max_age=60, max_total=100)
    history.record(n("p"), 0)
    for i in range(2):
        history.record(n(f"x{i}"), 0)
    assert ids(history.replay("p", [ALICE])) == ["x0", "x1"]
    history.record(n("x2"), 0)  # evicts "p" itself
    assert history.replay("p", [ALICE]) is None
    history.record(n("b0", BOB), 0)
    for i in range(3, 6):
        history.record(n(f"x{i}"), 0)  # evicts x0..x2, all older than b0
    assert ids(history.replay("b0", [ALICE, BOB])) == ["x3", "x4", "x5"]
    history.record(n("x6"), 0)  # evicts x3, which came after b0
    assert history.replay("b0", [ALICE, BOB]) is None
    assert history.replay("b0", [BOB]) == []  # bob's channel alone lost nothing
    assert ids(history.replay("x4", [ALICE])) == ["x5", "x6"]


def test_age_and_total_bounds() -> None:
    history = MemoryHistory(max_per_channel=100, max_age=10, max_total=3)
    for i in range(5):
        history.record(n(f"t{i}", BROADCAST), now=i)
    assert len(history) == 3
    assert history.replay("t0", [BROADCAST]) is None
    assert ids(history.replay("t2", [BROADCAST])) == ["t3", "t4"]
    history.expire(now=13.5)  # t0..t3 are older than 10 s
    assert len(history) == 1
    assert history.replay("t3", [BROADCAST]) is None
    history.expire(now=100)
    assert len(history) == 0


def test_before_seq_leaves_out_what_was_delivered_live() -> None:
    history = MemoryHistory(10, 60, 100)
    history.record(n("a"), 0)
    seq_b = history.record(n("b"), 0)
    history.record(n("c"), 0)
    assert ids(history.replay("a", [ALICE], before_seq=seq_b + 1)) == ["b"]
    assert history.last_seq == seq_b + 1


def test_a_resume_point_is_looked_for_on_the_sockets_channels_first() -> None:
    """Two users' notifications with one id (a publisher's own counter): alice resumes
    from hers, not from bob's later one, which would skip what she missed between."""
    history = MemoryHistory(10, 60, 100)
    for notification in [n("dup"), n("a1"), n("dup", BOB), n("a2"), n("b1", BOB)]:
        history.record(notification, 0)
    assert ids(history.replay("dup", [ALICE, BROADCAST])) == ["a1", "a2"]
    assert ids(history.replay("dup", [BOB])) == ["b1"]
    # Nowhere on the socket's channels: the latest anywhere (a topic joined later).
    assert ids(history.replay("dup", [NEWS, ALICE])) == ["a1", "a2"]
    assert ids(history.replay("b1", [ALICE])) == []


def test_recent_ids_window_and_limit() -> None:
    recent = RecentIds(window=10, limit=3)
    assert not recent.seen("user:u", "a", 0)
    assert recent.seen("user:u", "a", 5)
    assert not recent.seen("user:u", "a", 11)  # forgotten after the window
    for key in "bcd":
        assert not recent.seen("user:u", key, 12)
    assert not recent.seen("user:u", "a", 12)  # pushed out by the limit
    assert not RecentIds(window=0).seen("c", "x", 0) and not RecentIds(window=0).seen("c", "x", 0)


def test_recent_ids_are_per_channel() -> None:
    """A retry goes to the same channel; another user's message with the same id is
    another message."""
    recent = RecentIds(window=10)
    assert not recent.seen("user:alice", "welcome-1", 0)
    assert not recent.seen("user:bob", "welcome-1", 0)
    assert recent.seen("user:alice", "welcome-1", 1)


def test_retained_notifications_cost_the_cycle_collector_nothing() -> None:
    history = MemoryHistory(max_per_channel=5_000, max_age=60, max_total=10_000)
    history.record(n("first"), 0)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2_000):
        history.record(n(f"n{i}"), 0)
    gc.collect()
    assert len(history) == 2_001
    assert len(gc.get_objects()) - before < 20  # not one tracked object per entry
    assert ids(history.replay("n1997", [ALICE])) == ["n1998", "n1999"]


def test_a_stream_resume_without_a_time_reads_a_bounded_window() -> None:
    from notifyd.config import HistorySettings
    from notifyd.protocol import IdGenerator, ResumePoint
    from notifyd.stream import SKEW_MARGIN, StreamHistory, _Request

    history = StreamHistory(
        HistorySettings(backend="stream", max_age=3600, scan_without_time=60),
        broker=None,  # type: ignore[arg-type]
    )
    now = 1_000_000.0

    def start(*points: ResumePoint) -> float:
        batch = [_Request(point, frozenset(), None) for point in points]  # type: ignore[arg-type]
        return history._start_offset(batch, now).timestamp()

    # A publisher's own id, no since_ts: 60 s back, not the hour of retention.
    assert start(ResumePoint("order-17")) == now - 60
    # A time from the client or from a generated id: shortly before it.
    assert start(ResumePoint("order-17", ts=int((now - 600) * 1000))) == now - 600 - SKEW_MARGIN
    generated = IdGenerator().new(int((now - 30) * 1000))
    assert start(ResumePoint(generated)) == now - 30 - SKEW_MARGIN
    # Never before the retention window.
    assert start(ResumePoint("x", ts=0)) == now - 3600


# --- history pages (GET /api/history, the history message) ---------------------------


def page_ids(page: HistoryPage | None) -> tuple[list[str], str | None] | None:
    return None if page is None else ([x.id for x in page.notifications], page.next_before)


def test_memory_pages_are_newest_first_down_to_the_oldest_retained() -> None:
    history = MemoryHistory(max_per_channel=10, max_age=60, max_total=100)
    for i in range(7):
        history.record(n(f"a{i}"), now=0)
        history.record(n(f"b{i}", BOB), now=0)
    assert page_ids(history.page(ALICE, 3, None, now=0)) == (["a6", "a5", "a4"], "a4")
    assert page_ids(history.page(ALICE, 3, "a4", now=0)) == (["a3", "a2", "a1"], "a1")
    assert page_ids(history.page(ALICE, 3, "a1", now=0)) == (["a0"], None)
    assert page_ids(history.page(ALICE, 3, "a0", now=0)) == ([], None)
    # Exactly a page left: nothing older, so no next page.
    assert page_ids(history.page(ALICE, 4, "a4", now=0)) == (["a3", "a2", "a1", "a0"], None)
    assert page_ids(history.page(NEWS, 3, None, now=0)) == ([], None)


def test_a_memory_page_from_an_id_it_does_not_hold_is_gone() -> None:
    history = MemoryHistory(max_per_channel=3, max_age=60, max_total=100)
    for i in range(5):
        history.record(n(f"a{i}"), now=0)
    history.record(n("b0", BOB), now=0)
    assert page_ids(history.page(ALICE, 10, None, now=0)) == (["a4", "a3", "a2"], None)
    assert history.page(ALICE, 10, "a1", now=0) is None  # evicted by count
    assert history.page(ALICE, 10, "nope", now=0) is None
    assert history.page(ALICE, 10, "b0", now=0) is None  # on another channel
    assert history.page(ALICE, 10, "a3", now=120) is None  # past max_age
    assert page_ids(history.page(ALICE, 10, None, now=120)) == ([], None)


def test_a_page_is_cut_at_page_bytes_and_points_on() -> None:
    big = [
        Notification(id=f"x{i}", channel=ALICE, frame=b"x" * (PAGE_BYTES // 3), ts=0)
        for i in range(5)
    ]
    assert page_ids(page_of(big, 10, more=False)) == (["x0", "x1", "x2"], "x2")
    huge = [Notification(id="h", channel=ALICE, frame=b"x" * (PAGE_BYTES + 1), ts=0)]
    assert page_ids(page_of(huge, 10, more=False)) == (["h"], None)  # one at least
    assert page_ids(page_of(big[:2], 2, more=True)) == (["x0", "x1"], "x1")


def test_who_may_read_which_channel() -> None:
    identity = Identity("alice", 0, Grants.parse(["news", "chat.*"], "topics"), NO_GRANTS)
    assert may_read(identity, ALICE)
    assert may_read(identity, BROADCAST)
    assert may_read(identity, NEWS)
    assert may_read(identity, Channel.topic("chat.room1"))
    assert not may_read(identity, BOB)
    assert not may_read(identity, Channel.topic("sport"))
    assert not may_read(identity, Channel.topic("chat"))


def test_a_stream_page_window_keeps_the_newest_older_than_before() -> None:
    """What one window of a stream page read keeps (pure: deliveries built by hand)."""
    from notifyd.amqp import Delivery
    from notifyd.stream import _PageWindow

    def delivery(offset: int, key: str, data: int, message_id: str | None = None) -> Delivery:
        body = json.dumps({"data": data}).encode()
        headers = {"x-stream-offset": offset}
        return Delivery(key, body, message_id=message_id, timestamp=1000.0, headers=headers)

    stream = [
        delivery(10, "user.alice", 0, "m0"),
        delivery(11, "user.bob", 1, "m1"),
        delivery(12, "user.alice", 2),  # no message_id: a content id
        delivery(13, "user.alice", 3, "m3"),
        delivery(14, "user.alice", 4, "m4"),
        delivery(15, "user.alice", 5, "m5"),
    ]

    def read(before: str | None, keep: int) -> _PageWindow:
        window = _PageWindow(ALICE, before, now=2000.0, keep=keep, max_body_size=1 << 16)
        for d in stream:
            window(d)
        return window

    everything = read(None, keep=10)
    assert [n.id for n in everything.newest][-3:] == ["m3", "m4", "m5"]
    assert len(everything.newest) == 5  # bob's left out
    assert everything.first_offset == 10
    assert [n.id for n in read(None, keep=2).newest] == ["m4", "m5"]
    by_id = read("m4", keep=10)
    assert by_id.found
    assert [n.id for n in by_id.newest][::2] == ["m0", "m3"]  # m0, the content id, m3
    content_id = by_id.newest[1].id
    by_digest = read(content_id, keep=10)
    assert by_digest.found
    assert [n.id for n in by_digest.newest] == ["m0"]
    missing = read("m9", keep=10)
    assert not missing.found
    assert not missing.newest  # all newer than a before further back
