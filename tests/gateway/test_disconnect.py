"""CancelOnDisconnect: a client that leaves cancels the work done for it, and only that is swallowed."""

from __future__ import annotations

import asyncio

import pytest

from gateway.http.disconnect import CancelOnDisconnect

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # cancel/uncancel of asyncio tasks is what is tested


async def test_a_client_that_leaves_cancels_the_block_and_is_told() -> None:
    messages: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    reached_the_end = False
    async with CancelOnDisconnect(messages.get, after=0) as watch:
        messages.put_nowait({"type": "http.request", "body": b"", "more_body": False})  # skipped
        messages.put_nowait({"type": "http.disconnect"})
        await asyncio.Event().wait()  # the upstream that never answers
        reached_the_end = True
    assert watch.gone and not reached_the_end
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)  # the task goes on working: nothing is left pending against it


async def test_a_block_that_ends_first_is_not_cancelled_later() -> None:
    messages: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    async with CancelOnDisconnect(messages.get, after=0) as watch:
        await asyncio.sleep(0)  # the watcher starts
    messages.put_nowait({"type": "http.disconnect"})
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not watch.gone


async def test_a_cancellation_from_elsewhere_goes_through() -> None:
    messages: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    started = asyncio.Event()
    watches: list[CancelOnDisconnect] = []

    async def request() -> None:
        async with CancelOnDisconnect(messages.get, after=0) as watch:
            watches.append(watch)
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(request())
    await started.wait()
    task.cancel()  # the server shutting down
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not watches[0].gone


async def test_the_disconnect_that_follows_a_whole_answer_cancels_nothing() -> None:
    answered = asyncio.Event()
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:  # as uvicorn and TestClient do once the answer is complete
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()
            for _ in range(5):  # the server's send yields after the answer is out: the watcher runs
                await asyncio.sleep(0)

    finished = False
    async with CancelOnDisconnect(receive, after=0) as watch:
        await asyncio.sleep(0)  # the watcher starts, waiting on receive
        await asyncio.sleep(0)
        send_watched = watch.sending(send)
        await send_watched({"type": "http.response.start", "status": 502, "headers": []})
        await send_watched({"type": "http.response.body", "body": b"{}", "more_body": False})
        finished = True
    assert finished and not watch.gone and len(sent) == 2
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_block_shorter_than_the_delay_never_watches() -> None:
    received = 0

    async def receive() -> dict[str, object]:
        nonlocal received
        received += 1
        return {"type": "http.disconnect"}

    async with CancelOnDisconnect(receive, after=60) as watch:
        await asyncio.sleep(0)  # the block waits on something quick, as for a fast upstream
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert received == 0 and not watch.gone


class _ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it, and that counts the timers set on it."""

    now = 1000.0
    timers = 0

    def time(self) -> float:
        return self.now

    def call_later(self, delay, callback, *args, context=None):  # type: ignore[no-untyped-def]
        self.timers += 1
        return super().call_later(delay, callback, *args, context=context)


def test_one_timer_starts_the_watchers_of_the_blocks_that_have_run_long_enough() -> None:
    loop = _ClockLoop()
    watched: list[str] = []

    def receiver(name: str):  # type: ignore[no-untyped-def]
        async def receive() -> dict[str, object]:
            watched.append(name)
            await asyncio.Event().wait()  # the client stays
            return {}

        return receive

    async def block(name: str, release: asyncio.Event) -> None:
        async with CancelOnDisconnect(receiver(name), after=0.05):
            await release.wait()  # the upstream working

    async def turns() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def scenario() -> None:
        release = asyncio.Event()
        first = [asyncio.create_task(block(f"early {n}", release)) for n in range(20)]
        await turns()
        loop.now += 0.03
        late = asyncio.create_task(block("late", release))
        await turns()
        assert loop.timers == 1 and watched == []  # one timer for 21 blocks, none 0.05 s old yet
        loop.now += 0.02
        await turns()
        assert sorted(watched) == sorted(f"early {n}" for n in range(20))  # 0.05 s old; "late" is 0.02
        loop.now += 0.05
        await turns()
        assert watched[-1] == "late"  # watched at the next round, 0.07 s after it began
        release.set()
        await asyncio.gather(*first, late)

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert loop.timers == 2
