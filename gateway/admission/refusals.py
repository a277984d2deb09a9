"""Exhausted accounts are refused first, from an answer rendered once per cached refusal.

When the engine's near-cache knows an account's daily quota is spent until T, no request of it can
pass before T, whatever it asks for: the gateway refuses it right after authentication, before
reading its body, and sends the 429 rendered for that cached refusal. The near-cache rebuilds a
refusal at most every `limits.nearcache.REFRESH_S`, so the answer (its Retry-After and reset
fields) is rendered again as often, and is never more than that out of date.

Such a request costs no Redis round trip, no JSON parsing and no rendering: the cheapest answer
the gateway gives, to the clients that keep asking most (a surge of free accounts past their 3).
"""

from __future__ import annotations

from gateway.admission.decision import refusal
from gateway.config.quotas import Plan
from gateway.errors import RawAnswer
from limits import Decision, DenialCache


class Refusals:
    """The rendered refusal of each account the near-cache holds as exhausted, for the last `size` accounts.

    A rendering is good only as long as the near-cache serves the same refusal (REFRESH_S), so only
    the accounts refused just now are worth keeping: a few hundred at thousands of refusals a second.
    Keeping one per spent account (100,000) held objects that Python's collector scans on every full
    collection, and its pauses grew with them.
    """

    def __init__(self, near_cache: DenialCache, *, size: int = 1024) -> None:
        self._near_cache = near_cache
        self._size = size
        self._rendered: dict[str, tuple[Decision, RawAnswer]] = {}

    def answer(self, account: str, plan: Plan) -> RawAnswer | None:
        """The 429 for `account` under `plan` if its quota is known to be spent; None if it may be admitted."""
        decision = self._near_cache.get(account, plan.limits)
        if decision is None:
            self._rendered.pop(account, None)
            return None
        known = self._rendered.get(account)
        if known is not None and known[0] is decision:  # the same cached refusal: the same answer
            return known[1]
        answer = RawAnswer.of(refusal(plan, decision))
        if len(self._rendered) >= self._size and account not in self._rendered:
            self._rendered.pop(next(iter(self._rendered)))
        self._rendered[account] = (decision, answer)
        return answer
