"""Gateway fixtures: a stub upstream on a real socket, and a gateway app over the real Redis."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway.config.quotas import Config, parse_config
from gateway.config.settings import Settings

SECRET = b"test-secret-of-at-least-16-bytes"

QUOTAS = """\
timezone: UTC
plans:
  free:
    priority: 0
    daily_images: 3
    rate: {images: 60, per: minute, burst: 10}
  pro:
    priority: 10
    daily_images: unlimited
    rate: {images: 6000, per: minute, burst: 100}
routes:
  - path: /v1/images/generations
    upstream: diffusion
    cost: images
"""


HOLD_LIMIT = 20.0  # seconds a held stub answer waits at most for its gate: a bound on a hung test


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
            data = [{"b64_json": "aW1hZ2U="} for _ in range(body.get("n", 1))]
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


@pytest.fixture(scope="session")
def _stub_server() -> Iterator[StubUpstream]:
    stub = StubUpstream()
    with serve_in_thread(stub.app()) as stub.url:
        yield stub


@pytest.fixture
def upstream(_stub_server: StubUpstream) -> Iterator[StubUpstream]:
    """The stub upstream, reset to answering 200 at once."""
    _stub_server.status = 200
    _stub_server.extra_headers = {}
    _stub_server.seen.clear()
    _stub_server.gate, _stub_server.split = None, False
    yield _stub_server
    if _stub_server.gate is not None:
        _stub_server.gate.set()  # let answers still held go


@pytest.fixture
def config() -> Config:
    return parse_config(QUOTAS, source="quotas.yaml")


@pytest.fixture
def quota_file(tmp_path: Path) -> Path:
    """QUOTAS in a file, for gateways that read (and reload) it."""
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS)
    return path


def settings_for(redis_url: str, upstream_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "config_path": "quotas.yaml",
        "redis_url": redis_url,
        "key_secret": SECRET,
        "upstreams": MappingProxyType({"diffusion": (upstream_url,)}),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
