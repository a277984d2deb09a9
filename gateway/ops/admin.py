"""The admin HTTP API: account usage, grants and resets, on its own port and behind a token.

It is a separate app, served by `quotagate serve --admin-port P` on a port of its own, so the public
port never routes to it. Every request needs `Authorization: Bearer $QUOTAGATE_ADMIN_TOKEN`,
compared in constant time; the token itself is never logged.

    GET  /v1/accounts/{account}/usage
    POST /v1/accounts/{account}/grant   {"images": N}
    POST /v1/accounts/{account}/reset
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admission.brownout import applied_in
from gateway.admission.identity import KeyStore
from gateway.config.quotas import Config, parse_config, read_config_text
from gateway.config.settings import Settings
from gateway.errors import ApiError, BadRequest, ConfigError, NotFound, ServiceUnavailable, Unauthorized
from gateway.errors import error_response as _error_response
from gateway.ops.accounts import Accounts, UnknownAccount
from limits import Engine, LimitsError, connect

TOKEN_ENV = "QUOTAGATE_ADMIN_TOKEN"
MIN_TOKEN_BYTES = 16
MAX_GRANT = 1_000_000

log = logging.getLogger("quotagate.admin")


def check_token(token: str | None) -> bytes:
    """The admin token as bytes; ConfigError if it is missing or too short to resist guessing."""
    if not token or len(token.encode()) < MIN_TOKEN_BYTES:
        raise ConfigError(
            f"{TOKEN_ENV}: the admin API needs a token of at least {MIN_TOKEN_BYTES} bytes; "
            "generate one with `openssl rand -hex 32`"
        )
    return token.encode()


class ConfigFile:
    """The quota file as last read successfully; read again at each call (admin calls are rare), kept when bad."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._text = read_config_text(path)
        self._config = parse_config(self._text, source=str(path))

    def __call__(self) -> Config:
        try:
            text = read_config_text(self._path)
            if text != self._text:
                self._text = text
                self._config = parse_config(text, source=str(self._path))
        except ConfigError as exc:
            log.error("admin: quota file refused, version %s stays: %s", self._config.version, exc)
        return self._config


Handler = Callable[[Request, Accounts, str], Awaitable[dict[str, Any]]]


def create_admin_app(settings: Settings, token: bytes) -> Starlette:
    """The admin API over the Redis and quota file of `settings`."""
    config = ConfigFile(Path(settings.config_path))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connect(settings.redis_url, timeout=max(settings.redis_timeout, 2.0))
        engine = Engine(redis)
        keys = KeyStore(redis, settings.key_secret)
        app.state.accounts = Accounts(engine, keys, config, brownouts=lambda: applied_in(redis))
        try:
            yield
        finally:
            await engine.aclose()
            await redis.aclose()

    def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                return _error_response(Unauthorized("The admin API needs `Authorization: Bearer <admin token>`."))
            account = request.path_params["account"]
            try:
                return JSONResponse(await handler(request, request.app.state.accounts, account))
            except UnknownAccount as exc:
                return _error_response(NotFound(str(exc)))
            except ValueError as exc:
                return _error_response(BadRequest(str(exc)))
            except (RedisError, LimitsError, OSError) as exc:
                log.error("admin: redis unavailable: %s", exc)
                return _error_response(ServiceUnavailable("Redis is unavailable; retry shortly."))
            except ApiError as exc:
                return _error_response(exc)

        return run

    async def usage(request: Request, accounts: Accounts, account: str) -> dict[str, Any]:
        return await accounts.usage(account)

    async def grant(request: Request, accounts: Accounts, account: str) -> dict[str, Any]:
        return await accounts.grant(account, await _images(request))

    async def reset(request: Request, accounts: Accounts, account: str) -> dict[str, Any]:
        return await accounts.reset(account)

    routes = [
        Route("/v1/accounts/{account}/usage", endpoint(usage), methods=["GET"]),
        Route("/v1/accounts/{account}/grant", endpoint(grant), methods=["POST"]),
        Route("/v1/accounts/{account}/reset", endpoint(reset), methods=["POST"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error_response(NotFound(f"No admin route for {request.method} {request.url.path}."))

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})


async def _images(request: Request) -> int:
    try:
        body = json.loads(await request.body() or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from exc
    images = body.get("images") if isinstance(body, dict) else None
    if isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= MAX_GRANT:
        raise BadRequest(f"`images` must be a whole number from 1 to {MAX_GRANT}, got {images!r}.", param="images")
    return images


class AdminServer:
    """The admin app served by uvicorn on a thread, beside the gateway's workers."""

    def __init__(self, settings: Settings, token: bytes, *, host: str, port: int) -> None:
        app = create_admin_app(settings, token)
        self._server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning"))
        # Bound here, so a port in use stops the command before any worker starts.
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise ConfigError(f"--admin-port: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="quotagate-admin", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()
