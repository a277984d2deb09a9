"""API keys → account → plan, kept in Redis; only an HMAC of each key's secret is stored.

A key reads `qg_<key id>_<secret>`. Lookups are cached per replica, so the steady state costs no
Redis round trip. Whatever changes an account (a revoked key, a new plan) is published on the
engine's invalidation channel, and every replica that follows it drops that account at once; the
cache TTL only bounds staleness for a replica that cannot follow the channel (Redis Cluster).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from redis.exceptions import RedisError

from gateway.errors import ServiceUnavailable, Unauthorized
from limits import INVALIDATIONS, RedisClient

if TYPE_CHECKING:
    from gateway.admission.storefailure import CircuitBreaker

_KEY = re.compile(r"^qg_([0-9a-f]{16})_([0-9a-f]{48})$")
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
ACCOUNT = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")


class Identity(NamedTuple):
    """Who sent a request."""

    account: str
    plan: str
    key_id: str | None  # None: the account was vouched for by a trusted auth proxy


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as `keys list` shows it: never its secret."""

    key_id: str
    account: str
    created: int  # unix seconds; 0 if unknown


def _key_record(key_id: str) -> str:
    return f"qg:key:{key_id}"


def _account_record(account: str) -> str:
    return f"qg:account:{account}"


def _account_keys(account: str) -> str:
    return f"qg:account:{account}:keys"


class KeyStore:
    """Creates, lists and revokes keys, moves accounts between plans, and authenticates requests."""

    def __init__(
        self,
        redis: RedisClient,
        secret: bytes,
        *,
        cache_ttl: float = 1.0,
        cache_size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._redis = redis
        self._breaker = breaker
        # The last identity each key or account had, kept through clear() (a lost subscription),
        # and answered only while Redis cannot be asked, so a plan that fails open still knows
        # who is calling; forget() (a revocation, a plan change) drops it.
        self._known: dict[str, _Entry] = {}
        self._known_by_account: dict[str, tuple[str, ...]] = {}
        self._secret = secret
        self._ttl = cache_ttl
        self._size = cache_size
        self._clock = clock
        # cache key ("k:<key id>" or "a:<account>") → (expires at, the entry)
        self._cache: dict[str, tuple[float, _Entry]] = {}
        self._by_account: dict[str, tuple[str, ...]] = {}
        # Bumped by every invalidation: a lookup that was in flight meanwhile may have read the old
        # state, so its answer is used but not cached.
        self._generation = 0

    def _digest(self, key_secret: str) -> str:
        return hmac.new(self._secret, key_secret.encode(), hashlib.sha256).hexdigest()

    async def create_key(self, account: str, plan: str) -> str:
        """A new key for `account`, whose plan becomes `plan`. The key is shown once, never stored."""
        _check_account(account)
        key_id, key_secret = secrets.token_hex(8), secrets.token_hex(24)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                _key_record(key_id),
                mapping={"hmac": self._digest(key_secret), "account": account, "created": int(time.time())},
            )
            pipe.sadd(_account_keys(account), key_id)
            pipe.hset(_account_record(account), "plan", plan)
            pipe.publish(INVALIDATIONS, account)
            await pipe.execute()
        self.forget(account)
        return f"qg_{key_id}_{key_secret}"

    async def list_keys(self, account: str) -> list[KeyInfo]:
        """The live keys of `account`, oldest first."""
        _check_account(account)
        infos = []
        for raw in await self._redis.smembers(_account_keys(account)):
            key_id = _text(raw)
            created = await self._redis.hget(_key_record(key_id), "created")
            if created is not None:
                infos.append(KeyInfo(key_id, account, int(created)))
        return sorted(infos, key=lambda info: (info.created, info.key_id))

    async def revoke(self, key_id: str) -> str:
        """Delete the key `key_id` (a key id, or a whole key); every replica refuses it at once. Returns its account."""
        match = _KEY.match(key_id)
        key_id = match.group(1) if match else key_id
        if not KEY_ID.match(key_id):
            raise ValueError(f"key id {key_id!r}: expected 16 hex digits, as `keys list` shows")
        account = await self._redis.hget(_key_record(key_id), "account")
        if account is None:
            raise ValueError(f"no key {key_id}")
        account = _text(account)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(_key_record(key_id))
            pipe.srem(_account_keys(account), key_id)
            pipe.publish(INVALIDATIONS, account)
            await pipe.execute()
        self.forget(account)
        return account

    async def set_plan(self, account: str, plan: str) -> None:
        """Move `account` to `plan`; every replica sees it at once."""
        _check_account(account)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(_account_record(account), "plan", plan)
            pipe.publish(INVALIDATIONS, account)
            await pipe.execute()
        self.forget(account)

    async def plan_of(self, account: str) -> str | None:
        """The plan `account` is on, read from Redis now; None if there is no such account."""
        plan = await self._redis.hget(_account_record(account), "plan")
        return None if plan is None else _text(plan)

    async def authenticate(self, api_key: str) -> Identity:
        """The identity behind `api_key`; Unauthorized if it is malformed, unknown or revoked."""
        match = _KEY.match(api_key)
        if not match:
            raise Unauthorized("Incorrect API key provided: expected `Authorization: Bearer qg_...`.")
        key_id, key_secret = match.groups()
        digest, identity = await self._cached(f"k:{key_id}", lambda: self._lookup_key(key_id))
        assert digest is not None
        if not hmac.compare_digest(digest, self._digest(key_secret)):
            raise Unauthorized("Incorrect API key provided.")
        return identity

    async def vouched(self, account: str) -> Identity:
        """The identity of an account named by a trusted auth proxy; Unauthorized if it has no plan."""
        if not ACCOUNT.match(account):
            raise Unauthorized("The account named by the auth proxy is malformed.")
        _, identity = await self._cached(f"a:{account}", lambda: self._lookup_account(account))
        return identity

    def forget(self, account: str) -> None:
        """Drop what this replica caches about `account` (it changed)."""
        self._generation += 1
        for cache_key in self._by_account.pop(account, ()):
            self._cache.pop(cache_key, None)
        for cache_key in self._known_by_account.pop(account, ()):
            self._known.pop(cache_key, None)

    def clear(self) -> None:
        """Drop the whole cache (invalidations may have been missed)."""
        self._generation += 1
        self._cache.clear()
        self._by_account.clear()

    async def _cached(
        self, cache_key: str, lookup: Callable[[], Awaitable[tuple[str | None, Identity]]]
    ) -> tuple[str | None, Identity]:
        now = self._clock()
        cached = self._cache.get(cache_key)
        if cached and cached[0] > now:
            return _opened(cached[1])
        generation = self._generation
        if self._breaker is not None and not self._breaker.allow():
            return self._last_known(cache_key, None)
        try:
            digest, identity = await lookup()
        except RedisError as exc:
            if self._breaker is not None:
                self._breaker.failed()
            return self._last_known(cache_key, exc)
        if self._breaker is not None:
            self._breaker.succeeded()
        if generation == self._generation:
            if len(self._cache) >= self._size:
                self._evict_oldest()
            entry = (digest, *identity)
            self._cache[cache_key] = (now + self._ttl, entry)
            _index(self._by_account, identity.account, cache_key)
            if len(self._known) >= self._size:
                self._known.pop(next(iter(self._known)))  # its index entry goes stale: harmless
            self._known[cache_key] = entry
            _index(self._known_by_account, identity.account, cache_key)
        return digest, identity

    def _last_known(self, cache_key: str, cause: RedisError | None) -> tuple[str | None, Identity]:
        """While Redis cannot be asked: the identity last seen for `cache_key`, else 503."""
        known = self._known.get(cache_key)
        if known is None:
            raise ServiceUnavailable(
                "The key store is unavailable; retry shortly.", headers={"Retry-After": "1"}
            ) from cause
        return _opened(known)

    def _evict_oldest(self) -> None:
        cache_key, (_, (_, account, _, _)) = next(iter(self._cache.items()))
        del self._cache[cache_key]
        keys = tuple(key for key in self._by_account.pop(account, ()) if key != cache_key)
        if keys:
            self._by_account[account] = keys

    async def _lookup_key(self, key_id: str) -> tuple[str | None, Identity]:
        record = await self._redis.hmget(_key_record(key_id), ["hmac", "account"])
        digest, account = record
        if digest is None or account is None:
            raise Unauthorized("Incorrect API key provided.")
        _, identity = await self._lookup_account(_text(account), key_id)
        return _text(digest), identity

    async def _lookup_account(self, account: str, key_id: str | None = None) -> tuple[str | None, Identity]:
        plan = await self._redis.hget(_account_record(account), "plan")
        if plan is None:
            raise Unauthorized("This account has no plan; ask for a key.")
        return None, Identity(account=account, plan=_text(plan), key_id=key_id)


# A cached identity: (HMAC of its key's secret or None, account, plan, key id or None). Plain tuples
# of strings, which Python's collector stops tracking, so 100,000 cached accounts do not lengthen its
# full collections; an Identity, a tuple subclass, stays tracked whatever it holds (only exact tuples
# are untracked), and cached as such they made full collections of ~190 ms in bench/surge.py.
_Entry = tuple[str | None, str, str, str | None]


def _opened(entry: _Entry) -> tuple[str | None, Identity]:
    digest, account, plan, key_id = entry
    return digest, Identity(account, plan, key_id)


def _index(index: dict[str, tuple[str, ...]], account: str, cache_key: str) -> None:
    """Add `cache_key` to `account`'s entry of `index` (a tuple: an account has a key or two)."""
    keys = index.get(account, ())
    if cache_key not in keys:
        index[account] = (*keys, cache_key)


def _check_account(account: str) -> None:
    if not ACCOUNT.match(account):
        raise ValueError(f"account {account!r}: use 1-128 letters, digits, '.', '_', '@' or '-'")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
