"""What an operator does to one account: read its usage, grant it images for today, reset it.

Shared by the `quotagate usage|grant|reset` commands and the admin API, so both answer the same JSON.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.admission.identity import KeyStore
from gateway.admission.usage import limits_view
from gateway.config.quotas import Config, Plan
from limits import Engine


class UnknownAccount(LookupError):
    """No account by that name, or its plan is not in the config."""


class Accounts:
    """Operations on accounts, against the config `config()` returns now (it may be reloaded)."""

    def __init__(
        self,
        engine: Engine,
        keys: KeyStore,
        config: Callable[[], Config],
        *,
        brownouts: Callable[[], Awaitable[frozenset[str]]] | None = None,
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._config = config
        self._brownouts = brownouts  # the brownout rules that apply now (gateway/admission/brownout.py)

    async def usage(self, account: str) -> dict[str, Any]:
        """Where each of the account's limits stands; charges nothing."""
        plan = await self._plan(account)
        decision, used = await self._engine.usage(account, plan.limits)
        usage = {"account": account, "plan": plan.name, "limits": limits_view(decision, used)}
        if plan.temporary is not None:  # an override or a brownout: what a refused client would read
            usage["temporary"] = plan.temporary.notice
        return usage

    async def grant(self, account: str, images: int) -> dict[str, Any]:
        """Add `images` to the account's daily quota for today (a support gesture); returns the usage after."""
        plan = await self._plan(account)
        quota = next((q for q in plan.limits.quotas if q.limit is not None), None)
        if quota is None:
            raise ValueError(f"the {plan.name} plan has no daily limit to grant images against")
        granted = await self._engine.grant(account, quota, images)
        return {**await self.usage(account), "granted_today": granted}

    async def reset(self, account: str) -> dict[str, Any]:
        """Forget the account's usage: buckets full, today's quota unused, grants gone."""
        plan = await self._plan(account)
        await self._engine.reset(account, plan.limits)
        return await self.usage(account)

    async def _plan(self, account: str) -> Plan:
        name = await self._keys.plan_of(account)
        if name is None:
            raise UnknownAccount(f"no account {account!r}")
        config = self._config()
        applied = await self._brownouts() if self._brownouts is not None else frozenset()
        plan = config.plan_at(name, time.time(), applied)  # with its override or brownout, as the gateway charges it
        if plan is None:
            raise UnknownAccount(f"account {account!r} is on plan {name!r}, which {config.source} does not offer")
        return plan
