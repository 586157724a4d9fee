"""The cluster-wide admin and presence API (service key), over :class:`ClusterLink`.

``GET /api/presence?user=a&user=b``, ``GET /api/stats``: a live query to every
replica, merged; ``POST /api/disconnect`` and ``POST /api/revoke``: control
messages every replica consumes (and the stream ``notifyd.revocations`` keeps),
published with confirms before the answer.
"""

from __future__ import annotations

import hmac
import math
import time
from typing import Any, Final

from aiohttp import web

from .cluster import ClusterLink, QueryResult
from .errors import BrokerUnavailable
from .protocol import MAX_ID_LENGTH, JSONDecodeError, loads, valid_name
from .responses import json_error

#: Users one presence query may ask about (a URL of ~8 KB holds a few hundred ids).
MAX_PRESENCE_USERS: Final = 500
#: Token ids one revocation may list.
MAX_REVOKE_IDS: Final = 1000
#: A revocation without ``until`` lasts this long (as a control message without one).
DEFAULT_REVOCATION_SECONDS: Final = 86_400.0


def _partial(body: dict[str, Any], result: QueryResult) -> dict[str, Any]:
    """Say which replicas did not answer in time, rather than hang on them."""
    body["partial"] = result.partial
    if result.partial:
        body["missing"] = result.missing
    return body


class AdminApi:
    def __init__(
        self, cluster: ClusterLink, service_keys: tuple[str, ...], revocation_max_age: float
    ) -> None:
        self.cluster = cluster
        self.service_keys = service_keys
        self.revocation_max_age = revocation_max_age

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/presence", self.presence)
        app.router.add_get("/api/stats", self.stats)
        app.router.add_post("/api/disconnect", self.disconnect)
        app.router.add_post("/api/revoke", self.revoke)

    def _refused(self, request: web.Request) -> web.Response | None:
        """None for a request with a valid service key, else the answer to it."""
        if not self.service_keys:
            return json_error(403, "disabled", "no [api] service_keys are configured")
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.service_keys
        ):
            return json_error(401, "unauthorized", "a valid service key is required")
        return None

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = loads(await request.read())
        except JSONDecodeError:
            return json_error(400, "bad_json", "body must be JSON")
        if not isinstance(body, dict):
            return json_error(400, "bad_body", "body must be a JSON object")
        return body

    async def presence(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        users = list(dict.fromkeys(request.query.getall("user", [])))
        if not users:
            return json_error(400, "bad_query", "name at least one user: ?user=a&user=b")
        if len(users) > MAX_PRESENCE_USERS:
            return json_error(400, "bad_query", f"at most {MAX_PRESENCE_USERS} users per query")
        if not all(valid_name(u) for u in users):
            return json_error(400, "bad_query", "each 'user' must be a valid user id")
        try:
            merged, result = await self.cluster.presence(users)
        except BrokerUnavailable as exc:
            return json_error(503, "broker_unavailable", str(exc))
        return web.json_response(_partial({"users": merged}, result))

    async def stats(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            merged, result = await self.cluster.stats()
        except BrokerUnavailable as exc:
            return json_error(503, "broker_unavailable", str(exc))
        return web.json_response(_partial(merged, result))

    async def disconnect(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        user = body.get("user")
        if not valid_name(user):
            return json_error(400, "bad_body", "'user' must be a valid user id")
        try:
            await self.cluster.disconnect(user)
        except BrokerUnavailable as exc:
            return json_error(503, "broker_unavailable", str(exc))
        return web.json_response({"user": user, "status": "accepted"}, status=202)

    async def revoke(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        token_ids = body.get("jti")
        if isinstance(token_ids, str):
            token_ids = [token_ids]
        if (
            not isinstance(token_ids, list)
            or not token_ids
            or not all(isinstance(t, str) and 0 < len(t) <= MAX_ID_LENGTH for t in token_ids)
        ):
            return json_error(
                400, "bad_body", "'jti' must be a token id or a list of them (1..128 characters)"
            )
        if len(token_ids) > MAX_REVOKE_IDS:
            return json_error(400, "bad_body", f"at most {MAX_REVOKE_IDS} token ids per request")
        now = time.time()
        until = body.get("until", now + DEFAULT_REVOCATION_SECONDS)
        if (
            not isinstance(until, int | float)
            or isinstance(until, bool)
            or not math.isfinite(until)
        ):
            return json_error(400, "bad_body", "'until' must be a unix time in seconds")
        if until <= now:
            return json_error(400, "bad_body", "'until' has passed: nothing to revoke")
        token_ids = list(dict.fromkeys(token_ids))
        try:
            await self.cluster.revoke(token_ids, float(until))
        except BrokerUnavailable as exc:
            return json_error(503, "broker_unavailable", str(exc))
        answer: dict[str, Any] = {"jti": token_ids, "until": until, "status": "revoked"}
        if until > now + self.revocation_max_age:
            answer["warning"] = (
                "lasts past [auth] revocation_max_age: replicas started after that will not know it"
            )
        return web.json_response(answer)
