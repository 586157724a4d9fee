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
from .errors import AuthError
from .lifecycle import cancel_and_wait
from .logs import Throttle
from .protocol import valid_name

log = logging.getLogger(__name__)


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
    #: Users whose presence the holder may watch (claim ``presence``, issue 16.3).
    presence: frozenset[str] = frozenset()


def decode_identity(
    token: str,
    key: Any,
    settings: AuthSettings,
    now: float | None = None,
) -> Identity:
    """Verify ``token`` with ``key`` and return the identity it carries.

    Pure: the clock is a parameter. Refuses ``alg: none`` and any algorithm outside
    the allow-list (which also rules out HS/RS key confusion), unknown ``crit``
    headers, a missing or past ``exp``, a future ``nbf``/``iat``, time claims that
    are not finite unix times, a wrong ``aud`` or ``iss``, and a user id that could
    widen an AMQP binding. Raises only :class:`AuthError`.
    """
    try:
        claims = _decode_at(token, key, settings, time.time() if now is None else now)
    except jwt.PyJWTError as exc:
        raise _refusal(exc) from None
    return _identity(claims, settings)


#: PyJWT's exceptions, most specific first, and what each refusal is counted as.
#: The messages are fixed: PyJWT's own quote the token (e.g. an unknown ``crit``).
_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token is not valid yet (nbf/iat)"),
    (jwt.InvalidAudienceError, "audience", "token audience does not match"),
    (jwt.InvalidIssuerError, "issuer", "token issuer does not match"),
    (jwt.InvalidAlgorithmError, "algorithm", "token algorithm is not allowed"),
    (jwt.InvalidSignatureError, "signature", "token signature does not verify"),
    (jwt.InvalidKeyError, "algorithm", "token does not fit the configured key"),
    (jwt.PyJWKError, "algorithm", "token does not fit the configured key"),
    (jwt.DecodeError, "malformed", "token is malformed"),
)


def _refusal(exc: jwt.PyJWTError) -> AuthError:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        # The claim name comes from notifyd's own options (exp, aud, iss).
        return AuthError("claims", f"token lacks required claim '{exc.claim}'")
    for kind, reason, message in _REFUSALS:
        if isinstance(exc, kind):
            return AuthError(reason, message)
    # Unknown crit, a kid that is not a string, ...: refused, never quoted.
    return AuthError("claims", "token header or claims are not acceptable")


#: Time claims beyond this (9999-12-31) are refused: every later use of them (an
#: integer in ``welcome``, a timer delay) must stay in range.
MAX_UNIX_TIME: Final = 253_402_300_799


def _time_claim(claims: Mapping[str, Any], claim: str) -> float | None:
    """A time claim as a finite number of seconds in range, or None when absent."""
    value = claims.get(claim)
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= MAX_UNIX_TIME  # False for NaN, so NaN is refused too
    ):
        raise AuthError("malformed", f"'{claim}' must be a unix time in seconds")
    return float(value)


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
    exp = _time_claim(claims, "exp")
    assert exp is not None  # required above
    if exp + settings.leeway <= now:
        raise jwt.ExpiredSignatureError
    for claim in ("nbf", "iat"):
        value = _time_claim(claims, claim)
        if value is not None and value > now + settings.leeway:
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
        presence=_presence(claims.get(PRESENCE_CLAIM)),
    )


#: The claim listing the user ids whose ``presence:<id>`` a token may subscribe to.
PRESENCE_CLAIM: Final = "presence"


def _presence(value: object) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(valid_name(v) for v in value):
        raise AuthError("claims", f"claim '{PRESENCE_CLAIM}' must be a list of user ids")
    return frozenset(value)


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
        """Stop a fetch under way, wait for it to end, then close the HTTP session."""
        inflight, self._inflight = self._inflight, None
        await cancel_and_wait(inflight)
        if self._http is not None:
            await self._http.close()


def _load_public_key(value: str) -> str:
    if value.lstrip().startswith("-----BEGIN"):
        return value
    return Path(value).read_text()


#: Seconds a token with a ``jti`` waits for the first read of the shared revocation
#: list (see :meth:`TokenVerifier.expect_shared_revocations`) before it is refused.
REVOCATIONS_WAIT: Final = 5.0
#: The revocation list is swept of expired entries when it reaches this size, then
#: at twice the size left, so that applying many revocations stays linear.
_SWEEP_MIN: Final = 1024


def _key_id(token: str) -> str | None:
    """The ``kid`` of a token's header (unverified: it only picks the JWKS key)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as exc:
        raise _refusal(exc) from None
    return kid if isinstance(kid, str) else None


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
        self._sweep_at = _SWEEP_MIN
        #: Set once the shared revocation list has been read; None when revocations
        #: are only what this process is told.
        self._revocations_read: asyncio.Event | None = None
        self._failure_logged = Throttle()

    async def verify(self, token: str, now: float | None = None) -> Identity:
        """The identity ``token`` carries; any token that is not accepted raises AuthError."""
        key = self._key
        if self._jwks is not None:
            try:
                key = await self._jwks.key_for(_key_id(token))
            except AuthError:
                raise
            except Exception as exc:
                raise self._unexpected(exc) from None
        identity = self._decode(token, key, now)
        if identity.token_id is not None:
            await self._revocations_known()
            self._refuse_revoked(identity.token_id, now)
        return identity

    def verify_local(self, token: str, now: float | None = None) -> Identity | None:
        """:meth:`verify` without waiting, or None when it would have to wait: for
        a JWKS key, or for the shared revocation list before a token with a ``jti``.

        Saves a task per connecting socket, and a connect storm is mostly this.
        """
        if self._jwks is not None:
            return None
        identity = self._decode(token, self._key, now)
        if identity.token_id is not None:
            read = self._revocations_read
            if read is not None and not read.is_set():
                return None
            self._refuse_revoked(identity.token_id, now)
        return identity

    def _decode(self, token: str, key: Any, now: float | None) -> Identity:
        try:
            return decode_identity(token, key, self.settings, now)
        except AuthError:
            raise
        except Exception as exc:
            raise self._unexpected(exc) from None

    def _unexpected(self, exc: Exception) -> AuthError:
        # Whatever else a hostile token makes a library raise is a refusal, never an
        # internal error; logged by type only (the text may quote the token).
        if self._failure_logged.due():
            log.warning("token verification raised %s: refused", type(exc).__name__)
        return AuthError("malformed", "token could not be verified")

    def _refuse_revoked(self, token_id: str, now: float | None) -> None:
        if self.is_revoked(token_id, now):
            raise AuthError("revoked", "token has been revoked")

    def expect_shared_revocations(self) -> None:
        """Revocations come from a list shared by the replicas (notifyd.revocations).

        Until :meth:`revocations_read` is called, a token that names a ``jti`` waits
        (at most :data:`REVOCATIONS_WAIT` seconds) and is then refused: a replica
        that has not read the list cannot tell whether the token was revoked.
        """
        self._revocations_read = asyncio.Event()

    def revocations_read(self) -> None:
        """The shared revocation list has been read (see :meth:`expect_shared_revocations`)."""
        if self._revocations_read is not None:
            self._revocations_read.set()

    async def _revocations_known(self) -> None:
        read = self._revocations_read
        if read is None or read.is_set():
            return
        try:
            async with asyncio.timeout(REVOCATIONS_WAIT):
                await read.wait()
        except TimeoutError:
            raise AuthError(
                "revocations_unavailable", "revoked tokens are not known yet; retry later"
            ) from None

    def revoke(self, token_ids: Iterable[str], until: float, now: float | None = None) -> bool:
        """Refuse these token ids until ``until`` (their expiry).

        Returns False, and changes nothing, when ``until`` has passed already.
        """
        now = time.time() if now is None else now
        if not until > now:
            return False
        revoked = self._revoked
        for token_id in token_ids:
            if revoked.get(token_id, until) <= until:
                revoked[token_id] = until
        if len(revoked) >= self._sweep_at:
            self._revoked = {t: u for t, u in revoked.items() if u > now}
            self._sweep_at = max(_SWEEP_MIN, 2 * len(self._revoked))
        return True

    def is_revoked(self, token_id: str | None, now: float | None = None) -> bool:
        if token_id is None:
            return False
        until = self._revoked.get(token_id)
        return until is not None and until > (time.time() if now is None else now)

    @property
    def revoked_count(self) -> int:
        """Token ids in the list (expired ones included until the next sweep)."""
        return len(self._revoked)

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
