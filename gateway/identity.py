"""API keys → account → plan, kept in Redis; only an HMAC of each key's secret is stored.

A key reads `qg_<key id>_<secret>`. Lookups are cached for `cache_ttl` seconds per replica, so
the steady state costs no Redis round trip, and a revoked key or a plan change is seen within it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from gateway.errors import ServiceUnavailable, Unauthorized
from limits import RedisClient

_KEY = re.compile(r"^qg_([0-9a-f]{16})_([0-9a-f]{48})$")
ACCOUNT = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a request."""

    account: str
    plan: str
    key_id: str


def _key_record(key_id: str) -> str:
    return f"qg:key:{key_id}"


def _account_record(account: str) -> str:
    return f"qg:account:{account}"


class KeyStore:
    """Creates keys and authenticates them."""

    def __init__(
        self,
        redis: RedisClient,
        secret: bytes,
        *,
        cache_ttl: float = 1.0,
        cache_size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._secret = secret
        self._ttl = cache_ttl
        self._size = cache_size
        self._clock = clock
        self._cache: dict[str, tuple[float, str, Identity]] = {}

    def _digest(self, key_secret: str) -> str:
        return hmac.new(self._secret, key_secret.encode(), hashlib.sha256).hexdigest()

    async def create_key(self, account: str, plan: str) -> str:
        """A new key for `account`, whose plan becomes `plan`. The key is shown once, never stored."""
        if not ACCOUNT.match(account):
            raise ValueError(f"account {account!r}: use 1-128 letters, digits, '.', '_', '@' or '-'")
        key_id, key_secret = secrets.token_hex(8), secrets.token_hex(24)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(_key_record(key_id), mapping={"hmac": self._digest(key_secret), "account": account})
            pipe.hset(_account_record(account), "plan", plan)
            await pipe.execute()
        return f"qg_{key_id}_{key_secret}"

    async def set_plan(self, account: str, plan: str) -> None:
        """Move `account` to `plan`."""
        await self._redis.hset(_account_record(account), "plan", plan)

    async def authenticate(self, api_key: str) -> Identity:
        """The identity behind `api_key`; Unauthorized if it is malformed, unknown or revoked."""
        match = _KEY.match(api_key)
        if not match:
            raise Unauthorized("Incorrect API key provided: expected `Authorization: Bearer qg_...`.")
        key_id, key_secret = match.groups()
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached and cached[0] > now:
            _, digest, identity = cached
        else:
            digest, identity = await self._lookup(key_id)
            if len(self._cache) >= self._size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key_id] = (now + self._ttl, digest, identity)
        if not hmac.compare_digest(digest, self._digest(key_secret)):
            raise Unauthorized("Incorrect API key provided.")
        return identity

    async def _lookup(self, key_id: str) -> tuple[str, Identity]:
        try:
            record = await self._redis.hgetall(_key_record(key_id))
            if not record:
                raise Unauthorized("Incorrect API key provided.")
            account = _text(record[b"account"])
            plan = await self._redis.hget(_account_record(account), "plan")
        except RedisError as exc:
            raise ServiceUnavailable(
                "The key store is unavailable; retry shortly.", headers={"Retry-After": "1"}
            ) from exc
        if plan is None:
            raise Unauthorized("This API key's account no longer exists.")
        return _text(record[b"hmac"]), Identity(account=account, plan=_text(plan), key_id=key_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
