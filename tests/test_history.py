"""In-memory history and duplicate detection, without I/O."""

from __future__ import annotations

import gc

from notifyd.history import MemoryHistory, RecentIds
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


def test_recent_ids_window_and_limit() -> None:
    recent = RecentIds(window=10, limit=3)
    assert not recent.seen("a", 0)
    assert recent.seen("a", 5)
    assert not recent.seen("a", 11)  # forgotten after the window
    for key in "bcd":
        assert not recent.seen(key, 12)
    assert not recent.seen("a", 12)  # pushed out by the limit
    assert not RecentIds(window=0).seen("x", 0) and not RecentIds(window=0).seen("x", 0)


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
