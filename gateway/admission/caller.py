"""Who sent a request: an account a trusted auth proxy vouches for, else the API key's owner.

Failed authentications are counted per client address (gateway/admission/authguard.py), which is the socket's
peer unless a trusted proxy names the client (gateway/admission/peers.py); only failures are ever refused for it.

Identity comes from the header section alone, never from a chunked body's trailer section. uvicorn's
httptools protocol appends every field its parser reports to the list that is `scope["headers"]`,
trailer fields included: a request whose chunked body arrives in the same read as its head shows
its trailers to the app as headers, and one whose trailers arrive later has them appended while it
runs. Nothing in that list tells a header from a trailer (the header section may hold its fields in
any order, `Transfer-Encoding` first or last), so no filtering of it is sound. What is sound: only
a chunked body has a trailer section, and a chunked body needs `Transfer-Encoding` in the header
section, which is complete when the app starts. A request that carries it is refused with 411
Length Required (RFC 9110 §15.5.12) before any field is believed. Clients that send JSON (curl -d,
the openai client, httpx, requests) send a Content-Length, and every body the gateway accepts is
read whole before it is forwarded anyway, so refusing chunked bodies costs them nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.admission.authguard import FailedAuthGuard
from gateway.admission.identity import Identity, KeyStore
from gateway.admission.peers import TrustedProxies
from gateway.errors import LengthRequired, Unauthorized


class Caller:
    """Tells who sent a request, from its headers and its socket peer."""

    def __init__(self, keys: KeyStore, peers: TrustedProxies, auth_guard: FailedAuthGuard, account_header: str) -> None:
        self._keys = keys
        self._peers = peers
        self._auth_guard = auth_guard
        self._account_header = account_header.lower()

    async def identify(self, headers: Mapping[str, str], peer: str | None) -> Identity:
        """The identity of a request with `headers` (looked up by lower-case names) from the socket peer `peer`.

        LengthRequired (411) for a chunked body; Unauthorized (401), or RateLimited (429) once its address
        failed too often: a valid key or vouched account is let in whatever its address did.
        """
        if "transfer-encoding" in headers:
            raise LengthRequired(
                "Send the request body with a Content-Length: chunked request bodies are not accepted."
            )
        address = self._peers.client_address(peer, headers.get("x-forwarded-for"))
        try:
            vouched = headers.get(self._account_header)
            if vouched is not None and self._peers.trusts(peer):
                return await self._keys.vouched(vouched)
            return await self._keys.authenticate(bearer(headers))
        except Unauthorized as exc:
            raise (await self._auth_guard.failed(address)) or exc from None


def bearer(headers: Mapping[str, str]) -> str:
    """The API key of `Authorization: Bearer ...`; Unauthorized if there is none."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("You didn't provide an API key: send `Authorization: Bearer qg_...`.")
    return token.strip()
