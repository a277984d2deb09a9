"""The log handler holds a running loop's lines and writes them together: after a while, past a count, or at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.observe.logs import MAX_PENDING, BufferedHandler, JsonFormatter


class _Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class _ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it."""

    now = 1000.0

    def time(self) -> float:
        return self.now


@dataclass
class _Line:
    text: str
    formatted: list[str] = field(default_factory=list)  # when it was asked for its words

    def message(self) -> str:
        self.formatted.append(self.text)
        return self.text

    def fields(self) -> dict[str, Any]:
        return {"status": 200}


@pytest.fixture
def loop() -> Iterator[_ClockLoop]:
    loop = _ClockLoop()
    yield loop
    loop.close()


def _handler(stream: _Writes, flush_after: float = 0.1) -> BufferedHandler:
    handler = BufferedHandler(stream, flush_after=flush_after)
    handler.setFormatter(JsonFormatter())
    return handler


def _run(loop: _ClockLoop, scenario: Callable[[], Awaitable[None]]) -> None:
    loop.run_until_complete(scenario())


async def _turns(n: int = 3) -> None:
    """Let the loop run `n` turns, its clock standing still."""
    for _ in range(n):
        await asyncio.sleep(0)


def _messages(text: str) -> list[str]:
    return [json.loads(line)["message"] for line in text.splitlines()]


def test_request_lines_wait_for_flush_after_and_are_formatted_then_in_one_write(loop: _ClockLoop) -> None:
    stream = _Writes()
    handler = _handler(stream, flush_after=0.1)
    first, second = _Line("first"), _Line("second")

    async def scenario() -> None:
        handler.write_later("quotagate.request", first)
        await _turns()
        handler.write_later("quotagate.request", second)
        await _turns()
        loop.now += 0.099
        await _turns()
        assert stream.writes == [] and first.formatted == []  # neither written nor formatted yet
        loop.now += 0.001
        await _turns()

    _run(loop, scenario)
    assert len(stream.writes) == 1
    assert _messages(stream.writes[0]) == ["first", "second"]
    line = json.loads(stream.writes[0].splitlines()[0])
    assert (line["level"], line["logger"], line["status"]) == ("info", "quotagate.request", 200)


def test_a_warning_goes_out_at_once_with_the_lines_before_it(loop: _ClockLoop) -> None:
    stream = _Writes()
    handler = _handler(stream)
    logger = logging.getLogger("quotagate.test-buffer")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False

    async def scenario() -> None:
        handler.write_later("quotagate.request", _Line("a request"))
        logger.info("an info line")
        assert stream.writes == []
        logger.warning("upstream broke off")
        assert len(stream.writes) == 1

    try:
        _run(loop, scenario)
    finally:
        logger.removeHandler(handler)
    assert _messages(stream.writes[0]) == ["a request", "an info line", "upstream broke off"]


def test_lines_past_the_bound_go_out_without_waiting(loop: _ClockLoop) -> None:
    stream = _Writes()
    handler = _handler(stream)

    async def scenario() -> None:
        for n in range(MAX_PENDING):  # the clock stands still: only the count can make it write
            assert stream.writes == []
            handler.write_later("quotagate.request", _Line(f"line {n}"))

    _run(loop, scenario)
    assert len(stream.writes) == 1
    assert len(stream.writes[0].splitlines()) == MAX_PENDING


def test_flush_after_zero_writes_at_the_end_of_the_turn(loop: _ClockLoop) -> None:
    stream = _Writes()
    handler = _handler(stream, flush_after=0)

    async def scenario() -> None:
        handler.write_later("quotagate.request", _Line("one"))
        handler.write_later("quotagate.request", _Line("two"))
        assert stream.writes == []
        await _turns()
        assert len(stream.writes) == 1

    _run(loop, scenario)
    assert _messages(stream.writes[0]) == ["one", "two"]


def test_a_line_outside_a_loop_and_flush_write_at_once(loop: _ClockLoop) -> None:
    stream = _Writes()
    handler = _handler(stream)
    handler.write_later("quotagate.request", _Line("outside"))
    assert _messages("".join(stream.writes)) == ["outside"]

    async def scenario() -> None:
        handler.write_later("quotagate.request", _Line("inside"))
        handler.flush()  # what the app's lifespan does as it stops
        assert _messages("".join(stream.writes)) == ["outside", "inside"]
        loop.now += 1  # the cancelled timer writes nothing more
        await _turns()

    _run(loop, scenario)
    assert len(stream.writes) == 2


@pytest.mark.parametrize(("raw", "expected"), [("", 0.1), ("0", 0.0), ("0.5", 0.5)])
def test_the_wait_is_a_setting(raw: str, expected: float) -> None:
    assert Settings.from_env({**_ENVIRON, "QUOTAGATE_LOG_FLUSH": raw}).log_flush == expected


@pytest.mark.parametrize("raw", ["-1", "11", "soon"])
def test_a_wait_that_is_not_one_is_refused_at_start(raw: str) -> None:
    with pytest.raises(ConfigError, match="QUOTAGATE_LOG_FLUSH: expected"):
        Settings.from_env({**_ENVIRON, "QUOTAGATE_LOG_FLUSH": raw})


_ENVIRON = {"QUOTAGATE_CONFIG": "q.yaml", "QUOTAGATE_REDIS_URL": "redis://r", "QUOTAGATE_KEY_SECRET": "s" * 16}
