"""Where the engine's own connection goes, and how it introduces itself: read off a redis-py client's settings.

The engine opens its socket itself (limits/coalesce.py) but must reach the same server, as the same
user, in the same database as the client it was given. The client's keyword arguments are redis-py's
documented constructor parameters (`host`, `port`, `path`, `db`, `username`, `password`,
`client_name`, `socket_*timeout`, `ssl_*`), read through the public `get_connection_kwargs()`; the
connection class says whether they describe TCP, TLS or a unix socket.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis, SSLConnection, UnixDomainSocketConnection

# A reply or a connection that takes longer than this means Redis is lost; used when the client was
# built without timeouts (the gateway's are 0.5 s).
DEFAULT_TIMEOUT = 5.0

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class Endpoint:
    """One Redis server and the handshake a new connection to it makes."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host and port
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    server_hostname: str | None = None  # the name TLS checks the certificate against
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    client_name: str | None = None
    connect_timeout: float = DEFAULT_TIMEOUT
    reply_timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def of(cls, client: Redis) -> Endpoint:
        """The server `client` talks to, reached and greeted the way `client` would."""
        kwargs: dict[str, Any] = dict(client.get_connection_kwargs())  # type: ignore[no-untyped-call]
        connection_class = client.connection_pool.connection_class
        reply_timeout = float(kwargs.get("socket_timeout") or DEFAULT_TIMEOUT)
        common: dict[str, Any] = {
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
            "db": int(kwargs.get("db") or 0),
            "client_name": kwargs.get("client_name"),
            "connect_timeout": float(kwargs.get("socket_connect_timeout") or reply_timeout),
            "reply_timeout": reply_timeout,
        }
        if issubclass(connection_class, UnixDomainSocketConnection):
            return cls(path=str(kwargs["path"]), **common)
        host, port = str(kwargs.get("host") or "localhost"), int(kwargs.get("port") or 6379)
        if issubclass(connection_class, SSLConnection):
            context = tls_context(kwargs)
            name = host if context.check_hostname else None
            return cls(host=host, port=port, tls=context, server_hostname=name, **common)
        return cls(host=host, port=port, **common)

    def greeting(self) -> list[tuple[str | bytes | int, ...]]:
        """The commands a new connection sends before any other: AUTH, SELECT, CLIENT SETNAME, as configured."""
        commands: list[tuple[str | bytes | int, ...]] = []
        if self.password is not None:
            commands.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        if self.client_name:
            commands.append(("CLIENT", "SETNAME", self.client_name))
        return commands


def tls_context(kwargs: dict[str, Any]) -> ssl.SSLContext:
    """A TLS context from redis-py's `ssl_*` parameters, with redis-py's defaults (certificate and name checked)."""
    reqs = kwargs.get("ssl_cert_reqs", "required")
    if isinstance(reqs, str):
        if reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {reqs!r}")
        reqs = _CERT_REQS[reqs]
    context = ssl.create_default_context()
    context.check_hostname = bool(kwargs.get("ssl_check_hostname", True)) and reqs != ssl.CERT_NONE
    context.verify_mode = reqs
    if kwargs.get("ssl_certfile"):
        context.load_cert_chain(kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"), kwargs.get("ssl_password"))
    if kwargs.get("ssl_ca_certs") or kwargs.get("ssl_ca_data") or kwargs.get("ssl_ca_path"):
        context.load_verify_locations(
            cafile=kwargs.get("ssl_ca_certs"), capath=kwargs.get("ssl_ca_path"), cadata=kwargs.get("ssl_ca_data")
        )
    if kwargs.get("ssl_min_version") is not None:
        context.minimum_version = kwargs["ssl_min_version"]
    if kwargs.get("ssl_ciphers"):
        context.set_ciphers(kwargs["ssl_ciphers"])
    return context
