"""Stop working for a client that has gone: within `CancelOnDisconnect`, its disconnection cancels the task.

Once a request's body has been read, the next ASGI `receive()` returns only when the client
disconnects. One watcher task waits on it and cancels the request's own task, which then stops
wherever it waits (on the upstream, on the body, on the socket) and settles the charge. The block
swallows that cancellation, and only that one: a server shutting down still cancels the task.

The watcher starts only once the block has run for `after` seconds (WATCH_AFTER): a task and its
two steps were ~40 µs of the gateway's ~450 µs CPU per request (bench/overhead.py with the watcher
switched off), paid by every request, while only a long one has work worth stopping. Nor does each
block set a timer of its own: one timer per event loop looks at the blocks every `after` seconds and
starts the watchers of those that have run that long, so a watcher starts between `after` and twice
that. (Measured alone on uvloop, a timer set and cancelled around one Redis round trip added 7–15 µs
of CPU to its ~65.) A client that left earlier is seen at once when the watcher starts, since
`receive()` then answers its disconnect without waiting. A block that ends first never watches: its
answer goes out as usual, and a client gone by then simply does not read it.

Once an answer has gone out whole, `receive()` reports a disconnect too (uvicorn and Starlette's
TestClient both do): that is the exchange's end, not a client leaving. So the answer goes out through
`watch.sending(send)`, which stands the watcher down before its last message: a request whose answer
is complete is never cancelled nor counted as gone, even if the last send yields to the watcher.

While `watch.on_gone` is set, a client leaving calls it instead of cancelling the task: the proxy sets it
while it waits for the backend's answer, so that it withdraws the request and still learns, from that
answer, whether the backend had begun (gateway/http/proxy.py).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from types import TracebackType

from starlette.types import Message, Receive, Send

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
        self._rounds: _Rounds | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._answered = False
        self.gone = False
        self.on_gone: Callable[[], None] | None = None  # while set, called instead of cancelling the task
        self._cancelled = False

    def sending(self, send: Send) -> Send:
        """`send`, standing the watcher down before the answer's last message goes out."""

        async def send_watched(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._answered = True
            await send(message)

        return send_watched

    async def __aenter__(self) -> CancelOnDisconnect:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._rounds = _Rounds.of(loop, self._after)
        self._rounds.add(self, loop)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        assert self._rounds is not None and self._task is not None
        # No await from here on: the watcher cannot run, so it cannot cancel the task after the block.
        self._rounds.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()
        if self._cancelled and kind is asyncio.CancelledError:
            self._task.uncancel()
            return True  # our own cancellation, done: the caller reads `gone`
        return False

    def _start_watching(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self._answered:  # the answer went out whole: the exchange ended, the client did not leave
            return
        assert self._task is not None
        self.gone = True
        if self.on_gone is not None:
            self.on_gone()
        else:
            self._cancelled = True
            self._task.cancel()


class _Rounds:
    """One loop's blocks not yet watched, and the one timer that starts the watchers of those `after` old."""

    _of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _Rounds]] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, after: float) -> _Rounds:
        by_after = cls._of.get(loop)
        if by_after is None:
            by_after = cls._of[loop] = {}
        rounds = by_after.get(after)
        if rounds is None:
            rounds = by_after[after] = cls(after)  # holding no loop, lest the loop outlive its use
        return rounds

    def __init__(self, after: float) -> None:
        self._after = after
        self._began: dict[CancelOnDisconnect, float] = {}  # oldest first
        self._timer: asyncio.TimerHandle | None = None

    def add(self, block: CancelOnDisconnect, loop: asyncio.AbstractEventLoop) -> None:
        self._began[block] = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self._after, self._round)

    def discard(self, block: CancelOnDisconnect) -> None:
        self._began.pop(block, None)

    def _round(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        due = loop.time() - self._after
        for block, began in list(self._began.items()):
            if began > due:
                break
            del self._began[block]
            block._start_watching()
        if self._began:
            self._timer = loop.call_later(self._after, self._round)
