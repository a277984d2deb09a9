"""Async image jobs over HTTP: `Prefer: respond-async` (RFC 7240) on a route, then `/v1/images/jobs/{id}`.

A request that asks for it and finds no place now is answered `202 Accepted` with the job's `Location`, its
position in its plan's line and the seconds until its turn; the fleet runs it then (gateway/http/dispatch.py).
`GET` on the job says how it stands (with position and ETA while queued, the images once done); `DELETE` before
it starts cancels it, and nothing is charged, since a job is charged when the backend starts it. A job is
visible only to the account that made it: any other key gets 404, as for a job that does not exist.
"""

from __future__ import annotations

import json
import math

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.admission import jobs
from gateway.admission.identity import Identity
from gateway.errors import JobStarted, NotFound, RawAnswer, asgi_headers
from gateway.http.request_headers import header_fields
from gateway.http.services import Services
from limits import Queued

JOBS_PATH = "/v1/images/jobs/"


def wants_async(headers: dict[str, str]) -> bool:
    """Whether the `Prefer` field asks for `respond-async` (its preferences are comma-separated, names caseless)."""
    prefer = headers.get("prefer")
    if not prefer:
        return False
    return any(p.split(";", 1)[0].split("=", 1)[0].strip().lower() == "respond-async" for p in prefer.split(","))


def accepted(job: jobs.Job, queued: Queued) -> RawAnswer:
    """The 202 of a job that waits its turn."""
    body = json.dumps({**job.view(), "position": queued.position, "eta_s": round(queued.wait, 3)}).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Location": JOBS_PATH + job.id,
        "Retry-After": str(max(1, math.ceil(queued.wait))),
        "Preference-Applied": "respond-async",
    }
    return RawAnswer(202, asgi_headers(headers), body)


async def job_endpoint(request: Request) -> Response:
    """`GET` a job (how it stands) or `DELETE` it (cancel it before it starts, or forget its result)."""
    services: Services = request.app.state.services
    job_id = request.path_params["job_id"]
    identity = await _identify(services, request)
    job = await services.jobs.get(job_id)
    if job is None or job.account != identity.account:  # another account's job is as good as absent
        raise NotFound(f"No job {job_id!r}.")
    if request.method == "DELETE":
        return await _delete(services, job)
    body = job.view()
    headers = {}
    if job.status == jobs.QUEUED:
        places = services.places
        standing = await places.fleet.position(job.pool, places.rules(services.config, job.pool), job.id)
        if standing is not None:
            position, wait = standing
            body |= {"position": position, "eta_s": round(wait, 3)}
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
    elif job.status == jobs.RUNNING:
        headers["Retry-After"] = "1"
    return JSONResponse(body, headers=headers)


async def _delete(services: Services, job: jobs.Job) -> Response:
    if job.status == jobs.QUEUED:
        places = services.places
        if await places.fleet.cancel(job.pool, places.rules(services.config, job.pool), job.id):
            await services.jobs.end(job.id, jobs.CANCELLED, 0, b"")
            services.metrics.jobs.labels(job.plan, jobs.CANCELLED).inc()
            return JSONResponse({**job.view(), "status": jobs.CANCELLED})
        # Its turn came meanwhile: it is starting (its record may not say so yet) or running.
        raise JobStarted("The job has started; it can no longer be cancelled.")
    if job.status == jobs.RUNNING:
        raise JobStarted("The job has started; it can no longer be cancelled.")
    await services.jobs.delete(job.id)  # ended: its result is forgotten
    return JSONResponse({**job.view(), "deleted": True})


async def _identify(services: Services, request: Request) -> Identity:
    headers = header_fields(request.scope["headers"])
    return await services.caller.identify(headers, request.client.host if request.client else None)
