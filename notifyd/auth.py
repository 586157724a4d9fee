"""Token checks: who a socket belongs to and what it may read and publish.

:func:`decode_identity` is pure (token + key + clock in, :class:`Identity` or
:class:`AuthError` out). :class:`TokenVerifier` adds the key source: a shared
secret, a PEM public key, or a JWKS URL fetched asynchronously with a cache and a
refetch cooldown, so a token with an unknown ``kid`` can never make notifyd
hammer the identity provider or block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import jwt

from .config import AuthSettings
from .protocol import valid_name

log = logging.getLogger(__name__)


class AuthError(Exception):
    """A token was refused; ``reason`` is the metric label, the message is for the log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Grants:
    """Topic names a token lists: exact names, or ``prefix.*`` for a whole family."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def parse(cls, value: object, claim: str) -> Grants:
        if value is None:
            return NO_GRANTS  # shared: most tokens grant nothing, and each socket keeps its own
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise AuthError("claims", f"claim '{claim}' must be a list of topic names")
        exact, prefixes = set(), []
        for name in value:
            if name.endswith(".*") and valid_name(name[:-2]):
                prefixes.append(name[:-1])  # keep the dot: "chat." matches "chat.room1"
            elif valid_name(name):
                exact.add(name)
            else:
                raise AuthError("claims", f"claim '{claim}' has an invalid topic name")
        return cls(frozenset(exact), tuple(prefixes))

    def allows(self, topic: str) -> bool:
        return topic in self.exact or any(topic.startswith(p) for p in self.prefixes)


NO_GRANTS: Final = Grants(frozenset(), ())


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified token says about its holder."""

    user: str
    expires_at: float
    topics: Grants
    publish: Grants
    token_id: str | None = None


def decode_identity(
    token: str,
    key: Any,
    settings: AuthSettings,
    now: float | None = None,
) -> Identity:
    """Verify ``token`` with ``key`` and return the identity it carries.

    Pure: the clock is a parameter. Refuses ``alg: none`` and any algorithm outside
    the allow-list (which also rules out HS/RS key confusion), unknown ``crit``
    headers, a missing or past ``exp``, a future ``nbf``/``iat``, a wrong ``aud`` or
    ``iss``, and a user id that could widen an AMQP binding.
    """
    try:
        claims = _decode_at(token, key, settings, time.time() if now is None else now)
    except jwt.ExpiredSignatureError:
        raise AuthError("expired", "token has expired") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("not_yet_valid", "token is not valid yet (nbf/iat)") from None
    except jwt.InvalidAudienceError:
        raise AuthError("audience", "token audience does not match") from None
    except jwt.InvalidIssuerError:
        raise AuthError("issuer", "token issuer does not match") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError("algorithm", "token algorithm is not allowed") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError("claims", f"token lacks required claim '{exc.claim}'") from None
    except jwt.InvalidSignatureError:
        raise AuthError("signature", "token signature does not verify") from None
    except (jwt.InvalidKeyError, jwt.PyJWKError):
        raise AuthError("algorithm", "token does not fit the configured key") from None
    except jwt.DecodeError:
        raise AuthError("malformed", "token is malformed") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError("claims", f"token refused: {exc}") from None
    return _identity(claims, settings)


def _decode_at(token: str, key: Any, settings: AuthSettings, now: float) -> dict[str, Any]:
    """Signature, algorithm, ``aud`` and ``iss`` by PyJWT; time claims against ``now``."""
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=list(settings.algorithms),
        audience=settings.audience or None,
        issuer=settings.issuer or None,
        options={
            "require": ["exp"],
            "verify_aud": bool(settings.audience),
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        },
    )
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise jwt.DecodeError("exp must be a number")
    if exp + settings.leeway <= now:
        raise jwt.ExpiredSignatureError
    for claim in ("nbf", "iat"):
        value = claims.get(claim)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise jwt.DecodeError(f"{claim} must be a number")
        if value > now + settings.leeway:
            raise jwt.ImmatureSignatureError
    return claims


def _identity(claims: Mapping[str, Any], settings: AuthSettings) -> Identity:
    user = claims.get(settings.user_claim)
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    if not valid_name(user):
        raise AuthError("user_id", f"claim '{settings.user_claim}' is not a valid user id")
    assert isinstance(user, str)
    token_id = claims.get("jti")
    return Identity(
        user=user,
        expires_at=float(claims["exp"]),
        topics=Grants.parse(claims.get(settings.topics_claim), settings.topics_claim),
        publish=Grants.parse(claims.get(settings.publish_claim), settings.publish_claim),
        token_id=token_id if isinstance(token_id, str) else None,
    )


class _Jwks:
    """A JWKS URL's keys, fetched without blocking and at most once per cooldown."""

    def __init__(self, url: str, cooldown: float, ttl: float) -> None:
        self.url = url
        self.cooldown = cooldown
        self.ttl = ttl
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._inflight: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        stale = now - self._fetched_at > self.ttl
        if (kid not in self._keys or stale) and now - self._attempted_at >= self.cooldown:
            await self._refresh()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid is None or kid not in self._keys:
            raise AuthError("jwks", "token key id is not in the JWKS")
        return self._keys[kid]

    async def _refresh(self) -> None:
        # Concurrent sockets with the same unknown kid share one request.
        if self._inflight is None or self._inflight.done():
            self._attempted_at = time.monotonic()
            self._inflight = asyncio.create_task(self._fetch())
        await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._http.get(self.url) as response:
                response.raise_for_status()
                document = await response.json(content_type=None)
            keyset = jwt.PyJWKSet.from_dict(document)
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWKSetError) as exc:
            log.warning(
                "JWKS fetch from %s failed: %s; keeping %d cached keys",
                self.url,
                exc,
                len(self._keys),
            )
            return
        self._keys = {k.key_id: k for k in keyset.keys if k.key_id is not None}
        if not self._keys and keyset.keys:
            self._keys = {"": keyset.keys[0]}
        self._fetched_at = time.monotonic()
        log.info("JWKS fetched from %s: %d keys", self.url, len(self._keys))

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._http is not None:
            await self._http.close()


def _load_public_key(value: str) -> str:
    if value.lstrip().startswith("-----BEGIN"):
        return value
    return Path(value).read_text()


class TokenVerifier:
    """Verifies tokens with the configured key source and a revocation list."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._key: Any = None
        self._jwks: _Jwks | None = None
        if settings.jwks_url:
            self._jwks = _Jwks(settings.jwks_url, settings.jwks_cooldown, settings.jwks_cache_ttl)
        elif settings.public_key:
            self._key = _load_public_key(settings.public_key)
        else:
            self._key = settings.secret
        #: Revoked token ids and when they may be forgotten (their own exp).
        self._revoked: dict[str, float] = {}

    async def verify(self, token: str, now: float | None = None) -> Identity:
        key = self._key
        if self._jwks is not None:
            try:
                kid = jwt.get_unverified_header(token).get("kid")
            except jwt.DecodeError:
                raise AuthError("malformed", "token is malformed") from None
            key = await self._jwks.key_for(kid if isinstance(kid, str) else None)
        identity = decode_identity(token, key, self.settings, now)
        if identity.token_id is not None and identity.token_id in self._revoked:
            raise AuthError("revoked", "token has been revoked")
        return identity

    def revoke(self, token_ids: Iterable[str], until: float) -> None:
        """Refuse these token ids from now on (until ``until``, their expiry)."""
        now = time.time()
        self._revoked = {t: u for t, u in self._revoked.items() if u > now}
        for token_id in token_ids:
            self._revoked[token_id] = until

    def is_revoked(self, token_id: str | None) -> bool:
        return token_id is not None and token_id in self._revoked

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()


def mint_token(
    secret: str,
    user: str,
    ttl: float = 3600,
    topics: Iterable[str] = (),
    publish: Iterable[str] = (),
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A signed HS* token for development and tests (``notifyd token``, /demo/token)."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user, "iat": now, "exp": now + int(ttl), **claims}
    if topics:
        payload["topics"] = list(topics)
    if publish:
        payload["publish"] = list(publish)
    return jwt.encode(payload, secret, algorithm=algorithm)
