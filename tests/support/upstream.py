"""A stand-in image service, in a test's thread or in a process of its own (for a test to kill).

In a thread, `StubUpstream` answers like the backend, or as the test tells it: fail with a status, hold each
answer until a gate opens, or stream its head at once and the rest when the gate opens.

As a process, `python -m tests.support.upstream PORT MODE` (advertising $STUB_CAPACITY images on
`GET /v1/capacity` if set, else answering it 404 like a server that advertises nothing):
`answer`: answers like the backend (400 unless the body is a JSON object with a string `prompt`; else `n`
images), and appends the headers of every request, one JSON object a line, to $STUB_SEEN_FILE.
`hold`: reads the request, prints `arrived`, never answers.
`split`: answers 200, sends the head of a JSON body, prints `sent`, never sends the rest.
`short`: as `split`, but the answer declares its Content-Length (the gateway reads such answers whole).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from tests.ports import free_port

from .processes import wait_ready

HOLD_LIMIT = 20.0  # seconds a held stub answer waits at most for its gate: a bound on a hung test
IMAGE = "aW1hZ2U="


@dataclass
class StubUpstream:
    """An image service stand-in: answers like the backend, or as a test tells it to fail or wait.

    With `gate` set, each answer waits for the gate to open; with `split` also set, it first sends
    the head of its body, and the rest once the gate opens (a slow, streamed answer).
    """

    url: str = ""
    status: int = 200
    extra_headers: dict[str, str] = field(default_factory=dict)
    seen: list[dict[str, str]] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)  # job tokens the gateway withdrew (DELETE /v1/jobs/...)
    gate: threading.Event | None = None
    split: bool = False

    def app(self) -> Starlette:
        async def images(request: Request) -> Response:
            body = await request.json()
            self.seen.append(dict(request.headers))
            if self.status != 200:
                error = {"error": {"message": "stub failure", "type": "server_error", "param": None, "code": None}}
                return JSONResponse(error, status_code=self.status, headers=self.extra_headers)
            data = [{"b64_json": IMAGE} for _ in range(body.get("n", 1))]
            answer = json.dumps({"created": int(time.time()), "data": data}).encode()
            if self.gate is not None and self.split:
                return StreamingResponse(self._split(answer, self.gate), media_type="application/json")
            if self.gate is not None:
                await _opened(self.gate)
            return Response(answer, media_type="application/json", headers=self.extra_headers)

        async def withdraw(request: Request) -> Response:
            # An upstream that cannot tell whether a job began: the request it holds goes on.
            self.withdrawn.append(request.path_params["token"])
            return JSONResponse({"error": {"message": "unknown job", "type": "not_found"}}, status_code=404)

        return Starlette(
            routes=[
                Route("/v1/images/generations", images, methods=["POST"]),
                Route("/v1/jobs/{token}", withdraw, methods=["DELETE"]),
            ]
        )

    @staticmethod
    async def _split(answer: bytes, gate: threading.Event) -> AsyncIterator[bytes]:
        yield answer[:10]
        await _opened(gate)
        yield answer[10:]


async def _opened(gate: threading.Event) -> None:
    """Wait for a gate a test thread opens (polled: it is a threading.Event)."""
    for _ in range(int(HOLD_LIMIT / 0.005)):
        if gate.is_set():
            return
        await asyncio.sleep(0.005)


@contextmanager
def serve_in_thread(app: ASGIApp, *, lifespan: str = "off") -> Iterator[str]:
    """`app` served by uvicorn on a real loopback socket in a thread; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def upstream_process(mode: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The stub in its own process in `mode`, ready; yields the process (read its stdout) and URL. Killed at exit."""
    port = free_port()
    command = [sys.executable, "-m", "tests.support.upstream", str(port), mode]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(process, url, lambda: "(its output is the test's to read)")
        yield process, url
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def process_app(mode: str) -> Starlette:
    """The stub as its own process runs it, in `mode` (see the module's docstring)."""
    seen_file = os.environ.get("STUB_SEEN_FILE")
    seen = open(seen_file, "a", buffering=1) if seen_file else None  # noqa: SIM115 - open while serving

    async def images(request: Request) -> Response:
        if mode == "answer":
            return _answer(request, await request.body(), seen)
        await request.body()
        if mode == "hold":
            print("arrived", flush=True)
            await asyncio.Event().wait()

        async def body() -> AsyncIterator[bytes]:
            yield b'{"created": 1, "data": ['
            print("sent", flush=True)
            await asyncio.Event().wait()

        declared = {"content-length": "1000"} if mode == "short" else None
        return StreamingResponse(body(), media_type="application/json", headers=declared)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def capacity(request: Request) -> Response:
        if advertised is None:
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        reading = {"slots": advertised, "queue_images": 0, "queued_images": 0, "running_images": 0}
        return JSONResponse({**reading, "images_per_s": 100.0, "ready": True})

    advertised = int(os.environ["STUB_CAPACITY"]) if os.environ.get("STUB_CAPACITY") else None
    routes = [Route("/v1/images/generations", images, methods=["POST"]), Route("/healthz", healthz)]
    return Starlette(routes=[*routes, Route("/v1/capacity", capacity)])


def _answer(request: Request, raw: bytes, seen: IO[str] | None) -> Response:
    if seen is not None:
        seen.write(json.dumps(dict(request.headers)) + "\n")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        error = {"message": "`prompt` is required", "type": "invalid_request_error", "param": "prompt", "code": None}
        return JSONResponse({"error": error}, status_code=400)
    n = body.get("n", 1) if isinstance(body.get("n"), int) else 1
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": IMAGE}] * n})


if __name__ == "__main__":
    port, mode = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(process_app(mode), host="127.0.0.1", port=port, log_level="warning", access_log=False)
