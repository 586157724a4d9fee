"""Prometheus metrics, declared once. No label ever carries a user id or topic name."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the scrape size and no dashboard or alert uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONNECTIONS = Gauge("notifyd_connections", "Open authenticated WebSocket connections")
USERS_ONLINE = Gauge("notifyd_users_online", "Users with at least one open connection")
CONNECTION_ATTEMPTS = Counter(
    "notifyd_connection_attempts",
    "WebSocket connection attempts by outcome",
    ["outcome"],
)
AUTH_FAILURES = Counter("notifyd_auth_failures", "Refused tokens by reason", ["reason"])
NOTIFICATIONS_RECEIVED = Counter(
    "notifyd_notifications_received",
    "Messages consumed from RabbitMQ by kind",
    ["kind"],
)
FRAMES_DELIVERED = Counter("notifyd_frames_delivered", "Notification frames written to sockets")
NOTIFICATIONS_DROPPED = Counter(
    "notifyd_notifications_dropped",
    "Notifications not delivered, by reason",
    ["reason"],
)
DELIVERY_LATENCY = Histogram(
    "notifyd_delivery_latency_seconds",
    "Time from publish (AMQP timestamp header) to the socket write",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BROKER_CONNECTED = Gauge("notifyd_broker_connected", "1 while the AMQP connection is up")
BROKER_RECONNECTS = Counter("notifyd_broker_reconnects", "AMQP reconnections after a loss")
HEARTBEAT_TIMEOUTS = Counter(
    "notifyd_heartbeat_timeouts",
    "Sockets cut off because they did not answer a ping within one heartbeat interval",
)
SLOW_CONSUMER_DISCONNECTS = Counter(
    "notifyd_slow_consumer_disconnects",
    "Sockets closed with 4009 because their send buffer overflowed",
)
DEAD_LETTERED = Counter(
    "notifyd_dead_lettered",
    "AMQP messages rejected to notifyd.dlx, by reason",
    ["reason"],
)
UPSTREAM_MESSAGES = Counter(
    "notifyd_upstream_messages",
    "Client publish/send messages by outcome",
    ["kind", "result"],
)
BINDINGS = Gauge("notifyd_bindings", "Routing keys bound to this replica's queue")
HISTORY_READS = Counter(
    "notifyd_history_reads", "Reads of the shared history stream (each serves a batch of resumes)"
)
RESUMES = Counter("notifyd_resumes", "Resume requests by outcome", ["outcome"])
CLOSES = Counter("notifyd_closes", "Sockets closed by the server, by close code", ["code"])
READY = Gauge("notifyd_ready", "1 while /readyz answers 200")
DRAINING = Gauge("notifyd_draining", "1 while the server is draining for shutdown")
ACKS = Counter("notifyd_client_acks", "Notification acks received from clients")
RECEIPTS = Counter("notifyd_receipts", "Delivery receipts published, by outcome", ["outcome"])
GC_PAUSE = Histogram(
    "notifyd_gc_pause_seconds",
    "Collections run by notifyd's collector policy, by action (young, freeze, full)",
    ["action"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
GC_TRACKED = Gauge(
    "notifyd_gc_tracked_objects",
    "Objects the cycle collector tracks, frozen ones included (read at scrape time)",
)
MALFORMED_REQUESTS = Counter(
    "notifyd_malformed_requests",
    "HTTP requests aiohttp could not parse, by kind (refused; their text is never logged)",
    ["kind"],
)
PENDING_SOCKETS = Gauge(
    "notifyd_pending_sockets", "Sockets upgraded but not yet authenticated (or refused)"
)
CLIENT_ERRORS = Counter(
    "notifyd_client_errors",
    "error messages sent to clients for messages they sent, by error code",
    ["code"],
)
HTTP_CONNECTIONS = Gauge(
    "notifyd_http_connections",
    "TCP connections aiohttp serves as HTTP: requests in progress, idle keep-alive, and"
    " clients still sending their request (WebSockets leave it after the upgrade)",
)
