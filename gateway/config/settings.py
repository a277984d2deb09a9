"""Environment settings: where Redis, the upstreams and the config file are, and the key secret.

Kept apart from the quota YAML, which holds only what ops tune while the gateway runs.
Every setting is an environment variable, so each uvicorn worker process reads the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from gateway.config.addresses import Network, Origin, parse_networks
from gateway.errors import ConfigError
from gateway.observe.logs import FLUSH_AFTER
from gateway.observe.logs import FORMATS as LOG_FORMATS


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The gateway's environment, resolved once at start."""

    config_path: Path
    redis_url: str
    key_secret: bytes
    upstreams: Mapping[str, tuple[str, ...]]
    max_body_bytes: int = 1 << 20
    idempotency_answer_bytes: int = 1 << 20  # answers bigger than this are not kept for Idempotency-Key replays
    body_timeout: float = 10.0  # seconds a request body may take to arrive whole; 408 past it
    job_result_ttl: float = 3600.0  # seconds an async job's result (or error) is kept once it has ended
    job_result_bytes: int = 16 << 20  # a job's images over this are refunded and the job failed
    capacity_poll: float = 1.0  # seconds between reads of each backend's advertised capacity
    place_ttl: float = 30.0  # seconds a dead replica's places in the pools stay taken (renewed every third of it)
    redis_timeout: float = 0.5
    upstream_connect_timeout: float = 2.0
    upstream_read_timeout: float = 300.0
    config_poll_interval: float = 0.5  # seconds between looks at the quota file; 0: reload on SIGHUP only
    log_format: str = "auto"  # json, text, or auto: text on a terminal, else JSON
    log_prompts: bool = False  # prompts are users' words: kept out of the logs unless asked for
    log_flush: float = FLUSH_AFTER  # seconds a log line may wait to go out with others; 0: at the loop turn's end
    # Identity and trust (gateway/admission/identity.py, gateway/admission/peers.py, gateway/admission/authguard.py).
    key_cache_ttl: float = 60.0  # seconds; invalidations make changes visible at once, this bounds the rest
    trusted_proxies: tuple[Network, ...] = ()
    account_header: str = "X-Quotagate-Account"
    auth_failures_per_minute: int = 20

    def __post_init__(self) -> None:
        if len(self.key_secret) < 16:
            raise ConfigError(
                "QUOTAGATE_KEY_SECRET: must be at least 16 bytes; generate one with `openssl rand -hex 32`"
            )
        if self.log_format not in LOG_FORMATS:
            choices = ", ".join(LOG_FORMATS)
            raise ConfigError(f"QUOTAGATE_LOG_FORMAT: expected one of {choices}, got {self.log_format!r}")
        if not 0 < self.body_timeout <= 3600:
            raise ConfigError(
                f"QUOTAGATE_BODY_TIMEOUT: expected seconds above 0, at most 3600, got {self.body_timeout!r}"
            )
        if not 0 <= self.idempotency_answer_bytes <= 64 << 20:
            raise ConfigError(
                "QUOTAGATE_IDEMPOTENCY_ANSWER_BYTES: expected bytes from 0 (keep no answer) to 67108864, "
                f"got {self.idempotency_answer_bytes!r}"
            )
        if not 1 <= self.job_result_ttl <= 7 * 86400:
            raise ConfigError(
                f"QUOTAGATE_JOB_RESULT_TTL: expected seconds from 1 to 604800, got {self.job_result_ttl!r}"
            )
        if not 0 < self.job_result_bytes <= 256 << 20:
            raise ConfigError(
                f"QUOTAGATE_JOB_RESULT_BYTES: expected bytes above 0, at most 268435456, got {self.job_result_bytes!r}"
            )
        if not 0.5 <= self.place_ttl <= 600:
            raise ConfigError(f"QUOTAGATE_PLACE_TTL: expected seconds from 0.5 to 600, got {self.place_ttl!r}")
        if not 0.05 <= self.capacity_poll <= 60:
            raise ConfigError(f"QUOTAGATE_CAPACITY_POLL: expected seconds from 0.05 to 60, got {self.capacity_poll!r}")
        if not 0 <= self.log_flush <= 10:
            raise ConfigError(f"QUOTAGATE_LOG_FLUSH: expected seconds from 0 to 10, got {self.log_flush!r}")
        for name, urls in self.upstreams.items():
            for url in urls:
                try:
                    Origin.parse(url)
                except ValueError as exc:
                    raise ConfigError(f"QUOTAGATE_UPSTREAMS: {name}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read QUOTAGATE_* variables; raise ConfigError naming the variable that is missing or wrong."""

        def need(name: str) -> str:
            value = environ.get(name)
            if not value:
                raise ConfigError(f"{name}: not set")
            return value

        def number(name: str, default: float) -> float:
            raw = environ.get(name)
            try:
                return float(raw) if raw else default
            except ValueError as exc:
                raise ConfigError(f"{name}: expected a number, got {raw!r}") from exc

        def flag(name: str) -> bool:
            raw = environ.get(name, "").lower()
            if raw not in ("", "0", "1", "false", "true", "no", "yes"):
                raise ConfigError(f"{name}: expected 1 or 0, got {raw!r}")
            return raw in ("1", "true", "yes")

        return cls(
            config_path=Path(need("QUOTAGATE_CONFIG")),
            redis_url=need("QUOTAGATE_REDIS_URL"),
            key_secret=need("QUOTAGATE_KEY_SECRET").encode(),
            upstreams=parse_upstreams(environ.get("QUOTAGATE_UPSTREAMS", "")),
            max_body_bytes=int(number("QUOTAGATE_MAX_BODY_BYTES", 1 << 20)),
            idempotency_answer_bytes=int(number("QUOTAGATE_IDEMPOTENCY_ANSWER_BYTES", 1 << 20)),
            body_timeout=number("QUOTAGATE_BODY_TIMEOUT", 10.0),
            job_result_ttl=number("QUOTAGATE_JOB_RESULT_TTL", 3600.0),
            job_result_bytes=int(number("QUOTAGATE_JOB_RESULT_BYTES", 16 << 20)),
            capacity_poll=number("QUOTAGATE_CAPACITY_POLL", 1.0),
            place_ttl=number("QUOTAGATE_PLACE_TTL", 30.0),
            redis_timeout=number("QUOTAGATE_REDIS_TIMEOUT", 0.5),
            upstream_connect_timeout=number("QUOTAGATE_UPSTREAM_CONNECT_TIMEOUT", 2.0),
            upstream_read_timeout=number("QUOTAGATE_UPSTREAM_READ_TIMEOUT", 300.0),
            config_poll_interval=number("QUOTAGATE_CONFIG_POLL", 0.5),
            log_format=environ.get("QUOTAGATE_LOG_FORMAT") or "auto",
            log_prompts=flag("QUOTAGATE_LOG_PROMPTS"),
            log_flush=number("QUOTAGATE_LOG_FLUSH", FLUSH_AFTER),
            key_cache_ttl=number("QUOTAGATE_KEY_CACHE_TTL", 60.0),
            trusted_proxies=parse_networks(environ.get("QUOTAGATE_TRUSTED_PROXIES", "")),
            account_header=environ.get("QUOTAGATE_ACCOUNT_HEADER") or "X-Quotagate-Account",
            auth_failures_per_minute=int(number("QUOTAGATE_AUTH_FAILURES_PER_MINUTE", 20)),
        )


def parse_upstreams(text: str) -> Mapping[str, tuple[str, ...]]:
    """`diffusion=http://a:8001,http://b:8001 other=http://c` → {"diffusion": (a, b), "other": (c,)}."""
    pools: dict[str, tuple[str, ...]] = {}
    for entry in text.split():
        name, sep, urls = entry.partition("=")
        if not sep or not name or not urls:
            raise ConfigError(f"QUOTAGATE_UPSTREAMS: {entry!r}: expected NAME=URL[,URL...]")
        pools[name] = tuple(u.rstrip("/") for u in urls.split(",") if u)
    return MappingProxyType(pools)
