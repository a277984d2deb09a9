"""Stop working for a client that has gone: within `CancelOnDisconnect`, its disconnection cancels the task.

Once a request's body has been read, the next ASGI `receive()` returns only when the client
disconnects. One watcher task waits on it and cancels the request's own task, which then stops
wherever it waits (on the upstream, on the body, on the socket) and settles the charge. The block
swallows that cancellation, and only that one: a server shutting down still cancels the task.

One watcher task per request is the whole cost; the request's work runs in its own task, with no
`asyncio.wait` around it.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive


class CancelOnDisconnect:
    """`async with CancelOnDisconnect(receive) as watch:` ... then `watch.gone` tells whether the client left.

    Enter it only once the request body has been read: the watcher consumes what `receive` returns.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.gone = False

    async def __aenter__(self) -> CancelOnDisconnect:
        self._task = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        assert self._watcher is not None and self._task is not None
        # No await from here on: the watcher cannot run, so it cannot cancel the task after the block.
        self._watcher.cancel()
        if self.gone and kind is asyncio.CancelledError:
            self._task.uncancel()
            return True  # our own cancellation, done: the caller reads `gone`
        return False

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        assert self._task is not None
        self.gone = True
        self._task.cancel()
