"""Settings: one TOML file, overridden by ``NOTIFYD_<SECTION>_<KEY>`` and CLI flags.

Every key has a default (see ``config.example.toml``); a bad value fails at start
with a :class:`ConfigError` that names the key and where the value came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "NOTIFYD_"
#: What ``check-config`` and error messages show instead of a credential.
REDACTED = "***"
#: Field metadata: the whole value is a credential, or a URL whose password is one.
_CREDENTIAL: Mapping[str, str] = {"redact": "value"}
_URL_WITH_PASSWORD: Mapping[str, str] = {"redact": "url"}


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Serve /metrics on this separate port too (0: only on the main port).
    metrics_port: int = 0
    #: Worker processes sharing the port with SO_REUSEPORT.
    workers: int = 1
    #: Sockets are closed with 1001 spread over this window on shutdown.
    drain_seconds: float = 5.0
    #: Hard limit for the whole shutdown, after which the process exits anyway.
    shutdown_timeout: float = 25.0
    #: Sockets one process accepts before answering 1013.
    max_connections: int = 50_000
    #: Seconds a new TCP connection has to send a whole HTTP request (and an idle
    #: keep-alive connection stays open): slow or silent clients are cut off.
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class AmqpSettings:
    url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", metadata=_URL_WITH_PASSWORD)
    #: The nodes of a RabbitMQ cluster, tried in turn (a lost connection moves on to
    #: the next one); when set, ``url`` is not used.
    urls: tuple[str, ...] = field(default=(), metadata=_URL_WITH_PASSWORD)
    #: "quorum" (replicated: survives the loss of a cluster node) or "classic", for
    #: the replica queues and notifyd.dead.
    queue_type: str = "quorum"
    #: Seconds without a broker connection after which every socket is closed with
    #: 1001, so that its client resumes on a replica that has one (0: never).
    close_sockets_after: float = 0.0
    #: Unacknowledged deliveries the consumer may hold.
    prefetch: int = 2000
    #: Seconds the replica queue outlives a lost connection (x-expires).
    queue_expires: float = 60.0
    reconnect_min: float = 0.5
    reconnect_max: float = 15.0
    #: Names this replica's queue; empty: ``<hostname>-<pid>``.
    replica_id: str = ""
    #: Largest AMQP body accepted; larger ones are dead-lettered.
    max_body_size: int = 262_144
    #: Seconds a message_id is remembered to drop duplicates.
    dedupe_window: float = 120.0
    #: Bounds of the dead-letter queue notifyd.dead (oldest dropped first); 0: no bound.
    dead_letter_max_length: int = 100_000
    dead_letter_max_bytes: int = 104_857_600
    #: Declare the queue notifyd.offline (bound ``#`` to the exchange notifyd.offline),
    #: so that offline notifications are kept until e.g. ``notifyd webpush`` takes them.
    offline_queue: bool = True
    #: Bound of the queues notifyd.unrouted and notifyd.offline (oldest dropped first):
    #: with no replica or no offline consumer running they would grow without end. 0: none.
    offline_max_length: int = 1_000_000

    @property
    def node_urls(self) -> tuple[str, ...]:
        """The URLs to connect to, in the order they are tried first."""
        return self.urls or (self.url,)


@dataclass(frozen=True)
class AuthSettings:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str = field(default="", metadata=_CREDENTIAL)
    #: PEM text or a path to a PEM file.
    public_key: str = ""
    jwks_url: str = field(default="", metadata=_URL_WITH_PASSWORD)
    audience: str = ""
    issuer: str = ""
    leeway: float = 5.0
    user_claim: str = "sub"
    topics_claim: str = "topics"
    publish_claim: str = "publish"
    #: Accept ?token= on /ws. Off by default: URLs end up in logs.
    query_token: bool = False
    #: Seconds a socket may stay unauthenticated.
    auth_timeout: float = 10.0
    #: Seconds between JWKS refetches triggered by an unknown key id.
    jwks_cooldown: float = 30.0
    #: Seconds a fetched JWKS is trusted.
    jwks_cache_ttl: float = 600.0
    #: Seconds the stream notifyd.revocations keeps revocations (x-max-age).
    revocation_max_age: float = 604_800.0


@dataclass(frozen=True)
class WsSettings:
    #: Exact Origin values accepted; empty accepts any Origin.
    allowed_origins: tuple[str, ...] = ()
    max_message_size: int = 65_536
    #: Seconds between server pings; a peer that misses a pong is dropped.
    heartbeat: float = 25.0
    max_connections_per_user: int = 20
    #: Bytes queued for one socket before it is closed with 4009.
    send_buffer_bytes: int = 1_048_576
    #: Seconds before ``exp`` at which ``refresh_required`` is sent.
    refresh_before: float = 30.0
    #: Client messages per second per socket (token bucket) before 4029.
    rate_limit: float = 20.0
    rate_burst: int = 40
    #: Seconds a user/topic binding is kept after its last socket left.
    binding_grace: float = 5.0
    #: Sockets upgraded but not yet authenticated, in total and from one client
    #: address; past either, upgrades are refused with 503 (0: no per-address cap).
    max_pending: int = 10_000
    max_pending_per_address: int = 100
    #: Topics one socket may subscribe to (each may cost a RabbitMQ binding), and one
    #: user over all their sockets on a replica.
    max_topics: int = 100
    max_topics_per_user: int = 200


@dataclass(frozen=True)
class HistorySettings:
    #: "memory" (one process), "stream" (shared by replicas) or "off".
    backend: str = "memory"
    max_per_user: int = 100
    #: Seconds a notification stays resumable.
    max_age: float = 300.0
    #: Total notifications kept in memory, across channels.
    max_total: int = 200_000
    #: Seconds of the stream read for a resume point that carries no time (a
    #: publisher's own message_id without since_ts): bounds what one resume costs.
    scan_without_time: float = 60.0
    #: Notifications one history page (GET /api/history, the ``history`` message) may
    #: ask for (``limit``).
    page_max: int = 200


@dataclass(frozen=True)
class ApiSettings:
    #: Keys accepted by POST /api/publish as ``Authorization: Bearer <key>``.
    service_keys: tuple[str, ...] = field(default=(), metadata=_CREDENTIAL)
    max_body_size: int = 262_144


@dataclass(frozen=True)
class DemoSettings:
    #: Serve /demo and the dev-only /demo/token, /demo/publish and /demo/presence.
    #: Never in production.
    enabled: bool = False


@dataclass(frozen=True)
class ClusterSettings:
    """What the replicas tell each other on ``notifyd.cluster`` (see notifyd.cluster)."""

    #: Seconds between a replica's beacons; one that misses 3 is presumed gone.
    beacon_interval: float = 2.0
    #: Seconds a cluster query (/api/presence, /api/stats) waits for every live
    #: replica's answer; past it, the answer says which replicas are missing.
    query_timeout: float = 0.25
    #: Seconds the stream notifyd.presence.log keeps presence transitions (x-max-age):
    #: how far back a replica that takes over the transitions looks for who is online.
    presence_log_max_age: float = 86_400.0


@dataclass(frozen=True)
class SseSettings:
    """Server-Sent Events: ``GET /sse``, ``POST /api/sse-ticket``, ``POST /api/messages``."""

    enabled: bool = True
    #: Key material for SSE tickets (any string; a key is derived from it). Every
    #: replica behind one load balancer needs the same. Empty: derived from
    #: ``[auth] secret`` when that is set, else random per process (tickets are then
    #: only valid on the replica that issued them).
    ticket_secret: str = field(default="", metadata=_CREDENTIAL)
    #: Seconds a ticket may be redeemed after it was issued.
    ticket_ttl: float = 30.0


#: Push services of the major browsers (Chrome/Edge/Opera via FCM, Firefox, Windows,
#: Safari): a host name, or a suffix starting with a dot.
PUSH_SERVICE_HOSTS: tuple[str, ...] = (
    "fcm.googleapis.com",
    "android.googleapis.com",
    ".push.services.mozilla.com",
    ".notify.windows.com",
    "web.push.apple.com",
)


@dataclass(frozen=True)
class WebPushSettings:
    """``notifyd webpush`` and the gateway's /api/push routes (see notifyd.webpush)."""

    #: Where push subscriptions are kept: ``sqlite:///relative/path.sqlite3``,
    #: ``sqlite:////absolute/path.sqlite3`` or ``postgresql://user:password@host/db``.
    database_url: str = field(default="sqlite:///notifyd-push.sqlite3", metadata=_URL_WITH_PASSWORD)
    #: The VAPID private key (RFC 8292): PEM text or a path to a PEM file. Empty: Web
    #: Push is off (no /api/push routes, ``notifyd webpush`` refuses to start).
    vapid_private_key: str = field(default="", metadata=_CREDENTIAL)
    #: Contact for push services (``mailto:`` or ``https:``), the VAPID JWT's ``sub``.
    vapid_subject: str = ""
    #: Attempts per subscription before a notification is dead-lettered.
    max_attempts: int = 5
    #: Retry backoff, doubling from retry_min to retry_max seconds, with jitter.
    retry_min: float = 1.0
    retry_max: float = 60.0
    #: Seconds a push service keeps a message for a device that is offline (TTL).
    ttl: int = 86_400
    #: RFC 8030 Urgency: "very-low", "low", "normal" or "high".
    urgency: str = "normal"
    #: Push requests in flight at once (also the worker's AMQP prefetch).
    concurrency: int = 64
    #: Seconds one request to a push service may take.
    request_timeout: float = 10.0
    #: Hosts a subscription endpoint may point at (a ``.suffix`` matches subdomains);
    #: empty: any https host. Keeps users from making the worker post anywhere else.
    endpoint_hosts: tuple[str, ...] = PUSH_SERVICE_HOSTS
    #: Accept http:// endpoints (a local test push service only; never in production).
    allow_http: bool = False
    #: Subscriptions kept per user (browsers, devices); the oldest goes first.
    max_subscriptions_per_user: int = 10


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    amqp: AmqpSettings = field(default_factory=AmqpSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ws: WsSettings = field(default_factory=WsSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    demo: DemoSettings = field(default_factory=DemoSettings)
    webpush: WebPushSettings = field(default_factory=WebPushSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    sse: SseSettings = field(default_factory=SseSettings)

    def replace(self, section: str, **values: Any) -> Settings:
        """A copy with some keys of one section changed (validated again)."""
        raw = to_dict(self)
        _merge(raw, {section: values}, "override")
        return _build(raw)


def _section_class(name: str) -> type[Any]:
    cls: type[Any] = typing.get_type_hints(Settings)[name]
    return cls


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))
_HINTS: dict[str, dict[str, Any]] = {
    name: typing.get_type_hints(_section_class(name)) for name in SECTIONS
}
#: ``{section: {key: "value" or "url"}}`` for the keys that hold credentials.
_REDACT: dict[str, dict[str, str]] = {
    name: {
        f.name: f.metadata["redact"]
        for f in dataclasses.fields(_section_class(name))
        if "redact" in f.metadata
    }
    for name in SECTIONS
}


def redact_url(url: str) -> str:
    """The URL with its password masked, for logs and ``check-config``."""
    scheme, separator, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not separator or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:{REDACTED}@{host}"


def redacted(settings: Settings) -> dict[str, dict[str, Any]]:
    """:func:`to_dict` with every credential masked (an unset one stays empty)."""
    raw = to_dict(settings)
    for section, keys in _REDACT.items():
        for key, kind in keys.items():
            value = raw[section][key]
            if kind == "url" and isinstance(value, tuple):
                raw[section][key] = tuple(redact_url(url) for url in value)
            elif kind == "url":
                raw[section][key] = redact_url(value)
            elif isinstance(value, tuple):
                raw[section][key] = tuple(REDACTED for _ in value)
            elif value:
                raw[section][key] = REDACTED
    return raw


def _coerce(key: str, value: Any, hint: Any, source: str, redact: str | None = None) -> Any:
    """Turn a TOML or environment value into the type the key declares."""

    def fail(expected: str) -> ConfigError:
        # The message ends up on a terminal or in a log: never with a credential in it.
        if redact == "value":
            got = "got a value not shown here (a credential)"
        elif redact == "url" and isinstance(value, str):
            got = f"got {redact_url(value)!r}"
        elif redact == "url" and isinstance(value, list | tuple):
            got = f"got {[redact_url(v) if isinstance(v, str) else v for v in value]!r}"
        else:
            got = f"got {value!r}"
        return ConfigError(f"{key}: expected {expected}, {got} (from {source})")

    from_env = isinstance(value, str) and source.startswith(ENV_PREFIX)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.lower() in {"1", "true", "yes", "on"}:
            return True
        if from_env and value.lower() in {"0", "false", "no", "off", ""}:
            return False
        raise fail("true or false")
    if hint is int or hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if hint is int and not isinstance(value, int):
                raise fail("an integer")
            return hint(value)
        if from_env:
            try:
                return hint(value)
            except ValueError:
                raise fail("an integer" if hint is int else "a number") from None
        raise fail("an integer" if hint is int else "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if typing.get_origin(hint) is tuple:
        if from_env:
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise fail("a JSON list or comma-separated strings") from None
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise fail("a list of strings")
    raise AssertionError(f"unsupported type for {key}: {hint}")  # pragma: no cover


def _merge(raw: dict[str, dict[str, Any]], values: Mapping[str, Any], source: str) -> None:
    """Check one source's ``{section: {key: value}}`` and lay it over ``raw``."""
    for section, keys in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"[{section}]: unknown section (from {source})")
        if not isinstance(keys, Mapping):
            raise ConfigError(f"[{section}]: expected a table (from {source})")
        hints = _HINTS[section]
        for key, value in keys.items():
            if key not in hints:
                raise ConfigError(f"[{section}] {key}: unknown key (from {source})")
            origin = f"{ENV_PREFIX}{section}_{key}".upper() if source == "env" else source
            raw[section][key] = _coerce(
                f"[{section}] {key}", value, hints[key], origin, _REDACT[section].get(key)
            )


def _build(raw: Mapping[str, Mapping[str, Any]]) -> Settings:
    settings = Settings(**{name: _section_class(name)(**raw[name]) for name in SECTIONS})
    validate(settings)
    return settings


def from_mapping(values: Mapping[str, Any], source: str = "config") -> Settings:
    """Validated settings from ``{section: {key: value}}`` laid over the defaults."""
    raw = to_dict(Settings())
    _merge(raw, values, source)
    return _build(raw)


def to_dict(settings: Settings) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(settings, name)) for name in SECTIONS}


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Collect ``NOTIFYD_<SECTION>_<KEY>`` variables; unknown ones are an error."""
    found: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS or key not in _HINTS[section]:
            raise ConfigError(f"{name}: no such setting (expected NOTIFYD_<SECTION>_<KEY>)")
        found.setdefault(section, {})[key] = value
    return found


def load(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Defaults, then the TOML file, then the environment, then CLI overrides."""
    raw = to_dict(Settings())
    if path is not None:
        try:
            with open(path, "rb") as fh:
                _merge(raw, tomllib.load(fh), str(path))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _merge(raw, env_overrides(os.environ if environ is None else environ), "env")
    if overrides:
        _merge(raw, overrides, "command line")
    return _build(raw)


_ALGORITHMS = {
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
}  # fmt: skip


#: RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
HS_KEY_BYTES: Mapping[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}
#: Fragments that mark a value copied from an example instead of generated, matched
#: in lower case with everything but letters and digits dropped ("Change_Me" too).
_PLACEHOLDER_MARKERS = ("changeme", "changeit", "replaceme", "placeholder", "yoursecret")
_GENERATE_HINT = "generate one, e.g. `openssl rand -hex 32`"


def _repeats(text: str) -> bool:
    """True for one phrase said twice or more ("secretsecret", "aaaa")."""
    return len(text) > 1 and text in (text + text)[1:-1]


def placeholder_problem(value: str) -> str | None:
    """Why ``value`` looks like an example rather than a credential, or None."""
    folded = "".join(c for c in value.lower() if c.isascii() and c.isalnum())
    for marker in _PLACEHOLDER_MARKERS:
        if marker in folded:
            return f"looks like a placeholder (contains {marker!r})"
    if _repeats(folded) or _repeats(value):
        return "looks like a placeholder (one phrase repeated)"
    return None


def hs_secret_problem(secret: str, algorithms: Iterable[str]) -> str | None:
    """Why ``secret`` is too weak to sign ``algorithms``' HS* tokens, or None.

    A short or guessable key lets anyone brute-force it offline from one token and
    then forge tokens for any user.
    """
    needed = {alg: HS_KEY_BYTES[alg] for alg in algorithms if alg in HS_KEY_BYTES}
    if not needed:
        return None
    strongest = max(needed, key=needed.__getitem__)
    size = len(secret.encode())
    if size < needed[strongest]:
        return (
            f"{size} bytes is too short for {strongest}: it needs at least "
            f"{needed[strongest]} (RFC 7518 §3.2); {_GENERATE_HINT}"
        )
    problem = placeholder_problem(secret)
    return f"{problem}; {_GENERATE_HINT}" if problem else None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def require_token_keys(settings: Settings) -> None:
    """Refuse to serve without a key to verify tokens with.

    :func:`validate` checks the keys that are set; only commands that verify tokens
    (``serve``) need one to be set, so ``publish``, ``upstream`` and ``check-config``
    work without.
    """
    auth = settings.auth
    if any(a.startswith("HS") for a in auth.algorithms):
        _check(
            bool(auth.secret), "[auth] secret: required for HS* algorithms (NOTIFYD_AUTH_SECRET)"
        )
    else:
        _check(
            bool(auth.public_key or auth.jwks_url),
            "[auth] public_key: set public_key or jwks_url for RS*/ES*/PS*/EdDSA",
        )


def validate(settings: Settings) -> None:
    """Cross-key checks; each message names the key at fault."""
    s = settings
    _check(0 < s.server.port < 65536, "[server] port: must be 1..65535")
    _check(0 <= s.server.metrics_port < 65536, "[server] metrics_port: must be 0..65535")
    _check(s.server.workers >= 1, "[server] workers: must be at least 1")
    _check(s.server.drain_seconds >= 0, "[server] drain_seconds: must be >= 0")
    _check(
        s.server.shutdown_timeout > s.server.drain_seconds,
        "[server] shutdown_timeout: must be larger than drain_seconds",
    )
    _check(s.server.max_connections >= 1, "[server] max_connections: must be at least 1")
    _check(s.server.handshake_timeout > 0, "[server] handshake_timeout: must be > 0")
    _check(s.history.scan_without_time > 0, "[history] scan_without_time: must be > 0")
    _check(s.ws.max_pending >= 1, "[ws] max_pending: must be at least 1")
    _check(0 < s.sse.ticket_ttl <= 3600, "[sse] ticket_ttl: must be > 0 and <= 3600")
    _check(s.ws.max_pending_per_address >= 0, "[ws] max_pending_per_address: must be >= 0")
    _check(s.ws.max_topics >= 0, "[ws] max_topics: must be >= 0")
    _check(s.ws.max_topics_per_user >= 0, "[ws] max_topics_per_user: must be >= 0")
    _check(
        s.amqp.url.startswith(("amqp://", "amqps://")), "[amqp] url: must be amqp:// or amqps://"
    )
    for url in s.amqp.urls:
        _check(
            url.startswith(("amqp://", "amqps://")),
            f"[amqp] urls: {redact_url(url)!r} is not an amqp:// or amqps:// URL",
        )
    _check(
        s.amqp.queue_type in {"quorum", "classic"},
        "[amqp] queue_type: must be 'quorum' or 'classic'",
    )
    _check(s.amqp.close_sockets_after >= 0, "[amqp] close_sockets_after: must be >= 0")
    _check(s.amqp.prefetch >= 1, "[amqp] prefetch: must be at least 1")
    _check(s.amqp.queue_expires >= 1, "[amqp] queue_expires: must be at least 1 second")
    _check(
        0 < s.amqp.reconnect_min <= s.amqp.reconnect_max,
        "[amqp] reconnect_min: must be in (0, reconnect_max]",
    )
    _check(s.amqp.max_body_size >= 64, "[amqp] max_body_size: must be at least 64")
    _check(s.amqp.dedupe_window >= 0, "[amqp] dedupe_window: must be >= 0")
    _check(s.amqp.dead_letter_max_length >= 0, "[amqp] dead_letter_max_length: must be >= 0")
    _check(s.amqp.offline_max_length >= 0, "[amqp] offline_max_length: must be >= 0")
    _check(s.amqp.dead_letter_max_bytes >= 0, "[amqp] dead_letter_max_bytes: must be >= 0")
    _check(len(s.auth.algorithms) > 0, "[auth] algorithms: must name at least one algorithm")
    for alg in s.auth.algorithms:
        _check(alg in _ALGORITHMS, f"[auth] algorithms: unsupported algorithm {alg!r}")
    symmetric = any(a.startswith("HS") for a in s.auth.algorithms)
    asymmetric = any(not a.startswith("HS") for a in s.auth.algorithms)
    _check(
        not (symmetric and asymmetric),
        "[auth] algorithms: do not mix HS* with RS*/ES*/PS*/EdDSA (key confusion)",
    )
    if symmetric and s.auth.secret:
        problem = hs_secret_problem(s.auth.secret, s.auth.algorithms)
        _check(problem is None, f"[auth] secret: {problem}")
    _check(
        not (s.auth.public_key and s.auth.jwks_url),
        "[auth] public_key: set only one of public_key or jwks_url",
    )
    if s.auth.jwks_url:
        _check(
            s.auth.jwks_url.startswith(("https://", "http://")),
            "[auth] jwks_url: must be an http(s) URL",
        )
    _check(s.auth.leeway >= 0, "[auth] leeway: must be >= 0")
    _check(s.auth.auth_timeout > 0, "[auth] auth_timeout: must be > 0")
    _check(s.auth.revocation_max_age >= 60, "[auth] revocation_max_age: must be at least 60")
    _check(bool(s.auth.user_claim), "[auth] user_claim: must not be empty")
    _check(s.ws.max_message_size >= 256, "[ws] max_message_size: must be at least 256")
    _check(s.ws.heartbeat >= 0, "[ws] heartbeat: must be >= 0")
    _check(s.ws.max_connections_per_user >= 1, "[ws] max_connections_per_user: must be at least 1")
    _check(s.ws.send_buffer_bytes >= 1024, "[ws] send_buffer_bytes: must be at least 1024")
    _check(s.ws.rate_limit > 0, "[ws] rate_limit: must be > 0")
    _check(s.ws.rate_burst >= 1, "[ws] rate_burst: must be at least 1")
    _check(s.ws.binding_grace >= 0, "[ws] binding_grace: must be >= 0")
    _check(s.ws.refresh_before >= 0, "[ws] refresh_before: must be >= 0")
    for origin in s.ws.allowed_origins:
        _check(
            "://" in origin,
            f"[ws] allowed_origins: {origin!r} is not an origin like https://app.example",
        )
    _check(
        s.history.backend in {"memory", "stream", "off"},
        "[history] backend: must be 'memory', 'stream' or 'off'",
    )
    _check(s.history.max_per_user >= 1, "[history] max_per_user: must be at least 1")
    _check(s.history.max_age > 0, "[history] max_age: must be > 0")
    _check(s.history.page_max >= 1, "[history] page_max: must be at least 1")
    _check(
        s.history.max_total >= s.history.max_per_user,
        "[history] max_total: must be >= max_per_user",
    )
    for key in s.api.service_keys:
        _check(len(key) >= 8, "[api] service_keys: each key must be at least 8 characters")
        problem = placeholder_problem(key)
        _check(problem is None, f"[api] service_keys: a key {problem}; {_GENERATE_HINT}")
    _validate_webpush(s.webpush)
    _check(s.cluster.beacon_interval > 0, "[cluster] beacon_interval: must be > 0")
    _check(s.cluster.query_timeout > 0, "[cluster] query_timeout: must be > 0")
    _check(s.cluster.presence_log_max_age >= 60, "[cluster] presence_log_max_age: must be >= 60")


def _validate_webpush(w: WebPushSettings) -> None:
    _check(
        w.database_url.startswith(("sqlite://", "postgresql://", "postgres://")),
        "[webpush] database_url: must be sqlite:///PATH or postgresql://...",
    )
    _check(
        not w.vapid_subject or w.vapid_subject.startswith(("mailto:", "https://")),
        "[webpush] vapid_subject: must be a mailto: or https:// URL",
    )
    _check(w.max_attempts >= 1, "[webpush] max_attempts: must be at least 1")
    _check(0 < w.retry_min <= w.retry_max, "[webpush] retry_min: must be in (0, retry_max]")
    _check(w.ttl >= 0, "[webpush] ttl: must be >= 0")
    _check(
        w.urgency in {"very-low", "low", "normal", "high"},
        "[webpush] urgency: must be 'very-low', 'low', 'normal' or 'high'",
    )
    _check(w.concurrency >= 1, "[webpush] concurrency: must be at least 1")
    _check(w.request_timeout > 0, "[webpush] request_timeout: must be > 0")
    _check(
        w.max_subscriptions_per_user >= 1,
        "[webpush] max_subscriptions_per_user: must be at least 1",
    )
    for host in w.endpoint_hosts:
        _check(
            bool(host.strip(".")) and "/" not in host and ":" not in host.strip("[]"),
            f"[webpush] endpoint_hosts: {host!r} is not a host name or .suffix",
        )
