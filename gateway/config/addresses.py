"""Addresses the operator names in the environment: upstream URLs and trusted networks, parsed once at start."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str, *, setting: str = "QUOTAGATE_TRUSTED_PROXIES") -> tuple[Network, ...]:
    """`10.0.0.0/8, 127.0.0.1` → networks; ConfigError naming the entry that is not one."""
    networks = []
    for entry in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{setting}: {entry!r} is not an IP address or CIDR network") from exc
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream URL's requests go: scheme, host and port, and the path they are prefixed with."""

    scheme: str
    host: str
    port: int
    prefix: str
    host_header: str

    @classmethod
    def parse(cls, url: str) -> Origin:
        """`http://backend:8001/api` → Origin("http", "backend", 8001, "/api", "backend:8001")."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        host_header = host if port == default else f"{host}:{port}"
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), host_header)
