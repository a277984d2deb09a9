"""A concurrent-request lease: one of an account's places, held in Redis until released or lapsed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Lease:
    """The place `id` in `account`'s lease set; it lapses unless renewed (Engine.lease, renew, release)."""

    account: str
    id: str
