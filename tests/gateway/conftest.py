"""Gateway fixtures: a stub upstream on a real socket, and a gateway app over the real Redis."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import Config, parse_config
from gateway.settings import Settings

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


@dataclass
class StubUpstream:
    """An image service stand-in: answers like the backend, or as a test tells it to fail."""

    url: str = ""
    status: int = 200
    extra_headers: dict[str, str] = field(default_factory=dict)
    seen: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def images(request: Request) -> Response:
            body = await request.json()
            self.seen.append(dict(request.headers))
            if self.status != 200:
                error = {"error": {"message": "stub failure", "type": "server_error", "param": None, "code": None}}
                return JSONResponse(error, status_code=self.status, headers=self.extra_headers)
            data = [{"b64_json": "aW1hZ2U="} for _ in range(body.get("n", 1))]
            return JSONResponse({"created": int(time.time()), "data": data})

        return Starlette(routes=[Route("/v1/images/generations", images, methods=["POST"])])


@pytest.fixture(scope="session")
def _stub_server() -> Iterator[StubUpstream]:
    stub = StubUpstream()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    stub.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(stub.app(), log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield stub
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def upstream(_stub_server: StubUpstream) -> StubUpstream:
    """The stub upstream, reset to answering 200."""
    _stub_server.status = 200
    _stub_server.extra_headers = {}
    _stub_server.seen.clear()
    return _stub_server


@pytest.fixture
def config() -> Config:
    return parse_config(QUOTAS, source="quotas.yaml")


def settings_for(redis_url: str, upstream_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "config_path": "quotas.yaml",
        "redis_url": redis_url,
        "key_secret": SECRET,
        "upstreams": MappingProxyType({"diffusion": (upstream_url,)}),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
