"""The one place that names the engine's Redis keys."""

# The account sits in a hash tag, so every key of one account lands on the same Redis Cluster
# slot and a multi-key script runs unchanged on a cluster.


def counter_key(account: str, counter: str) -> str:
    """Key of one limit's counter for one account."""
    return f"qg:{{{account}}}:{counter}"


def idempotency_record(account: str, key: str) -> str:
    """Key of the record of a client's Idempotency-Key: the request it is bound to, and how that ended."""
    return f"qg:{{{account}}}:idem:{key}"


def idempotency_answer(account: str, key: str) -> str:
    """Key of the answer kept for a client's Idempotency-Key (a prefix of its own: no key's record can be it)."""
    return f"qg:{{{account}}}:idem-answer:{key}"


def lease_set(account: str) -> str:
    """Key of the account's concurrent-request leases: lease id -> expiry."""
    return f"qg:{{{account}}}:leases"


def pool_keys(pool: str, plans: list[str]) -> list[str]:
    """Keys of one upstream pool's places and line (limits/lua/fleet.lua), then each plan's line and jobs.

    The pool sits in a hash tag, so one pool's keys land on one Redis Cluster slot.
    """
    prefix = f"qg:{{pool:{pool}}}:"
    keys = [prefix + part for part in ("held", "backends", "tickets", "waiting", "lapse", "meta", "orphans")]
    for plan in plans:
        keys += [f"{prefix}line:{plan}", f"{prefix}jobs:{plan}"]
    return keys
