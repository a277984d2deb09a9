"""Per-account concurrent-request places, shared by every replica: leases in Redis that lapse if a replica dies.

A plan's `concurrency: N` lets one account have N requests in flight at once, wherever they arrived. A
request takes its place before its body is read, so an account's stalled bodies hold its own places
and never the pool's others. Each place is a lease in the account's Redis set that lapses `ttl` seconds
after it was taken or last renewed: this process renews the leases it holds every `ttl / 3` seconds, so a
replica that dies stops renewing and its places come back within `ttl`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable

from gateway.admission.renewal import Renewal
from limits import Engine, Lease

log = logging.getLogger("quotagate.concurrency")

# Seconds a lease lives unless renewed: how long a dead replica's places stay taken.
LEASE_TTL_S = 30.0


class Leases:
    """This process's leases on accounts' places: taken, renewed in the background while held, and given back."""

    def __init__(self, engine: Engine, *, ttl: float = LEASE_TTL_S) -> None:
        self._engine = engine
        self._renewal = Renewal[Lease]("concurrency leases", ttl, self._renew_all, self._release_all)

    async def take(self, account: str, limit: int) -> Lease | None:
        """One of `account`'s `limit` places, or None if all are held; LimitsError if Redis cannot say."""
        lease = await self._engine.lease(account, limit, self._renewal.ttl)
        if lease is not None:
            self._renewal.hold(lease)
        return lease

    def give_back(self, lease: Lease) -> None:
        """Free `lease`'s place soon; never waits, never fails (see Renewal.give_back)."""
        self._renewal.give_back(lease)

    async def close(self) -> None:
        """Stop renewing; wait for the leases being given back."""
        await self._renewal.close()

    async def _renew_all(self, leases: list[Lease]) -> None:
        await _each(self._engine.renew(lease, self._renewal.ttl) for lease in leases)

    async def _release_all(self, leases: list[Lease]) -> None:
        await _each(self._engine.release(lease) for lease in leases)


async def _each(calls: Iterable[Awaitable[object]]) -> None:
    """Await every call; a failure is logged and does not stop the others."""
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, BaseException):
            log.warning("a concurrency lease could not be renewed or given back: %s", result)
