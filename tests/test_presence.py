"""Cluster-wide presence without a broker: the aggregator, the replica table, the merges."""

from __future__ import annotations

from typing import Any

import pytest

from notifyd.presence import (
    PresenceAggregator,
    ReplicaTable,
    Transition,
    Trim,
    merge_presence,
    merge_stats,
)

# One step: (op, instance, seq, users or None, now) -> expected transitions (user, online).
Step = tuple[str, str, int, dict[str, tuple[int, float]] | None, float, list[tuple[str, bool]]]

UP = (1, 100.0)
DOWN = (0, 0.0)


def run(steps: list[Step], grace: float = 5.0) -> PresenceAggregator:
    aggregator = PresenceAggregator(grace=grace, limit=100)
    for number, (op, instance, seq, users, now, expected) in enumerate(steps):
        transitions: list[Transition]
        if op == "apply":
            assert users is not None
            transitions, _ = aggregator.apply(instance, seq, users, now)
        elif op == "drop":
            transitions = aggregator.drop_instance(instance, now)
        else:
            transitions = aggregator.due(now)
        got = [(t.user, t.online) for t in transitions]
        assert got == expected, f"step {number} ({op} {instance} {users}): {got} != {expected}"
    return aggregator


@pytest.mark.parametrize(
    ("steps", "grace"),
    [
        pytest.param(
            [
                ("apply", "A", 1, {"u": UP}, 0, [("u", True)]),
                ("apply", "B", 1, {"u": UP}, 1, []),  # second replica: already online
                ("apply", "A", 2, {"u": DOWN}, 2, []),  # still on B
                ("apply", "B", 2, {"u": DOWN}, 3, []),  # gone everywhere: grace starts
                ("due", "", 0, None, 7.9, []),
                ("due", "", 0, None, 8.0, [("u", False)]),
                ("due", "", 0, None, 20, []),  # once
            ],
            5.0,
            id="first-socket-anywhere-and-last-one-after-grace",
        ),
        pytest.param(
            [
                ("apply", "A", 1, {"u": UP}, 0, [("u", True)]),
                ("apply", "A", 2, {"u": DOWN}, 1, []),
                ("apply", "B", 1, {"u": UP}, 3, []),  # back within grace: no transition
                ("due", "", 0, None, 10, []),
                ("apply", "B", 2, {"u": DOWN}, 11, []),
                ("due", "", 0, None, 16, [("u", False)]),
            ],
            5.0,
            id="reconnect-within-grace-elsewhere",
        ),
        pytest.param(
            [
                ("apply", "A", 1, {"u": UP, "v": UP}, 0, [("u", True), ("v", True)]),
                ("apply", "A", 1, {"u": DOWN}, 1, []),  # a duplicate report: skipped
                ("apply", "A", 2, {"u": DOWN}, 1, [("u", False)]),
            ],
            0.0,
            id="no-grace-and-duplicates",
        ),
        pytest.param(
            [
                ("apply", "A", 1, {"u": UP}, 0, [("u", True)]),
                ("apply", "B", 1, {"u": UP, "w": UP}, 0, [("w", True)]),
                ("drop", "A", 0, None, 1, []),  # u is still on B
                ("drop", "B", 0, None, 2, []),  # grace for u and w
                ("due", "", 0, None, 7, [("u", False), ("w", False)]),
            ],
            5.0,
            id="a-replica-goes-away",
        ),
        pytest.param(
            [
                ("apply", "A", 1, {"u": DOWN}, 0, []),  # never online: nothing to say
                ("apply", "A", 2, {"u": (2, 1.0)}, 0, [("u", True)]),
                ("apply", "A", 3, {"u": (1, 1.0)}, 0, []),  # fewer sockets, still online
            ],
            5.0,
            id="counts-are-states-not-increments",
        ),
    ],
)
def test_transitions(steps: list[Step], grace: float) -> None:
    run(steps, grace)


def test_a_snapshot_counts_as_announced_and_skips_older_reports() -> None:
    aggregator = PresenceAggregator(grace=0, limit=100)
    assert aggregator.reset({"A": (7, {"u": (1, 1.0), "gone": (0, 0.0)}), "B": (3, {})}, 0) == []
    assert aggregator.announced == {"u"}
    # Reports up to the snapshot's numbers are in it already.
    assert aggregator.apply("A", 6, {"u": DOWN}, 1) == ([], [])
    assert aggregator.apply("B", 3, {"v": UP}, 1) == ([], [])
    transitions, _ = aggregator.apply("B", 4, {"v": UP}, 1)
    assert [(t.user, t.online) for t in transitions] == [("v", True)]
    transitions, _ = aggregator.apply("A", 8, {"u": DOWN}, 2)
    assert [(t.user, t.online) for t in transitions] == [("u", False)]
    assert transitions[0].body() == {"user": "u", "online": False, "ts": 2000}
    # A restarted replica is a new instance: it starts again at 1.
    transitions, _ = aggregator.apply("A2", 1, {"u": UP}, 3)
    assert [(t.user, t.online) for t in transitions] == [("u", True)]


def test_a_takeover_settles_what_the_previous_aggregator_left_open() -> None:
    """Read back from notifyd.presence: ``was`` and ``gone`` were online last. ``gone``
    was on the replica that died with the previous aggregator; ``new``'s coming online
    was never sent."""
    snapshot = {"B": (4, {"was": (1, 1.0), "new": (2, 1.0)})}
    aggregator = PresenceAggregator(grace=5, limit=100)
    transitions = aggregator.reset(snapshot, 10, announced=["was", "gone"])
    assert [(t.user, t.online) for t in transitions] == [("new", True)]
    assert aggregator.announced == {"was", "gone", "new"}
    assert aggregator.due(14.9) == []
    assert [(t.user, t.online) for t in aggregator.due(15)] == [("gone", False)]
    # Back within the grace: nothing to say.
    aggregator = PresenceAggregator(grace=5, limit=100)
    aggregator.reset(snapshot, 10, announced=["was", "gone"])
    assert aggregator.apply("B", 5, {"gone": UP}, 12) == ([], [])
    assert aggregator.due(20) == []
    # Without grace, at once.
    aggregator = PresenceAggregator(grace=0, limit=100)
    transitions = aggregator.reset(snapshot, 10, announced=["gone"])
    assert [(t.user, t.online) for t in transitions] == [
        ("new", True), ("was", True), ("gone", False)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("limit", "places", "expected"),
    [
        (2, {"A": (1, 10.0), "B": (1, 20.0)}, []),
        # One over: the replica with the newest socket closes one.
        (1, {"A": (1, 10.0), "B": (1, 20.0)}, [Trim("u", "B", 0)]),
        (1, {"A": (1, 30.0), "B": (1, 20.0)}, [Trim("u", "A", 0)]),
        # Three over: B (newest) gives up both of its sockets, then A one of its three.
        (2, {"A": (3, 10.0), "B": (2, 20.0)}, [Trim("u", "B", 0), Trim("u", "A", 2)]),
    ],
)
def test_the_cluster_wide_limit_trims_the_newest(
    limit: int, places: dict[str, tuple[int, float]], expected: list[Trim]
) -> None:
    aggregator = PresenceAggregator(grace=5, limit=limit)
    trims: list[Trim] = []
    for seq, (instance, state) in enumerate(places.items(), 1):
        _, trims = aggregator.apply(instance, seq, {"u": state}, 0)
    assert trims == expected
    assert aggregator.sockets("u") == sum(n for n, _ in places.values())


def test_replica_table_expires_silent_replicas() -> None:
    table = ReplicaTable(expiry=6)
    assert table.seen("a.1", "a", 3, 2, now=0) is True
    assert table.seen("b.1", "b", 1, 1, now=4) is True
    assert table.seen("a.1", "a", 4, 2, now=5) is False
    assert table.live(11) == {"a.1": "a"}
    assert table.expire(11) == ["b.1"]
    table.gone("a.1")
    assert table.live(11) == {}


@pytest.mark.parametrize(
    ("users", "answers", "expected"),
    [
        (
            ["a", "b"],
            [{"users": {"a": 1}}, {"users": {"a": 1}}],
            {"a": {"online": True, "sockets": 2}, "b": {"online": False}},
        ),
        (["a"], [], {"a": {"online": False}}),
        # Answers naming users nobody asked about, or nonsense, change nothing.
        (["a"], [{"users": {"x": 3, "a": "2"}}, {"users": None}], {"a": {"online": False}}),
    ],
)
def test_merge_presence(
    users: list[str], answers: list[dict[str, Any]], expected: dict[str, Any]
) -> None:
    assert merge_presence(users, answers) == expected


def test_merge_stats_counts_users_once_when_the_aggregator_answered() -> None:
    answers: dict[str, dict[str, Any]] = {
        "b": {"connections": 3, "users": 2},
        "a": {"connections": 2, "users": 2, "cluster_users": 3},
    }
    assert merge_stats(answers) == {
        "replicas": {"a": {"connections": 2, "users": 2}, "b": {"connections": 3, "users": 2}},
        "total": {"replicas": 2, "connections": 5, "users": 3, "users_exact": True},
    }
    del answers["a"]["cluster_users"]
    assert merge_stats(answers)["total"]["users"] == 4
    assert merge_stats(answers)["total"]["users_exact"] is False


def test_presence_channels_are_for_subscriptions_only() -> None:
    from notifyd.errors import ProtocolError
    from notifyd.protocol import Channel, parse_channel, parse_client_message

    for kind in ("subscribe", "unsubscribe"):
        message = parse_client_message(f'{{"type":"{kind}","channel":"presence:bob"}}')
        assert message.channel == Channel("presence", "bob")  # type: ignore[union-attr]
        assert str(message.channel) == "presence:bob"  # type: ignore[union-attr]
    for text in (
        '{"type":"subscribe","channel":"presence:a*"}',
        '{"type":"publish","channel":"presence:bob","data":1}',
    ):
        with pytest.raises(ProtocolError) as refused:
            parse_client_message(text)
        assert refused.value.code == "invalid_channel"
    # What /api/publish and the AMQP side parse never names a presence channel.
    with pytest.raises(ProtocolError):
        parse_channel("presence:bob")


@pytest.mark.parametrize(
    ("claim", "expected"),
    [(None, frozenset()), (["bob", "carol"], frozenset({"bob", "carol"})), ("bob", None),
     (["a*"], None), ([1], None)],
)  # fmt: skip
def test_the_presence_claim(claim: object, expected: frozenset[str] | None) -> None:
    from notifyd.auth import decode_identity, mint_token
    from notifyd.config import AuthSettings
    from notifyd.errors import AuthError

    secret = "x" * 40
    signed = (
        mint_token(secret, "alice")
        if claim is None
        else mint_token(secret, "alice", presence=claim)
    )
    if expected is None:
        with pytest.raises(AuthError):
            decode_identity(signed, secret, AuthSettings(secret=secret))
    else:
        assert decode_identity(signed, secret, AuthSettings(secret=secret)).presence == expected


def test_offline_transitions_come_a_batch_at_a_time_in_order() -> None:
    """A disconnect wave's users go offline together: ``due`` hands them out ``limit``
    at a time (each batch is published in one write), oldest first."""
    aggregator = PresenceAggregator(grace=5, limit=100)
    users = [f"u{i}" for i in range(10)]
    aggregator.apply("A", 1, {u: UP for u in users}, 0)
    aggregator.apply("A", 2, {u: (0, 0.0) for u in users}, 1)
    batches = [aggregator.due(6, limit=4) for _ in range(4)]
    assert [[t.user for t in batch] for batch in batches] == [
        users[0:4],
        users[4:8],
        users[8:10],
        [],
    ]
    assert all(not t.online for batch in batches for t in batch)
