"""How the gateway writes log lines: one JSON object per line for collectors, plain text in a terminal.

A record's structured fields travel in `extra={"fields": {...}}`; both formats print them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from typing import Any, TextIO

import orjson

LOGGER = "quotagate"
FORMATS = ("auto", "json", "text")


class FieldsFormatter(logging.Formatter):
    """A line of `ts`, level, logger, message and the record's `fields`; subclasses choose the layout."""

    def format(self, record: logging.LogRecord) -> str:
        error = self.formatException(record.exc_info) if record.exc_info else None
        fields = getattr(record, "fields", {})
        return self.line(record.created, record.levelname, record.name, record.getMessage(), fields, error)

    def line(
        self, created: float, level: str, logger: str, message: str, fields: dict[str, Any], error: str | None = None
    ) -> str:
        raise NotImplementedError


class JsonFormatter(FieldsFormatter):
    """`{"ts", "level", "logger", "message", ...fields}` on one line."""

    def line(
        self, created: float, level: str, logger: str, message: str, fields: dict[str, Any], error: str | None = None
    ) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(created),
            "level": level.lower(),
            "logger": logger,
            "message": message,
            **fields,
        }
        if error is not None:
            line["error"] = error
        # orjson, not the standard library's json: a request line's object took ~5 µs to encode with
        # a reused json.JSONEncoder and takes ~0.4 µs with orjson (timeit here), on every request.
        return orjson.dumps(line, default=str).decode()


class TextFormatter(FieldsFormatter):
    """`ts LEVEL message key=value ...`, for a person reading a terminal."""

    def line(
        self, created: float, level: str, logger: str, message: str, fields: dict[str, Any], error: str | None = None
    ) -> str:
        shown = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        text = f"{_timestamp(created)} {level:<7} {message}"
        text = f"{text}  {shown}" if shown else text
        return f"{text}\n{error}" if error is not None else text


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of one event-loop turn together, in one write.

    Written one by one, each line costs a write(2) of its own; here the lines logged inside a running
    event loop wait for the end of the loop's turn and go out in one. A line logged outside a loop,
    `flush()` and `close()` (logging's shutdown at exit calls both) write everything pending at once.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop whose turn's end writes them

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        self._schedule()

    def write_line(self, logger: str, message: str, fields: dict[str, Any]) -> None:
        """An INFO line of `logger` as `emit` would write it, made without a LogRecord (see `direct_handler`)."""
        formatter = self.formatter
        assert isinstance(formatter, FieldsFormatter)
        line = formatter.line(time.time(), "INFO", logger, message, fields) + self.terminator
        with self.lock:  # type: ignore[union-attr]
            self._pending.append(line)
            self._schedule()

    def _schedule(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._flush_on not in (None, loop):  # no loop here, or another's: write now
            self._write_pending()
        elif self._flush_on is None:
            loop.call_soon(self.flush)
            self._flush_on = loop

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def _write_pending(self) -> None:
        self._flush_on = None
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self.stream.write(text)
        super().flush()


def configure_logging(log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Send the `quotagate` loggers to `stream` (stderr): JSON, or text when `auto` meets a terminal."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    as_text = log_format == "text" or (log_format == "auto" and stream.isatty())
    global _installed
    handler = _installed = TurnBufferedHandler(stream)
    handler.setFormatter(TextFormatter() if as_text else JsonFormatter())
    logger = logging.getLogger(LOGGER)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # No line prints a thread, process or process name: skip looking them up for every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


_installed: TurnBufferedHandler | None = None


def direct_handler(logger: logging.Logger) -> TurnBufferedHandler | None:
    """The handler `configure_logging` installed, if it alone would write `logger`'s INFO records; else None.

    The request log then hands its line straight to it (`write_line`): on the one logger that writes
    a line per request, a LogRecord and logging's dispatch took ~10 µs of a line's ~25 (timeit here).
    """
    parent = logger.parent
    if (
        _installed is None
        or logger.handlers
        or logger.filters
        or not logger.propagate
        or parent is None
        or parent.name != LOGGER
        or parent.handlers != [_installed]
        or parent.filters
        or _installed.filters
        or not logger.isEnabledFor(logging.INFO)
    ):
        return None
    return _installed


def _timestamp(created: float) -> str:
    return f"{_second(int(created))}.{int(created % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    """`2026-11-21T16:00:14`: formatted once per second, not once per line."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
