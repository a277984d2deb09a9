"""Per-account concurrent-request places, shared by every replica: leases in Redis that lapse if a replica dies.

A plan's `concurrency: N` lets one account have N requests in flight at once, wherever they arrived. A
request takes its place before its body is read, so an account's stalled bodies hold its own places
and never the pool's others. Each place is a lease in the account's Redis set that lapses `ttl` seconds
after it was taken or last renewed: this process renews the leases it holds every `ttl / 3` seconds, so a
replica that dies stops renewing and its places come back within `ttl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from limits import Engine, Lease

log = logging.getLogger("quotagate.concurrency")

# Seconds a lease lives unless renewed: how long a dead replica's places stay taken.
LEASE_TTL_S = 30.0


class Leases:
    """This process's leases: taken, renewed in the background while held, and given back."""

    def __init__(self, engine: Engine, *, ttl: float = LEASE_TTL_S) -> None:
        self._engine = engine
        self._ttl = ttl
        self._held: set[Lease] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._returning: list[Lease] = []
        self._returns: set[asyncio.Task[None]] = set()

    async def take(self, account: str, limit: int) -> Lease | None:
        """One of `account`'s `limit` places, or None if all are held; LimitsError if Redis cannot say."""
        lease = await self._engine.lease(account, limit, self._ttl)
        if lease is not None:
            self._held.add(lease)
            if self._renewer is None:
                self._renewer = asyncio.get_running_loop().create_task(self._renew_held())
        return lease

    def give_back(self, lease: Lease) -> None:
        """Free `lease`'s place soon, with the others given back in this loop turn; never waits, never fails.

        Not awaited, so that a request cancelled as it ends (the server stopping) still frees its place. If
        Redis cannot be reached, the lease lapses by itself within `ttl`.
        """
        self._held.discard(lease)
        self._returning.append(lease)
        if len(self._returning) == 1:
            task = asyncio.get_running_loop().create_task(self._return_pending())
            self._returns.add(task)
            task.add_done_callback(self._returns.discard)

    async def _return_pending(self) -> None:
        leases, self._returning = self._returning, []
        results = await asyncio.gather(*(self._engine.release(lease) for lease in leases), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("a concurrency lease could not be given back (it lapses by itself): %s", result)

    async def close(self) -> None:
        """Stop renewing; wait for the leases being given back."""
        if self._returns:
            await asyncio.wait(self._returns)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    async def _renew_held(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            held = list(self._held)
            renewals = (self._engine.renew(lease, self._ttl) for lease in held)
            for result in await asyncio.gather(*renewals, return_exceptions=True):
                if isinstance(result, BaseException):
                    log.warning("a concurrency lease could not be renewed: %s", result)
