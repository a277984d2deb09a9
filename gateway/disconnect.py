"""Stop working for a client that has gone: within `CancelOnDisconnect`, its disconnection cancels the task.

Once a request's body has been read, the next ASGI `receive()` returns only when the client
disconnects. One watcher task waits on it and cancels the request's own task, which then stops
wherever it waits (on the upstream, on the body, on the socket) and settles the charge. The block
swallows that cancellation, and only that one: a server shutting down still cancels the task.

The watcher starts only once the block has run for `after` seconds (WATCH_AFTER): a task and its
two steps were ~40 µs of the gateway's ~450 µs CPU per request (bench/overhead.py with the watcher
switched off), paid by every request, while only a long one has work worth stopping. A client that
left earlier is seen at once when the watcher starts, since `receive()` then answers its disconnect
without waiting. A block that ends within `after` never watches: its answer goes out as usual, and
a client gone by then simply does not read it.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive

# An image takes far longer than this to make; a stub upstream or a cached answer takes less.
WATCH_AFTER = 0.05


class CancelOnDisconnect:
    """`async with CancelOnDisconnect(receive) as watch:` ... then `watch.gone` tells whether the client left.

    Enter it only once the request body has been read: the watcher consumes what `receive` returns.
    """

    def __init__(self, receive: Receive, *, after: float = WATCH_AFTER) -> None:
        self._receive = receive
        self._after = after
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.gone = False

    async def __aenter__(self) -> CancelOnDisconnect:
        self._task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(self._after, self._start_watching)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        assert self._timer is not None and self._task is not None
        # No await from here on: the watcher cannot run, so it cannot cancel the task after the block.
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self.gone and kind is asyncio.CancelledError:
            self._task.uncancel()
            return True  # our own cancellation, done: the caller reads `gone`
        return False

    def _start_watching(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        assert self._task is not None
        self.gone = True
        self._task.cancel()
