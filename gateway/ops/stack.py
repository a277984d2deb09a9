"""`quotagate up`: redis-server, the diffusion backend and the gateway, run in the foreground.

Each child runs in its own session, so Ctrl-C reaches only this supervisor, which then stops
them in order: the gateway (no new requests), the backend, then Redis (which flushes its AOF).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from gateway.admission.identity import KeyStore
from gateway.config.quotas import load_config
from gateway.ops.datadir import DataDir
from gateway.ops.embedded_redis import RedisServer
from limits import connect

BACKEND_READY_TIMEOUT = 600.0  # the first start creates the tiny model and imports torch
GATEWAY_READY_TIMEOUT = 60.0


class StackError(RuntimeError):
    """A part of the stack did not start."""


def up(
    config_path: Path,
    *,
    port: int,
    data: DataDir,
    host: str = "127.0.0.1",
    model: str = "tiny",
    admin_port: int | None = None,
) -> int:
    """Start everything, print the demo keys, and serve until interrupted. Returns an exit code.

    With `admin_port`, the admin API listens on 127.0.0.1 there; its token is in the data directory.
    """
    config = load_config(config_path)
    secret = data.key_secret(create=True)
    redis = RedisServer(data.redis)
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        redis.start()
        backend_port = _free_port()
        backend = _spawn(
            "quotagate-backend", "serve", "--model", model, "--data-dir", str(data.root),
            "--host", "127.0.0.1", "--port", str(backend_port),
        )  # fmt: skip
        children.append(backend)
        _wait_ready(f"http://127.0.0.1:{backend_port}/readyz", backend, "backend", BACKEND_READY_TIMEOUT, stop)
        env = {
            "QUOTAGATE_CONFIG": str(Path(config_path).resolve()),
            "QUOTAGATE_REDIS_URL": redis.url,
            "QUOTAGATE_KEY_SECRET": secret.decode(),
            "QUOTAGATE_UPSTREAMS": f"diffusion=http://127.0.0.1:{backend_port}",
        }
        admin: tuple[str, ...] = ()
        if admin_port is not None:
            env["QUOTAGATE_ADMIN_TOKEN"] = data.admin_token(create=True).decode()
            admin = ("--admin-port", str(admin_port))
        gateway = _spawn("quotagate", "serve", "--host", host, "--port", str(port), *admin, env=env)
        children.append(gateway)
        _wait_ready(f"http://{host}:{port}/readyz", gateway, "gateway", GATEWAY_READY_TIMEOUT, stop)
        data.write_stack(
            {"redis_url": redis.url, "gateway_url": f"http://{host}:{port}", "config": env["QUOTAGATE_CONFIG"]}
        )
        plans = sorted(config.plans, key=lambda name: config.plans[name].priority)
        keys = asyncio.run(_demo_keys(redis.url, secret, plans[0], plans[-1]))
        admin_line = f"Admin API: http://127.0.0.1:{admin_port}  (token in {data.admin_token_file})"
        _print_banner(host, port, keys, admin_line if admin_port is not None else None)
        while not stop.is_set():
            if any(child.poll() is not None for child in children) or not redis.running:
                print("quotagate: a part of the stack exited; stopping the rest", file=sys.stderr, flush=True)
                return 1
            stop.wait(0.2)
        return 0
    except StackError as exc:
        print(f"quotagate: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for child in reversed(children):
            _terminate(child)
        redis.stop()
        data.clear_stack()
        print("quotagate: stopped", file=sys.stderr, flush=True)


def _spawn(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    beside = Path(sys.executable).with_name(script)
    program = str(beside) if beside.exists() else shutil.which(script)
    if program is None:
        raise StackError(f"{script} is not installed; run `make setup`")
    return subprocess.Popen([program, *args], env={**os.environ, **(env or {})}, start_new_session=True)


def _wait_ready(url: str, child: subprocess.Popen[bytes], name: str, timeout: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if child.poll() is not None:
            raise StackError(f"the {name} exited with code {child.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.2)
    raise StackError(f"the {name} was not ready at {url} within {timeout:.0f}s" if not stop.is_set() else "interrupted")


def _terminate(child: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _demo_keys(redis_url: str, secret: bytes, low: str, high: str) -> dict[str, str]:
    redis = connect(redis_url)
    try:
        store = KeyStore(redis, secret)
        return {plan: await store.create_key(f"demo-{plan}", plan) for plan in (low, high)}
    finally:
        await redis.aclose()


def _print_banner(host: str, port: int, keys: dict[str, str], admin_line: str | None) -> None:
    base = f"http://{host}:{port}"
    body = json.dumps({"prompt": "a lighthouse at dusk", "n": 1, "size": "256x256", "response_format": "b64_json"})
    first = next(iter(keys.values()))
    lines = [
        "",
        f"quotagate is up on {base}",
        *(f"  {plan:>5} key: {key}" for plan, key in keys.items()),
        "",
        "Generate an image:",
        f"  curl -s {base}/v1/images/generations -H 'Authorization: Bearer {first}' \\",
        f"    -H 'Content-Type: application/json' -d '{body}' \\",
        '    | python3 -c \'import base64,json,sys; open("image.png","wb").write('
        'base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))\'',
        "",
        *([admin_line] if admin_line else []),
        f"Metrics: {base}/metrics    Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
