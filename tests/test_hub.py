"""Who is online and fan-out, with stand-in sockets and bindings (no I/O)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from notifyd.closes import CloseReason
from notifyd.history import MemoryHistory, RecentIds
from notifyd.hub import Hub
from notifyd.protocol import BROADCAST, Channel, Notification


@dataclass(eq=False)
class FakeSocket:
    user: str
    topics: set[str] = field(default_factory=set)
    deadline: float = float("inf")
    accept: bool = True
    frames: list[bytes] = field(default_factory=list)
    closed_with: CloseReason | None = None

    def write(self, frame: bytes, seq: int, now: float) -> bool:
        if self.accept:
            self.frames.append(frame)
        return self.accept

    def close_soon(self, why: CloseReason) -> None:
        self.closed_with = why


@dataclass
class FakeBindings:
    calls: list[tuple[str, str]] = field(default_factory=list)

    def want(self, routing_key: str) -> None:
        self.calls.append(("want", routing_key))

    def release(self, routing_key: str) -> None:
        self.calls.append(("release", routing_key))


def note(notification_id: str, channel: Channel, expires_at: float | None = None) -> Notification:
    return Notification(
        id=notification_id,
        channel=channel,
        frame=notification_id.encode(),
        ts=0,
        expires_at=expires_at,
    )


def test_fan_out_by_channel_and_isolation() -> None:
    hub = Hub(FakeBindings(), linger=0)
    alice1, alice2 = FakeSocket("alice"), FakeSocket("alice", {"news"})
    bob = FakeSocket("bob", {"news"})
    for s in (alice1, alice2, bob):
        hub.add(s)
    assert (len(hub), hub.users_online, hub.connections_of("alice")) == (3, 2, 2)
    assert hub.deliver(note("u", Channel("user", "alice"))) == 2
    assert hub.deliver(note("t", Channel("topic", "news"))) == 2
    assert hub.deliver(note("b", BROADCAST)) == 3
    assert hub.deliver(note("x", Channel("user", "carol"))) == 0
    assert alice1.frames == [b"u", b"b"] and alice2.frames == [b"u", b"t", b"b"]
    assert bob.frames == [b"t", b"b"]


def test_expired_tokens_full_sockets_duplicates_and_stale_messages() -> None:
    hub = Hub(FakeBindings(), linger=0, dedupe=RecentIds(60))
    fresh, stale, full = (
        FakeSocket("u"),
        FakeSocket("u", deadline=time.time() - 1),
        FakeSocket("u", accept=False),
    )
    for s in (fresh, stale, full):
        hub.add(s)
    assert hub.deliver(note("a", Channel("user", "u"))) == 1
    assert stale.frames == [] and full.frames == []
    assert hub.deliver(note("a", Channel("user", "u"))) == 0  # duplicate id
    other = FakeSocket("v")
    hub.add(other)
    assert hub.deliver(note("a", Channel("user", "v"))) == 1  # same id, another user
    assert other.frames == [b"a"]
    assert hub.deliver(note("old", Channel("user", "u"), expires_at=time.time() - 1)) == 0
    assert fresh.frames == [b"a"]


def test_history_records_every_delivered_notification() -> None:
    history = MemoryHistory(10, 60, 100)
    hub = Hub(FakeBindings(), linger=0, history=history)
    hub.deliver(note("a", Channel("user", "nobody")))
    hub.deliver(note("b", Channel("user", "nobody")))
    assert hub.last_seq == history.last_seq == 2
    assert [x.id for x in history.replay("a", [Channel("user", "nobody")]) or []] == ["b"]


def test_subscribe_unsubscribe_and_channels() -> None:
    bindings = FakeBindings()
    hub = Hub(bindings, linger=0)
    sock = FakeSocket("u")
    hub.add(sock)
    hub.subscribe(sock, "news")
    hub.subscribe(sock, "news")
    assert hub.channels_of(sock) == [Channel("user", "u"), BROADCAST, Channel("topic", "news")]
    assert hub.deliver(note("t", Channel("topic", "news"))) == 1
    hub.unsubscribe(sock, "news")
    assert hub.deliver(note("t2", Channel("topic", "news"))) == 0
    assert bindings.calls == [("want", "user.u"), ("want", "topic.news"), ("release", "topic.news")]


async def test_bindings_linger_and_survive_a_quick_reconnect() -> None:
    bindings = FakeBindings()
    hub = Hub(bindings, linger=0.05)
    first = FakeSocket("u", {"t"})
    hub.add(first)
    hub.remove(first)
    second = FakeSocket("u")
    hub.add(second)  # within the grace period: no churn
    await asyncio.sleep(0.08)
    assert bindings.calls == [("want", "user.u"), ("want", "topic.t"), ("release", "topic.t")]
    hub.remove(second)
    hub.remove(second)  # idempotent
    await asyncio.sleep(0.08)
    assert bindings.calls[-1] == ("release", "user.u")
    assert hub.users_online == 0 and len(hub) == 0


def test_disconnect_user_closes_only_their_sockets() -> None:
    hub = Hub(FakeBindings(), linger=0)
    a1, a2, b = FakeSocket("a"), FakeSocket("a"), FakeSocket("b")
    for s in (a1, a2, b):
        hub.add(s)
    assert hub.disconnect_user("a") == 2
    assert (a1.closed_with, a2.closed_with, b.closed_with) == (
        CloseReason.DISCONNECTED,
        CloseReason.DISCONNECTED,
        None,
    )
    assert (CloseReason.DISCONNECTED.code, CloseReason.DISCONNECTED.text) == (
        4003,
        "disconnected by the backend",
    )
