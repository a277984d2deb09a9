"""The engine's own connection: every URL form, its greeting, and how it fails and comes back.

Each server here is a real redis-server: with a password, with an ACL user, on a unix socket, over
TLS (certificates made by openssl for the test), restarted under load, and behind a relay that
cuts a reply in half.
"""

from __future__ import annotations

import ast
import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis

from gateway.ops.embedded_redis import RedisServer
from limits import Bucket, DailyQuota, Engine, LimitSet, StoreUnavailable, connect
from tests.ports import free_port

pytestmark = pytest.mark.anyio

FREE = LimitSet(
    buckets=(Bucket("free-rate", "rate", rate=600, period=60, burst=10),),
    quotas=(DailyQuota("free-daily", "daily", limit=3, timezone=ZoneInfo("UTC")),),
)
LIMITS_SOURCE = Path(__file__).resolve().parents[2] / "limits"


def started(data_dir: Path, *extra: str, port: int | None = None) -> RedisServer:
    server = RedisServer(data_dir, port=port, extra=extra)
    server.start()
    return server


async def decide_with(url: str, account: str = "ann") -> int:
    """Decide once for `account` through an engine on `url`; the daily images left."""
    client = connect(url, timeout=2.0)
    try:
        async with Engine(client) as engine:
            decision = await engine.decide(account, FREE, 1)
    finally:
        await client.aclose()
    assert decision.allowed
    remaining = decision.states[1].remaining
    assert remaining is not None
    return remaining


@pytest.mark.slow
async def test_a_password_is_sent_and_a_wrong_one_refused(tmp_path: Path) -> None:
    port = free_port()
    server = started(tmp_path, "requirepass s3cret-pass", port=port)
    try:
        assert await decide_with(f"redis://:s3cret-pass@127.0.0.1:{port}/0") == 2
        with pytest.raises(StoreUnavailable):
            await decide_with(f"redis://:wrong@127.0.0.1:{port}/0")
    finally:
        server.stop()


@pytest.mark.slow
async def test_an_acl_user_its_database_and_its_name_are_used(tmp_path: Path) -> None:
    port = free_port()
    server = started(tmp_path, "user default off", "user gate on >gate-pass ~* &* +@all", port=port)
    url = f"redis://gate:gate-pass@127.0.0.1:{port}/3?client_name=qg-engine"
    client = connect(url, timeout=2.0)
    try:
        async with Engine(client) as engine:
            assert (await engine.decide("bo", FREE, 1)).allowed
            with redis.Redis(port=port, username="gate", password="gate-pass") as admin:
                (mine,) = [c for c in admin.client_list() if c["name"] == "qg-engine"]
                assert mine["user"] == "gate" and mine["db"] == "3"
                assert admin.execute_command("SELECT", 3) and admin.dbsize() > 0
                assert admin.execute_command("SELECT", 0) and admin.dbsize() == 0
    finally:
        await client.aclose()
        server.stop()


async def test_a_unix_socket_and_its_database(redis_server: RedisServer) -> None:
    with redis.Redis(unix_socket_path=str(redis_server.socket), db=2) as admin:
        admin.flushdb()
        assert await decide_with(f"unix://{redis_server.socket}?db=2", "cy") == 2
        assert admin.dbsize() > 0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate it signed for localhost, and a second CA that signed nothing here."""
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
        )  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "s.csr")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "s.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.pem",
    )  # fmt: skip
    return folder


@pytest.mark.slow
async def test_tls_checks_the_servers_certificate(tmp_path: Path, certificates: Path) -> None:
    port = free_port()
    server = started(
        tmp_path,
        f"tls-port {port}",
        f"tls-cert-file {certificates / 'server.pem'}",
        f"tls-key-file {certificates / 'server.key'}",
        f"tls-ca-cert-file {certificates / 'ca.pem'}",
        "tls-auth-clients no",
    )
    try:
        assert await decide_with(f"rediss://localhost:{port}/0?ssl_ca_certs={certificates / 'ca.pem'}") == 2
        with pytest.raises(StoreUnavailable):  # a certificate no trusted CA signed: no decision is made
            await decide_with(f"rediss://localhost:{port}/0?ssl_ca_certs={certificates / 'other-ca.pem'}")
        with redis.Redis(unix_socket_path=str(server.socket)) as admin:
            assert admin.dbsize() == 2  # the first engine's bucket and day: the refused one wrote nothing
    finally:
        server.stop()


async def test_a_redis_that_stops_answering_fails_every_waiting_call_within_the_timeout(redis_url: str) -> None:
    client = connect(redis_url, timeout=0.2)
    try:
        async with Engine(client) as engine:
            assert (await engine.decide("ann", FREE, 1)).allowed
            with redis.Redis.from_url(redis_url) as admin:
                admin.client_pause(3000)  # Redis takes the commands and answers none for 3 s
            calls = [asyncio.create_task(engine.decide(f"u{i}", FREE, 1)) for i in range(8)]
            done, _ = await asyncio.wait(calls, timeout=2)
            assert done == set(calls)  # nobody waited for the pause to end
            assert all(isinstance(call.exception(), StoreUnavailable) for call in calls)
            with redis.Redis.from_url(redis_url) as admin:
                admin.client_unpause()
            assert (await engine.decide("ann", FREE, 1)).states[1].remaining == 1  # a new connection, same counts
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_redis_restarted_under_load_and_the_engine_deciding_again(tmp_path: Path) -> None:
    server = started(tmp_path)
    client = connect(server.url, timeout=0.5)
    outcomes: list[BaseException | None] = []
    stop, loaded, decided_again = asyncio.Event(), asyncio.Event(), asyncio.Event()
    restarted_at: list[int] = []

    async def load(worker: int) -> None:
        while not stop.is_set():
            try:
                await engine.decide(f"load-{worker}", FREE, 0)
                outcomes.append(None)
                if restarted_at and len(outcomes) > restarted_at[0]:
                    decided_again.set()
            except StoreUnavailable as exc:
                outcomes.append(exc)
                await asyncio.sleep(0.01)  # a client's back-off, not a wait for time to pass
            if len(outcomes) >= 200:
                loaded.set()

    try:
        async with Engine(client) as engine:
            assert (await engine.decide("bob", FREE, 2)).allowed
            workers = [asyncio.create_task(load(i)) for i in range(16)]
            await loaded.wait()
            server.kill()
            server.start()  # AOF brings the counts back
            restarted_at.append(len(outcomes))
            await asyncio.wait_for(decided_again.wait(), 10)
            stop.set()
            await asyncio.gather(*workers)  # every call ended: decided or StoreUnavailable, nothing else
            decision = await engine.decide("bob", FREE, 1)
            assert decision.allowed and decision.states[1].remaining == 0
    finally:
        await client.aclose()
        server.stop()


@pytest.fixture
async def cutting_relay(redis_server: RedisServer) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A TCP relay to Redis; once armed, it passes half of the next reply on and then cuts the connection."""
    armed = asyncio.Event()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_unix_connection(str(redis_server.socket))

        async def upward() -> None:
            while data := await client_reader.read(65536):
                redis_writer.write(data)

        up = asyncio.create_task(upward())
        try:
            while data := await redis_reader.read(65536):
                if armed.is_set():
                    client_writer.write(data[: len(data) // 2])
                    await client_writer.drain()
                    armed.clear()
                    break
                client_writer.write(data)
        finally:
            up.cancel()
            client_writer.close()
            redis_writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0", armed
    server.close()
    await server.wait_closed()


async def test_a_reply_cut_in_half_fails_its_calls_and_the_next_decision_reconnects(
    redis_url: str, cutting_relay: tuple[str, asyncio.Event]
) -> None:
    url, armed = cutting_relay
    client = connect(url, timeout=2.0)
    try:
        async with Engine(client) as engine:
            assert (await engine.decide("dee", FREE, 1)).allowed
            armed.set()
            with pytest.raises(StoreUnavailable, match="connection"):  # seen as the cut, not the reply timeout
                await engine.decide("dee", FREE, 1)
            assert (await engine.decide("eve", FREE, 1)).allowed
    finally:
        await client.aclose()


async def test_closing_the_engine_closes_its_connection_and_refuses_later_calls(redis_url: str) -> None:
    client = connect(redis_url)
    engine = Engine(client)
    try:
        await engine.decide("cy", FREE, 1)
        with redis.Redis.from_url(redis_url) as admin:
            assert len(admin.client_list()) == 2  # the engine's and the admin's
            await engine.aclose()
            for _ in range(100):
                if len(admin.client_list()) == 1:
                    break
                await asyncio.sleep(0.01)
            assert len(admin.client_list()) == 1
        with pytest.raises(StoreUnavailable):
            await engine.decide("cy", FREE, 1)
    finally:
        await client.aclose()


async def test_a_lone_decision_is_written_at_once_and_those_behind_a_reply_together(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        async with Engine(client) as engine:
            await engine.decide("dee", FREE, 1)  # the engine's connection is open
            coalescer = engine._coalescer
            assert coalescer is not None
            lone = asyncio.ensure_future(engine.decide("dee", FREE, 1))
            await asyncio.sleep(0)  # one loop pass: the call has run up to its wait for the reply
            assert coalescer.awaiting == 1 and not coalescer.queued  # written then, not at the turn's end
            await lone
            calls = [asyncio.ensure_future(engine.decide(f"e{i}", FREE, 1)) for i in range(4)]
            await asyncio.sleep(0)
            assert coalescer.awaiting == 1 and coalescer.queued == 3  # the rest wait for the turn's end
            assert all(decision.allowed for decision in await asyncio.gather(*calls))
    finally:
        await client.aclose()


def test_no_limits_module_uses_a_private_name_of_redis_py() -> None:
    """The engine meets redis-py at its public API only: a private name is one release away from breaking."""
    offences = []
    for path in sorted(LIMITS_SOURCE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("redis", "hiredis"):
                names = [*node.module.split("."), *(alias.name for alias in node.names)]
                offences += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr in ("_writer", "_reader", "set_protocol"):
                offences.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert offences == []
