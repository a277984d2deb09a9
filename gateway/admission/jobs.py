"""Async image jobs (`Prefer: respond-async`): their records in Redis, so any replica answers for them.

A job's record holds what was asked (account, plan, route, images, body) and how it stands: queued (its
ticket waits in the pool's line, limits/fleet.py), running, done (the backend's answer, kept `result_ttl`
seconds), failed (the error a client would have read), or cancelled. Its id is unguessable and only its
account may read it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from gateway.errors import ServiceUnavailable
from limits import RedisClient

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
# Seconds a job's record lives while it waits or runs: past that it is gone, as a lapsed ticket is.
WAITING_TTL_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    account: str
    plan: str
    route: str
    pool: str
    images: int
    body: bytes
    status: str
    created: float  # s since the epoch
    told_wait: float  # seconds until its turn, as first told
    answer_status: int = 0
    answer: bytes = b""  # the backend's answer when done, the error's body when failed
    refund: str = ""  # while running: what refunding its charge takes, should its replica die (limits.Engine)

    def view(self) -> dict[str, Any]:
        """The job as its owner reads it (without position and ETA, which the line knows)."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "image.job",
            "status": self.status,
            "created": int(self.created),
        }
        if self.status == DONE:
            body["result"] = json.loads(self.answer)
        elif self.status == FAILED:
            body["error"] = json.loads(self.answer).get("error") if self.answer else None
            body["status_code"] = self.answer_status
        return body


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(18)


def _key(job_id: str) -> str:
    return f"qg:job:{{{job_id}}}"


class JobStore:
    """Reads and writes job records; ServiceUnavailable (503) when Redis cannot be reached."""

    def __init__(self, redis: RedisClient, *, result_ttl: float, result_bytes: int) -> None:
        self._redis = redis
        self.result_ttl = result_ttl
        self.result_bytes = result_bytes

    async def create(self, job: Job) -> None:
        fields: dict[str, str | int | bytes] = {
            "account": job.account,
            "plan": job.plan,
            "route": job.route,
            "pool": job.pool,
            "images": job.images,
            "body": job.body,
            "status": job.status,
            "created": repr(job.created),
            "told_wait": repr(job.told_wait),
        }
        await self._run(self._write(job.id, fields, WAITING_TTL_S))

    async def told(self, job_id: str, wait: float) -> None:
        await self._run(self._redis.hset(_key(job_id), "told_wait", repr(wait)))

    async def get(self, job_id: str) -> Job | None:
        raw = await self._run(self._redis.hgetall(_key(job_id)))
        if not raw or b"account" not in raw:
            return None
        text = {k.decode(): v for k, v in raw.items()}
        return Job(
            id=job_id,
            account=text["account"].decode(),
            plan=text["plan"].decode(),
            route=text["route"].decode(),
            pool=text["pool"].decode(),
            images=int(text["images"]),
            body=text["body"],
            status=text["status"].decode(),
            created=float(text["created"]),
            told_wait=float(text["told_wait"]),
            answer_status=int(text.get("answer_status", b"0")),
            answer=text.get("answer", b""),
            refund=text.get("refund", b"").decode(),
        )

    async def running(self, job_id: str, refund: str | None) -> None:
        """The job was charged and goes to the backend; `refund` is what refunding that charge takes."""
        await self._run(self._redis.hset(_key(job_id), mapping={"status": RUNNING, "refund": refund or ""}))

    async def end(self, job_id: str, status: str, answer_status: int, answer: bytes) -> None:
        """The job ended (done, failed or cancelled): its answer is kept `result_ttl` seconds."""
        fields: dict[str, str | int | bytes] = {"status": status, "answer_status": answer_status, "answer": answer}
        fields["body"] = fields["refund"] = b""
        await self._run(self._write(job_id, fields, self.result_ttl))

    async def delete(self, job_id: str) -> None:
        await self._run(self._redis.delete(_key(job_id)))

    async def _write(self, job_id: str, fields: dict[Any, Any], ttl: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(_key(job_id), mapping=fields)
            pipe.expire(_key(job_id), max(1, round(ttl)))
            await pipe.execute()

    @staticmethod
    async def _run(call: Any) -> Any:
        try:
            return await call
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(
                "The job service is unavailable; retry shortly.", headers={"Retry-After": "1"}
            ) from exc
