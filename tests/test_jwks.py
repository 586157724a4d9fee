"""Asymmetric tokens end to end: RS256 keys from a JWKS URL served locally."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import ServerFactory, expect_close, new_user, receive_json


def _b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


class IdentityProvider:
    """A JWKS endpoint (the identity provider is the one part that cannot be real here)."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.published: set[str] = set()
        self.requests = 0
        self.failing = False

    def add_key(self, kid: str, publish: bool = True) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if publish:
            self.published.add(kid)

    def token(self, kid: str, user: str, ttl: int = 600, **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": user, "exp": now + ttl, "iat": now, **claims}
        return jwt.encode(payload, self.keys[kid], algorithm="RS256", headers={"kid": kid})

    async def jwks(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.failing:
            return web.Response(status=500)
        keys = []
        for kid in sorted(self.published):
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return web.json_response({"keys": keys})


@pytest.fixture
async def idp() -> AsyncIterator[tuple[IdentityProvider, str]]:
    provider = IdentityProvider()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", provider.jwks)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield provider, f"http://127.0.0.1:{server.port}/.well-known/jwks.json"
    await server.close()


async def test_jwks_keys_rotation_and_refetch_cooldown(
    make_server: ServerFactory, idp: tuple[IdentityProvider, str]
) -> None:
    provider, url = idp
    provider.add_key("k1")
    provider.add_key("k2", publish=False)
    server = await make_server(
        auth={"algorithms": ["RS256"], "secret": "", "jwks_url": url, "jwks_cooldown": 1.0,
              "audience": "notifyd", "issuer": "https://idp.example"},
    )  # fmt: skip
    claims: dict[str, Any] = {"aud": "notifyd", "iss": "https://idp.example"}
    user = new_user()

    ws = await server.ws(provider.token("k1", user, **claims))
    assert (await receive_json(ws))["user"] == user
    assert provider.requests == 1

    # Not yet published: refused. Past the cooldown the unknown kid causes one
    # refetch, not one per socket.
    await asyncio.sleep(1.1)
    for _ in range(5):
        ws = await server.ws(provider.token("k2", user, **claims))
        assert await expect_close(ws) == 4001
    assert provider.requests == 2

    # The provider rotates; after the cooldown the new key is fetched and accepted.
    provider.published.add("k2")
    await asyncio.sleep(1.1)
    ws = await server.ws(provider.token("k2", user, **claims))
    assert (await receive_json(ws))["user"] == user
    assert provider.requests == 3

    # Wrong audience, and an HS256 token signed with the public key as secret, are refused.
    ws = await server.ws(provider.token("k1", user, aud="someone-else", iss="https://idp.example"))
    assert await expect_close(ws) == 4001
    # PyJWT will not sign that (it refuses a public key as HMAC secret): forge it by hand.
    public_pem = (
        provider.keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = _b64({"alg": "HS256", "typ": "JWT", "kid": "k1"})
    body = _b64({"sub": user, "exp": int(time.time()) + 60, **claims})
    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    ws = await server.ws(
        f"{header}.{body}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    )
    assert await expect_close(ws) == 4001


async def test_jwks_outage_keeps_cached_keys(
    make_server: ServerFactory, idp: tuple[IdentityProvider, str]
) -> None:
    provider, url = idp
    provider.add_key("k1")
    server = await make_server(
        auth={"algorithms": ["RS256"], "secret": "", "jwks_url": url, "jwks_cooldown": 0.1,
              "jwks_cache_ttl": 0.2},
    )  # fmt: skip
    user = new_user()
    ws = await server.ws(provider.token("k1", user))
    assert (await receive_json(ws))["type"] == "welcome"
    # The provider now fails; the cached key keeps working past its TTL.
    provider.failing = True
    await asyncio.sleep(0.3)
    requests = provider.requests
    ws = await server.ws(provider.token("k1", user))
    assert (await receive_json(ws))["type"] == "welcome"
    assert provider.requests == requests + 1  # it did try, and failed
