"""Build the gateway's ASGI app: clients are made in lifespan and reached through app state.

Requests for a configured route take the hot path (gateway/http/proxy.py) in plain ASGI; health,
metrics, `/v1/quota`, unknown paths and the lifespan are Starlette's.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.admission.authguard import FailedAuthGuard
from gateway.admission.brownout import Brownouts
from gateway.admission.caller import Caller
from gateway.admission.concurrency import Leases
from gateway.admission.identity import KeyStore
from gateway.admission.jobs import JobStore
from gateway.admission.peers import TrustedProxies
from gateway.admission.places import PoolPlaces
from gateway.admission.poolwatch import PoolWatch
from gateway.admission.refusals import Refusals
from gateway.admission.shedding import Shedder
from gateway.admission.storefailure import CircuitBreaker, LocalBudget, StoreGuard
from gateway.config.quotas import Config, load_config
from gateway.config.reload import LiveConfig, reload_on_sighup
from gateway.config.settings import Settings
from gateway.errors import ApiError, ConfigError, NotFound, handle_api_error
from gateway.http.dispatch import Dispatcher
from gateway.http.jobs import JOBS_PATH, job_endpoint
from gateway.http.openapi import openapi_endpoint
from gateway.http.proxy import proxy
from gateway.http.quota_endpoint import quota
from gateway.http.services import Services
from gateway.observe.logs import configure_logging, flush_logs
from gateway.observe.metrics import GatewayMetrics, render, worker_exited
from gateway.observe.requestlog import logged
from gateway.upstream.adaptive import Gradient2Limit, LearnedCapacity
from gateway.upstream.capacity import CapacityWatcher
from gateway.upstream.client import UpstreamClient
from gateway.upstream.forward import Forwarder
from limits import DenialCache, Engine, Fleet, connect, follow_invalidations

PROXIED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def learn_unadvertised() -> LearnedCapacity:
    """The capacity of a backend that advertises none, learned from its latency: it starts where a
    gateway process used to bound a pool alone, and may halve or double from there."""
    return LearnedCapacity(Gradient2Limit(initial_limit=64, max_limit=256))


def check_upstreams(settings: Settings, config: Config) -> None:
    """Every pool a route names must have URLs in the settings."""
    for route in config.routes.values():
        if not settings.upstreams.get(route.upstream):
            raise ConfigError(
                f"{config.source}: routes: {route.path} forwards to upstream {route.upstream!r}, "
                f"which has no URL; set QUOTAGATE_UPSTREAMS='{route.upstream}=http://host:port'"
            )


class Gateway:
    """The ASGI app: a proxied route's request goes to `proxy`, anything else to the Starlette app."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state  # `services`, once the lifespan has started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in PROXIED_METHODS:
            services: Services = self.state.services
            route = services.config.routes.get(scope["path"])
            if route is not None:
                await proxy(services, route, scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings, config: Config, *, registry: CollectorRegistry | None = None) -> Gateway:
    """The gateway for `settings` and `config`; metrics go to `registry` (a fresh one if None)."""
    check_upstreams(settings, config)
    metrics = GatewayMetrics(registry or CollectorRegistry())
    metrics.declare(config.plans, config.routes, settings.upstreams)
    metrics.loaded_config(config.version)
    live_config = LiveConfig(
        config, Path(settings.config_path), metrics, check=lambda new: check_upstreams(settings, new)
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connect(settings.redis_url, timeout=settings.redis_timeout)
        upstream_client = UpstreamClient(
            connect_timeout=settings.upstream_connect_timeout, read_timeout=settings.upstream_read_timeout
        )
        if isinstance(redis, Redis):
            # A pooled connection that Redis closed (it restarted) fails once; try again at once on a
            # fresh one, so the first calls after a restart do not fail nor reopen the circuit breaker.
            redis.set_retry(Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        if isinstance(redis, RedisCluster):
            # Learn the slot map before the first request: a cold cluster client that meets many
            # concurrent first commands can fail outside redis-py's error tree.
            await redis.initialize()
        near_cache = DenialCache()
        # A cluster client has no pub/sub here: without invalidations, identities are cached 1 s only.
        following = isinstance(redis, Redis)
        breaker = CircuitBreaker(on_change=lambda is_open: metrics.store_circuit_open.set(int(is_open)))
        keys = KeyStore(
            redis, settings.key_secret, cache_ttl=settings.key_cache_ttl if following else 1.0, breaker=breaker
        )
        stop_following = asyncio.Event()
        follower = (
            asyncio.create_task(follow_invalidations(redis, stop_following, [near_cache, keys]))
            if isinstance(redis, Redis)
            else None
        )
        engine = Engine(redis, near_cache=near_cache)
        forwarder = Forwarder(upstream_client, settings.upstreams)
        places = PoolPlaces(Fleet(engine, place_ttl=settings.place_ttl), Shedder(), breaker)
        pool_watch = PoolWatch(places, live_config, metrics)
        brownouts = Brownouts(redis, lambda: live_config.current.brownouts, pool_watch.wait_of, metrics=metrics)
        capacity = CapacityWatcher(
            upstream_client,
            settings.upstreams,
            places.fleet,
            every=settings.capacity_poll,
            set_aside=forwarder.is_set_aside,
            learn=learn_unadvertised,
        )
        # The pools' capacity is known before the first request is let in.
        await capacity.poll_once(time.monotonic())
        for pool in settings.upstreams:
            metrics.upstream_healthy.labels(pool).set(forwarder.healthy(pool))
        stop_watching = asyncio.Event()
        interval = settings.config_poll_interval
        watcher = asyncio.create_task(live_config.watch(stop_watching, every=interval)) if interval > 0 else None
        app.state.redis = redis
        auth_guard = FailedAuthGuard(engine, settings.auth_failures_per_minute, breaker=breaker)
        app.state.services = Services(
            settings=settings,
            live_config=live_config,
            caller=Caller(keys, TrustedProxies(settings.trusted_proxies), auth_guard, settings.account_header),
            store=StoreGuard(engine, metrics, breaker, LocalBudget()),
            refusals=Refusals(near_cache),
            places=places,
            jobs=JobStore(redis, result_ttl=settings.job_result_ttl, result_bytes=settings.job_result_bytes),
            brownouts=brownouts,
            capacity=capacity,
            leases=Leases(engine),
            forwarder=forwarder,
            metrics=metrics,
        )
        dispatcher = Dispatcher(app.state.services)
        stop_fleet = asyncio.Event()
        fleet_tasks = [
            asyncio.create_task(dispatcher.run(stop_fleet)),
            asyncio.create_task(pool_watch.run(stop_fleet)),
            asyncio.create_task(capacity.run(stop_fleet)),
            asyncio.create_task(brownouts.watch(stop_fleet)),
        ]
        try:
            with reload_on_sighup(live_config):
                live_config.poll()  # a change saved while this worker started, before SIGHUP could reach it
                # What startup made lives as long as the process: keep it out of the collector's scans,
                # which otherwise stall requests now and then (p99 at 64 connections: 45 → 31 ms).
                gc.freeze()
                yield
        finally:
            stop_watching.set()
            if watcher is not None:
                await watcher
            stop_fleet.set()
            await asyncio.wait(fleet_tasks)
            await places.close()
            if follower is not None:
                stop_following.set()
                follower.cancel()
                await asyncio.wait([follower])
            await app.state.services.leases.close()
            await upstream_client.close()
            await engine.aclose()
            await redis.aclose()
            worker_exited()
            flush_logs()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        services: Services = request.app.state.services
        breaker = services.store.breaker
        version = services.config.version
        if not breaker.allow():  # the breaker is open: no need to wait on Redis to know
            body = {"status": "unavailable", "redis": "circuit open", "config_version": version}
            return JSONResponse(body, status_code=503)
        try:
            await request.app.state.redis.ping()
        except RedisError as exc:
            breaker.failed()
            services.metrics.redis_errors.labels("readyz").inc()
            # The kind of failure only: its text names Redis's address, which the public port must not tell.
            body = {"status": "unavailable", "redis": type(exc).__name__, "config_version": version}
            return JSONResponse(body, status_code=503)
        breaker.succeeded()  # a probe like any other: with no traffic, readiness checks close the breaker
        # The worker's pid tells ops (and tests) which of several uvicorn workers answered.
        return JSONResponse({"status": "ready", "config_version": version, "worker": os.getpid()})

    async def not_found(request: Request) -> Response:
        raise NotFound(f"No route for {request.method} {request.url.path}.")

    async def metrics_endpoint(request: Request) -> Response:
        return Response(render(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/openapi.json", openapi_endpoint),
        Route("/v1/quota", logged(quota), methods=["GET"]),
        Route(JOBS_PATH + "{job_id}", logged(job_endpoint), methods=["GET", "DELETE"]),
        Route("/{path:path}", logged(not_found), methods=PROXIED_METHODS),
    ]
    return Gateway(Starlette(routes=routes, lifespan=lifespan, exception_handlers={ApiError: handle_api_error}))


def app_from_env() -> Gateway:
    """uvicorn factory: the gateway configured by QUOTAGATE_* environment variables."""
    # Until the lifespan takes SIGHUP to reload, one must not end this worker (the default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = Settings.from_env()
    configure_logging(settings.log_format, flush_after=settings.log_flush)
    return create_app(settings, load_config(settings.config_path))
