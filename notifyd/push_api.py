"""HTTP routes for Web Push: browsers register their push subscriptions here.

- ``GET /api/push/vapid-public-key`` → ``{"publicKey": "<base64url>"}``, the
  ``applicationServerKey`` for ``pushManager.subscribe`` (public, no token).
- ``POST /api/push/subscriptions`` with the user's JWT (``Authorization: Bearer``)
  and the browser's ``PushSubscription.toJSON()``: ``{endpoint, keys: {p256dh, auth}}``.
- ``DELETE /api/push/subscriptions`` with the user's JWT and ``{endpoint}``.
- ``GET /notifyd-sw.js``: the service worker that shows what arrives.

The token is verified by the gateway's own :class:`~notifyd.auth.TokenVerifier`, as a
WebSocket's is (keys, JWKS, audience, issuer, revocations). Errors are JSON
``{"error", "message"}``: 400 invalid subscription, 401 bad token, 413 too big.
Browsers call these from the application's origin: CORS answers the origins
``[ws] allowed_origins`` lists (any origin when it is empty: no cookies are involved,
the token is the credential).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .auth import TokenVerifier
from .config import Settings, WebPushSettings
from .errors import AuthError
from .metrics import Metrics
from .pushstore import PushStore, Subscription, open_until_done
from .responses import json_error
from .vapid import (
    b64url_decode,
    b64url_encode,
    load_private_key,
    parse_public_key,
    public_key_bytes,
)

log = logging.getLogger(__name__)

#: A subscription is ~200-600 bytes (FCM endpoints are the longest).
MAX_BODY = 4096
MAX_ENDPOINT = 2048
#: Seconds a request waits for the database right after start before a 503.
STORE_WAIT = 5.0
STATIC_DIR = Path(__file__).parent / "static"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InvalidSubscription(ValueError):
    """A subscription body that cannot be stored; the message says why (for a 400)."""


def endpoint_allowed(endpoint: str, settings: WebPushSettings) -> str | None:
    """Why ``endpoint`` may not be posted to, or None when it may."""
    try:
        parts = urlsplit(endpoint)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return "'endpoint' is not a URL"
    schemes = ("https", "http") if settings.allow_http else ("https",)
    if parts.scheme not in schemes or not host:
        return "'endpoint' must be an https:// URL"
    if parts.username or parts.password:
        return "'endpoint' must not carry credentials"
    hosts = settings.endpoint_hosts
    if hosts and not any(
        host == allowed.lower() or (allowed.startswith(".") and host.endswith(allowed.lower()))
        for allowed in hosts
    ):
        return "'endpoint' is not on a known push service ([webpush] endpoint_hosts)"
    return None


def parse_subscription(body: Any, user: str, settings: WebPushSettings) -> Subscription:
    """Validate ``PushSubscription.toJSON()``; raises InvalidSubscription."""
    if not isinstance(body, dict):
        raise InvalidSubscription("body must be a JSON object")
    endpoint = body.get("endpoint")
    keys = body.get("keys")
    if not isinstance(endpoint, str) or not 0 < len(endpoint) <= MAX_ENDPOINT:
        raise InvalidSubscription(f"'endpoint' must be a URL of at most {MAX_ENDPOINT} characters")
    problem = endpoint_allowed(endpoint, settings)
    if problem:
        raise InvalidSubscription(problem)
    if not isinstance(keys, dict):
        raise InvalidSubscription("'keys' must be an object with 'p256dh' and 'auth'")
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    try:
        parse_public_key(b64url_decode(p256dh))  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise InvalidSubscription("'keys.p256dh' must be a P-256 public key (base64url)") from None
    try:
        secret = b64url_decode(auth)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        secret = b""
    if len(secret) != 16:
        raise InvalidSubscription("'keys.auth' must be a 16-byte secret (base64url)")
    return Subscription(endpoint=endpoint, user=user, p256dh=p256dh, auth=auth)  # type: ignore[arg-type]


class PushApi:
    """The handlers, bound to a verifier, a store and the settings."""

    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        public_key: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.verifier = verifier
        self.public_key = public_key
        self.store: PushStore | None = None
        self._opened = asyncio.Event()

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """Open the store in the background: the gateway serves its sockets whether or
        not the subscriptions database is up (these routes answer 503 meanwhile)."""
        stopping = asyncio.Event()
        opening = asyncio.get_running_loop().create_task(self._open(stopping))
        yield
        stopping.set()
        if not opening.done():
            opening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await opening
        if self.store is not None:
            await self.store.close()

    async def _open(self, stopping: asyncio.Event) -> None:
        webpush = self.settings.webpush
        self.store = await open_until_done(
            webpush.database_url, webpush.max_subscriptions_per_user, stopping
        )
        self._opened.set()

    async def _ready_store(self) -> PushStore | None:
        """The store, waiting a little for it right after start; None if unreachable."""
        if self.store is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._opened.wait(), STORE_WAIT)
        return self.store

    def _unavailable(self, action: str) -> web.Response:
        self.metrics.webpush_api.labels(action, "error").inc()
        return json_error(503, "unavailable", "the push subscriptions database is not reachable")

    # --- CORS -------------------------------------------------------------------------

    def _cors(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = self.settings.ws.allowed_origins
        if origin and (not allowed or origin in allowed):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    async def preflight(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
        return self._cors(request, response)

    # --- handlers ---------------------------------------------------------------------

    async def public_key_handler(self, request: web.Request) -> web.StreamResponse:
        return self._cors(request, web.json_response({"publicKey": self.public_key}))

    async def _authenticated(
        self, request: web.Request, action: str
    ) -> tuple[str, Any] | web.Response:
        """The user and the JSON body, or the error response to send."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.metrics.webpush_api.labels(action, "unauthorized").inc()
            return json_error(
                401, "unauthorized", "Authorization: Bearer <the user's JWT> is required"
            )
        try:
            identity = await self.verifier.verify(token.strip())
        except AuthError as exc:
            self.metrics.webpush_api.labels(action, "unauthorized").inc()
            return json_error(401, "unauthorized", str(exc))
        if request.content_length is not None and request.content_length > MAX_BODY:
            self.metrics.webpush_api.labels(action, "too_big").inc()
            return json_error(413, "too_big", f"body must be at most {MAX_BODY} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raw = b"x" * (MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            self.metrics.webpush_api.labels(action, "too_big").inc()
            return json_error(413, "too_big", f"body must be at most {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self.metrics.webpush_api.labels(action, "invalid").inc()
            return json_error(400, "bad_json", "body must be JSON")
        return identity.user, body

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        checked = await self._authenticated(request, "subscribe")
        if isinstance(checked, web.Response):
            return self._cors(request, checked)
        user, body = checked
        try:
            subscription = parse_subscription(body, user, self.settings.webpush)
        except InvalidSubscription as exc:
            self.metrics.webpush_api.labels("subscribe", "invalid").inc()
            return self._cors(request, json_error(400, "invalid_subscription", str(exc)))
        store = await self._ready_store()
        if store is None:
            return self._cors(request, self._unavailable("subscribe"))
        try:
            await store.add(subscription)
        except Exception:
            log.exception("cannot store a push subscription")
            self.metrics.webpush_api.labels("subscribe", "error").inc()
            return self._cors(request, json_error(503, "unavailable", "cannot store it right now"))
        self.metrics.webpush_api.labels("subscribe", "ok").inc()
        return self._cors(request, web.json_response({"subscribed": True}, status=201))

    async def unsubscribe(self, request: web.Request) -> web.StreamResponse:
        checked = await self._authenticated(request, "unsubscribe")
        if isinstance(checked, web.Response):
            return self._cors(request, checked)
        user, body = checked
        endpoint = body.get("endpoint") if isinstance(body, dict) else None
        if not isinstance(endpoint, str) or not 0 < len(endpoint) <= MAX_ENDPOINT:
            self.metrics.webpush_api.labels("unsubscribe", "invalid").inc()
            return self._cors(
                request, json_error(400, "invalid_subscription", 'body must be {"endpoint": URL}')
            )
        store = await self._ready_store()
        if store is None:
            return self._cors(request, self._unavailable("unsubscribe"))
        try:
            deleted = await store.remove(user, endpoint)
        except Exception:
            log.exception("cannot delete a push subscription")
            self.metrics.webpush_api.labels("unsubscribe", "error").inc()
            return self._cors(request, json_error(503, "unavailable", "cannot delete it right now"))
        self.metrics.webpush_api.labels("unsubscribe", "ok").inc()
        return self._cors(request, web.json_response({"deleted": deleted}))


async def service_worker(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        STATIC_DIR / "notifyd-sw.js",
        headers={"Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "no-cache"},
    )


def add_push_routes(
    app: web.Application,
    settings: Settings,
    verifier: TokenVerifier,
    metrics: Metrics | None = None,
) -> PushApi | None:
    """Serve /api/push/* and /notifyd-sw.js when ``[webpush] vapid_private_key`` is set.

    The store opens with the app (its cleanup context) and closes with it. Raises
    ConfigError for a key that cannot be loaded, before anything is served.
    """
    if not settings.webpush.vapid_private_key:
        return None
    key = load_private_key(settings.webpush.vapid_private_key)
    PushStore(settings.webpush.database_url)  # a URL it cannot use fails here, not later

    api = PushApi(settings, verifier, b64url_encode(public_key_bytes(key)), metrics)
    app.cleanup_ctx.append(api.lifespan)
    app.router.add_get("/api/push/vapid-public-key", api.public_key_handler)
    app.router.add_post("/api/push/subscriptions", api.subscribe)
    app.router.add_delete("/api/push/subscriptions", api.unsubscribe)
    app.router.add_route("OPTIONS", "/api/push/subscriptions", api.preflight)
    app.router.add_route("OPTIONS", "/api/push/vapid-public-key", api.preflight)
    app.router.add_get("/notifyd-sw.js", service_worker)
    return api
