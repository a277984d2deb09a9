"""Who sent a request: an account a trusted auth proxy vouches for, else the API key's owner.

Failed authentications are counted per client address (gateway/authguard.py), which is the socket's
peer unless a trusted proxy names the client (gateway/peers.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from gateway.errors import Unauthorized
from gateway.identity import Identity

if TYPE_CHECKING:
    from gateway.app import Services


async def identify(request: Request, services: Services) -> Identity:
    """The caller's identity; Unauthorized (401), or RateLimited (429) once its address failed too often."""
    address = services.peers.client_address(peer(request), request.headers.get("x-forwarded-for"))
    services.auth_guard.check(address)
    try:
        vouched = request.headers.get(services.settings.account_header)
        if vouched is not None and services.peers.trusts(peer(request)):
            return await services.keys.vouched(vouched)
        return await services.keys.authenticate(bearer(request))
    except Unauthorized as exc:
        raise (await services.auth_guard.failed(address)) or exc from None


def peer(request: Request) -> str | None:
    """The address at the other end of the socket."""
    return request.client.host if request.client else None


def bearer(request: Request) -> str:
    """The API key of `Authorization: Bearer ...`; Unauthorized if there is none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("You didn't provide an API key: send `Authorization: Bearer qg_...`.")
    return token.strip()
