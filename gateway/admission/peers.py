"""Who is on the other end: the client's address, and whether its peer is a trusted proxy.

Only a trusted proxy (QUOTAGATE_TRUSTED_PROXIES) is believed when it names the client in
`X-Forwarded-For` or vouches for an account in the account header; anyone else's are ignored.
uvicorn's own proxy-header rewriting is off (`quotagate serve`), so the peer seen here is the socket's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from gateway.config.addresses import Network


class TrustedProxies:
    """The networks whose requests may name the client and vouch for an account."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self._networks = tuple(networks)

    def trusts(self, host: str | None) -> bool:
        """Whether `host` (a peer address) is a trusted proxy."""
        if not self._networks or host is None:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address: the peer, or behind trusted proxies the last untrusted hop they name."""
        address = peer or "unknown"
        if not self.trusts(peer) or not forwarded_for:
            return address
        for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
            address = hop
            if not self.trusts(hop):
                break
        return address
