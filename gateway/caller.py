"""Who sent a request: an account a trusted auth proxy vouches for, else the API key's owner.

Failed authentications are counted per client address (gateway/authguard.py), which is the socket's
peer unless a trusted proxy names the client (gateway/peers.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from gateway.errors import Unauthorized
from gateway.identity import Identity

if TYPE_CHECKING:
    from gateway.app import Services


async def identify(headers: Mapping[str, str], peer: str | None, services: Services) -> Identity:
    """The identity of a request with `headers` (looked up by lower-case names) from the socket peer `peer`.

    Unauthorized (401), or RateLimited (429) once its address failed too often.
    """
    address = services.peers.client_address(peer, headers.get("x-forwarded-for"))
    services.auth_guard.check(address)
    try:
        vouched = headers.get(services.settings.account_header.lower())
        if vouched is not None and services.peers.trusts(peer):
            return await services.keys.vouched(vouched)
        return await services.keys.authenticate(bearer(headers))
    except Unauthorized as exc:
        raise (await services.auth_guard.failed(address)) or exc from None


def bearer(headers: Mapping[str, str]) -> str:
    """The API key of `Authorization: Bearer ...`; Unauthorized if there is none."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("You didn't provide an API key: send `Authorization: Bearer qg_...`.")
    return token.strip()
