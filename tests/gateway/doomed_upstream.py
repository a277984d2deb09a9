"""An upstream that never finishes its answer, run as its own process so a test can kill it mid-request.

`python -m tests.gateway.doomed_upstream PORT hold`: reads the request, prints `arrived`, never answers.
`... PORT split`: answers 200, sends the head of a JSON body, prints `sent`, never sends the rest.
`... PORT short`: as `split`, but the answer declares its Content-Length (the gateway reads such answers whole).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.ports import free_port

START_LIMIT = 30.0  # seconds; a bound on a hang


@contextmanager
def doomed(mode: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The doomed upstream in `mode`, listening; yields its process (read its stdout) and URL. Killed at exit."""
    port = free_port()
    command = [sys.executable, "-m", "tests.gateway.doomed_upstream", str(port), mode]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_LIMIT
        while not _listening(port):
            assert process.poll() is None and time.monotonic() < deadline, "the doomed upstream did not start"
            time.sleep(0.02)
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def app(mode: str) -> Starlette:
    async def images(request: Request) -> Response:
        await request.body()
        if mode == "hold":
            print("arrived", flush=True)
            await asyncio.Event().wait()

        async def body():  # type: ignore[no-untyped-def]
            yield b'{"created": 1, "data": ['
            print("sent", flush=True)
            await asyncio.Event().wait()

        declared = {"content-length": "1000"} if mode == "short" else None
        return StreamingResponse(body(), media_type="application/json", headers=declared)

    return Starlette(routes=[Route("/v1/images/generations", images, methods=["POST"])])


if __name__ == "__main__":
    port, mode = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(app(mode), host="127.0.0.1", port=port, log_level="error")
