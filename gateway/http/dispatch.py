"""Run async jobs at their turn: every gateway process claims the jobs whose place has come, fleet-wide.

A claimed job holds its place in the pool as any request does. It is decided on against its plan when it
starts, so it is charged when the backend starts it and never for a job cancelled, refused or failed: a
refusal (its quota spent meanwhile) or a failure is kept as the job's error, refunded; the backend's answer
is kept as its result for `result_ttl` seconds. Results over `result_bytes` are refunded and failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gateway.admission import jobs
from gateway.admission.decision import admit
from gateway.admission.identity import Identity
from gateway.admission.places import Held
from gateway.errors import ApiError, BadGateway, error_body
from gateway.http.services import Services
from limits import Claimed

log = logging.getLogger("quotagate.jobs")

# Seconds between looks at the line when no job could start.
CLAIM_EVERY_S = 0.1
# Looks at the line between looks for jobs whose replica died while they ran.
ORPHANS_EVERY = 10
ORPHANED = (
    b'{"error":{"message":"The gateway running this job stopped before it ended; it was not charged. Send it again.",'
    b'"type":"server_error","param":null,"code":"upstream_error"}}'
)


class Dispatcher:
    """Claims the jobs whose turn has come and runs them, each in a task of its own."""

    def __init__(self, services: Services, *, every: float = CLAIM_EVERY_S) -> None:
        self._services = services
        self._every = every
        self._running: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and start jobs until `stop` is set; then wait for those running."""
        rounds = 0
        while not stop.is_set():
            rounds += 1
            try:
                if rounds % ORPHANS_EVERY == 0:
                    await self.settle_orphans()
                started = await self.claim_all()
            except Exception as exc:  # Redis is away: the jobs wait in Redis for the next look
                log.warning("could not look for jobs to run: %s", exc)
                started = 0
            if not started:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._every)
        if self._running:
            await asyncio.wait(self._running)

    async def claim_all(self) -> int:
        """Start every job whose place has come now; how many started."""
        services = self._services
        config = services.config
        started = 0
        for pool in config.routed_pools:
            rules = services.places.rules(config, pool)
            while (claimed := await services.places.fleet.claim(pool, rules)) is not None:
                services.places.hold(claimed.place)
                task = asyncio.get_running_loop().create_task(self._run(claimed))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                started += 1
        return started

    async def settle_orphans(self) -> int:
        """Fail and refund the jobs whose replica died while they ran; how many there were."""
        services = self._services
        config = services.config
        settled = 0
        for pool in config.routed_pools:
            for job_id in await services.places.fleet.orphans(pool, services.places.rules(config, pool)):
                job = await services.jobs.get(job_id)
                if job is None or job.status != jobs.RUNNING:
                    continue
                if job.refund and await services.store.refund_later(job.refund):
                    services.metrics.images_refunded.labels(job.plan, "upstream_error").inc(job.images)
                log.warning("job %s was left running by a gateway that stopped: failed, refunded", job.id)
                await self._fail(job, 502, ORPHANED)
                settled += 1
        return settled

    async def _run(self, claimed: Claimed) -> None:
        services = self._services
        try:
            job = await services.jobs.get(claimed.job)
            if job is None:  # its record lapsed: nothing to run
                return
            services.metrics.eta_error.observe(_eta_error(job, time.time()))
            await self._start(job, claimed.backend)
        except Exception:
            log.exception("job %s could not be run", claimed.job)
        finally:
            services.places.give_back(Held(claimed.place.pool, claimed.place, claimed.backend))

    async def _start(self, job: jobs.Job, backend: str) -> None:
        services = self._services
        plan = services.config.plan_at(job.plan, time.time(), services.brownouts.applied())
        if plan is None:
            await self._fail(job, 403, b'{"error":{"message":"This plan is no longer offered."}}')
            return
        try:
            decision = await admit(services.store, Identity(job.account, job.plan, None), plan, job.images)
        except ApiError as exc:  # refused when its turn came (its quota spent meanwhile): nothing charged
            await self._fail(job, exc.status, error_body(exc))
            return
        if decision is not None:
            services.metrics.images_charged.labels(plan.name).inc(job.images)
        refund = None if decision is None else services.store.refund_of(job.account, decision)
        await services.jobs.running(job.id, refund)
        status, answer = await self._forward(job, plan.priority, backend)
        if 200 <= status < 300 and len(answer) <= services.jobs.result_bytes:
            await services.jobs.end(job.id, jobs.DONE, status, answer)
            services.metrics.jobs.labels(job.plan, jobs.DONE).inc()
            return
        if decision is not None and await services.store.refund(job.account, plan, decision):
            services.metrics.images_refunded.labels(plan.name, "upstream_error").inc(job.images)
        if 200 <= status < 300:
            status, answer = 502, b'{"error":{"message":"The images were larger than a job keeps; not charged."}}'
        await self._fail(job, status, answer)

    async def _forward(self, job: jobs.Job, priority: int, backend: str) -> tuple[int, bytes]:
        """The backend's status and whole answer; 502 and the error's body if none came."""
        services = self._services
        headers = [
            ("Content-Type", "application/json"),
            ("X-Request-Id", job.id),
            ("X-Quotagate-Priority", str(priority)),
            ("X-Quotagate-Plan", job.plan),
            ("X-Quotagate-Account", job.account),
            ("X-Quotagate-Job", job.id),
        ]
        policy = services.config.pool(job.pool)
        upstream = services.forwarder.upstream(job.pool, backend)
        started, status = time.perf_counter(), 0
        services.capacity.started(job.pool, upstream.url, job.images)
        try:
            answer = await services.forwarder.open(
                job.pool, policy, "POST", job.route, headers, job.body, upstream=upstream
            )
            status = answer.status
        except BadGateway as exc:
            return exc.status, error_body(exc)
        finally:
            took = time.perf_counter() - started
            services.capacity.finished(job.pool, upstream.url, took, job.images, 200 <= status < 300)
        failed = False
        try:
            return answer.status, await answer.read()
        except BadGateway as exc:
            failed = True
            return exc.status, error_body(exc)
        finally:
            answer.finish(upstream_failed=failed)

    async def _fail(self, job: jobs.Job, status: int, body: bytes) -> None:
        await self._services.jobs.end(job.id, jobs.FAILED, status, body)
        self._services.metrics.jobs.labels(job.plan, jobs.FAILED).inc()


def _eta_error(job: jobs.Job, now: float) -> float:
    """How far the job's start was from the turn it was told, as a share of the wait it was told (at least 1 s)."""
    waited = now - job.created
    return abs(waited - job.told_wait) / max(job.told_wait, 1.0)
