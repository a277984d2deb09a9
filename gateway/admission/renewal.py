"""Leases this process holds in Redis: renewed in the background while held, given back in batches.

A lease lapses `ttl` seconds after it was taken or last renewed, so a replica that dies gives back what it
held within `ttl`; while this process lives it renews every lease it holds every `ttl / 3` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger("quotagate.renewal")

T = TypeVar("T")


class Renewal(Generic[T]):
    """The leases of one kind (`what`) this process holds: `renew_all` and `give_back_all` act on a batch."""

    def __init__(
        self,
        what: str,
        ttl: float,
        renew_all: Callable[[list[T]], Awaitable[object]],
        give_back_all: Callable[[list[T]], Awaitable[object]],
    ) -> None:
        self._what = what
        self.ttl = ttl
        self._renew_all = renew_all
        self._give_back_all = give_back_all
        self._held: set[T] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._returning: list[T] = []
        self._returns: set[asyncio.Task[None]] = set()

    def hold(self, lease: T) -> None:
        """Renew `lease` from now on, until it is given back."""
        self._held.add(lease)
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_held())

    def give_back(self, lease: T) -> None:
        """Free `lease` soon, with the others given back in this loop turn; never waits, never fails.

        Not awaited, so that a request cancelled as it ends (the server stopping) still frees its lease. If
        Redis cannot be reached, the lease lapses by itself within `ttl`.
        """
        self._held.discard(lease)
        self._returning.append(lease)
        if len(self._returning) == 1:
            task = asyncio.get_running_loop().create_task(self._return_pending())
            self._returns.add(task)
            task.add_done_callback(self._returns.discard)

    async def close(self) -> None:
        """Stop renewing; wait for the leases being given back."""
        if self._returns:
            await asyncio.wait(self._returns)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    async def _return_pending(self) -> None:
        leases, self._returning = self._returning, []
        try:
            await self._give_back_all(leases)
        except Exception as exc:
            log.warning("%s could not be given back (they lapse by themselves): %s", self._what, exc)

    async def _renew_held(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._renew_all(list(self._held))
            except Exception as exc:
                log.warning("%s could not be renewed: %s", self._what, exc)
