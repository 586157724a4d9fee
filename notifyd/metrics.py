"""Prometheus metrics: one :class:`Metrics` object per process, built by whoever serves them.

No metric is registered at import: :class:`notifyd.app.Gateway` (and the Web Push
worker) builds a :class:`Metrics` on a registry of its own, hands it to the hub, the
broker, the sessions and the rest, and serves that registry on /metrics. Tests build
theirs on a fresh registry and read it with ``registry.get_sample_value(...)``.

No label ever carries a user id or topic name.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

#: Refresh ``notifyd_gc_tracked_objects`` at most this often (seconds): counting the
#: frozen objects walks all of them, a stall of the event loop at every scrape otherwise.
GC_TRACKED_MAX_AGE = 60.0


def process_registry() -> CollectorRegistry:
    """A new registry with the collectors prometheus_client's default registry has:
    ``process_*``, ``python_info`` and ``python_gc_*``."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class Metrics:
    """Every notifyd metric, registered on ``registry`` (a fresh one when None).

    The names, help texts, labels and buckets are a contract (README, metrics table).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series double the scrape size and no dashboard or alert uses
        # them. A process-wide switch in prometheus_client, set here rather than at import.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        if registry is None:
            registry = CollectorRegistry()
        self.registry = registry
        self.connections = Gauge(
            "notifyd_connections", "Open authenticated WebSocket connections", registry=registry
        )
        self.users_online = Gauge(
            "notifyd_users_online", "Users with at least one open connection", registry=registry
        )
        self.connection_attempts = Counter(
            "notifyd_connection_attempts",
            "WebSocket connection attempts by outcome",
            ["outcome"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "notifyd_auth_failures", "Refused tokens by reason", ["reason"], registry=registry
        )
        self.notifications_received = Counter(
            "notifyd_notifications_received",
            "Messages consumed from RabbitMQ by kind",
            ["kind"],
            registry=registry,
        )
        self.frames_delivered = Counter(
            "notifyd_frames_delivered", "Notification frames written to sockets", registry=registry
        )
        self.notifications_dropped = Counter(
            "notifyd_notifications_dropped",
            "Notifications not delivered, by reason",
            ["reason"],
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "notifyd_delivery_latency_seconds",
            "Time from publish (AMQP timestamp header) to the socket write",
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
                5.0,
            ),
            registry=registry,
        )
        self.broker_connected = Gauge(
            "notifyd_broker_connected", "1 while the AMQP connection is up", registry=registry
        )
        self.broker_reconnects = Counter(
            "notifyd_broker_reconnects", "AMQP reconnections after a loss", registry=registry
        )
        self.heartbeat_timeouts = Counter(
            "notifyd_heartbeat_timeouts",
            "Sockets cut off because they did not answer a ping within one heartbeat interval",
            registry=registry,
        )
        self.slow_consumer_disconnects = Counter(
            "notifyd_slow_consumer_disconnects",
            "Sockets closed with 4009 because their send buffer overflowed",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "notifyd_dead_lettered",
            "AMQP messages rejected to notifyd.dlx, by reason",
            ["reason"],
            registry=registry,
        )
        self.upstream_messages = Counter(
            "notifyd_upstream_messages",
            "Client publish/send messages by outcome",
            ["kind", "result"],
            registry=registry,
        )
        self.bindings = Gauge(
            "notifyd_bindings", "Routing keys bound to this replica's queue", registry=registry
        )
        self.history_reads = Counter(
            "notifyd_history_reads",
            "Reads of the shared history stream (each serves a batch of resumes)",
            registry=registry,
        )
        self.history_requests = Counter(
            "notifyd_history_requests",
            "History page requests (GET /api/history, the history message) by transport and"
            " outcome",
            ["transport", "outcome"],
            registry=registry,
        )
        self.resumes = Counter(
            "notifyd_resumes", "Resume requests by outcome", ["outcome"], registry=registry
        )
        self.closes = Counter(
            "notifyd_closes",
            "Sockets closed by the server, by close code",
            ["code"],
            registry=registry,
        )
        self.ready = Gauge("notifyd_ready", "1 while /readyz answers 200", registry=registry)
        self.draining = Gauge(
            "notifyd_draining", "1 while the server is draining for shutdown", registry=registry
        )
        self.acks = Counter(
            "notifyd_client_acks", "Notification acks received from clients", registry=registry
        )
        self.receipts = Counter(
            "notifyd_receipts",
            "Delivery receipts published, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.gc_pause = Histogram(
            "notifyd_gc_pause_seconds",
            "Collections run by notifyd's collector policy, by action (young, freeze, full)",
            ["action"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.gc_tracked = Gauge(
            "notifyd_gc_tracked_objects",
            "Objects the cycle collector tracks, frozen ones included (counted at a scrape,"
            " at most once a minute)",
            registry=registry,
        )
        self.malformed_requests = Counter(
            "notifyd_malformed_requests",
            "HTTP requests aiohttp could not parse, by kind (refused; their text is never logged)",
            ["kind"],
            registry=registry,
        )
        self.pending_sockets = Gauge(
            "notifyd_pending_sockets",
            "Sockets upgraded but not yet authenticated (or refused)",
            registry=registry,
        )
        self.client_errors = Counter(
            "notifyd_client_errors",
            "error messages sent to clients for messages they sent, by error code",
            ["code"],
            registry=registry,
        )
        self.http_connections = Gauge(
            "notifyd_http_connections",
            "TCP connections aiohttp serves as HTTP: requests in progress, idle keep-alive, and"
            " clients still sending their request (WebSockets leave it after the upgrade)",
            registry=registry,
        )
        # --- Web Push (notifyd webpush and the gateway's /api/push routes) ---------------------
        self.webpush_messages = Counter(
            "notifyd_webpush_messages",
            "Messages consumed from notifyd.offline, by outcome (delivered, no_subscription,"
            " expired, dead_lettered, invalid)",
            ["outcome"],
            registry=registry,
        )
        self.webpush_sent = Counter(
            "notifyd_webpush_sent",
            "Requests to push services by outcome (ok, gone: 404/410 and the subscription"
            " deleted, retry: 429/5xx/network, rejected: another 4xx)",
            ["outcome"],
            registry=registry,
        )
        self.webpush_send_latency = Histogram(
            "notifyd_webpush_send_seconds",
            "Time one request to a push service took (encryption included)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.webpush_truncated = Counter(
            "notifyd_webpush_truncated",
            "Notifications too big for a push message (3993 bytes), sent without their data",
            registry=registry,
        )
        self.webpush_in_flight = Gauge(
            "notifyd_webpush_in_flight",
            "Notifications the Web Push worker is delivering or retrying",
            registry=registry,
        )
        self.webpush_api = Counter(
            "notifyd_webpush_api_requests",
            "POST/DELETE /api/push/subscriptions by action (subscribe, unsubscribe) and outcome",
            ["action", "outcome"],
            registry=registry,
        )
        self.cluster_replicas = Gauge(
            "notifyd_cluster_replicas",
            "Replica processes this one heard a beacon from on notifyd.cluster (itself included)",
            registry=registry,
        )
        self.cluster_queries = Counter(
            "notifyd_cluster_queries",
            "Queries to every replica (presence, stats, dump), by outcome: complete, partial"
            " (some replica did not answer in time) or failed",
            ["kind", "outcome"],
            registry=registry,
        )
        self.cluster_query_seconds = Histogram(
            "notifyd_cluster_query_seconds",
            "Time for a query to every replica to be answered by all (or to time out)",
            ["kind"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=registry,
        )
        self.cluster_limit_closes = Counter(
            "notifyd_cluster_limit_closes",
            "Sockets closed with 4003 because their user held more than"
            " [ws] max_connections_per_user over all replicas",
            registry=registry,
        )
        self.presence_aggregating = Gauge(
            "notifyd_presence_aggregating",
            "1 while this replica is the one that publishes cluster-wide presence transitions",
            registry=registry,
        )
        self.presence_transitions = Counter(
            "notifyd_presence_transitions",
            "Presence transitions published to notifyd.presence by this replica, by state",
            ["state"],
            registry=registry,
        )
        self.presence_subscriptions = Gauge(
            "notifyd_presence_subscriptions",
            "presence:<id> subscriptions of sockets on this replica",
            registry=registry,
        )
        self.offline_republished = Counter(
            "notifyd_offline_republished",
            "user.<id> notifications no replica held, sent to notifyd.offline by this replica"
            " (the one consuming notifyd.unrouted)",
            registry=registry,
        )
        self.offline_failed = Counter(
            "notifyd_offline_failed",
            "Offline notifications RabbitMQ did not confirm on notifyd.offline: handed back to"
            " notifyd.unrouted and sent again",
            registry=registry,
        )
        self.offline_receipts = Counter(
            "notifyd_offline_receipts",
            'Receipts ("online": false) for offline notifications that asked for one, by outcome'
            " (sent, failed)",
            ["outcome"],
            registry=registry,
        )
        self.history_bindings = Gauge(
            "notifyd_history_bindings",
            "Keys bound on the notifyd exchange only for the in-memory history (users and topics"
            " gone for longer than [ws] binding_grace, within [history] max_age)",
            registry=registry,
        )
        self.sse_connections = Gauge(
            "notifyd_sse_connections",
            "Open Server-Sent Events streams (also counted in notifyd_connections)",
            registry=registry,
        )
        self.sse_tickets = Counter(
            "notifyd_sse_tickets",
            "SSE tickets by outcome (issued, redeemed, reused, expired, invalid)",
            ["outcome"],
            registry=registry,
        )
        self.sse_messages = Counter(
            "notifyd_sse_messages",
            "POST /api/messages requests by message type and HTTP status",
            ["type", "status"],
            registry=registry,
        )
        # (A new metric: an attribute above, registry=registry, same style.)
        # Children the hot paths use, looked up once (each series exists from the start).
        self.received = {
            kind: self.notifications_received.labels(kind)
            for kind in ("user", "topic", "broadcast")
        }
        self.dropped_offline = self.notifications_dropped.labels("offline")
        self.dropped_expired = self.notifications_dropped.labels("expired")
        self.dropped_duplicate = self.notifications_dropped.labels("duplicate")
        self.dropped_token_expired = self.notifications_dropped.labels("token_expired")
        self.dropped_slow = self.notifications_dropped.labels("slow_consumer")
        self.accepted = self.connection_attempts.labels("accepted")
        self.rate_limited = self.upstream_messages.labels("any", "rate_limited")
