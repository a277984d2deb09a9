"""How the gateway writes log lines: one JSON object per line for collectors, plain text in a terminal.

A record's structured fields travel in `extra={"fields": {...}}`; both formats print them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import time
from typing import Any, Protocol, TextIO

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
    """`ts LEVEL message key=value ...`, for a person reading a terminal.

    What a client sent (a path, a prompt) cannot start a line of its own nor pose as another field: control
    characters are written as escapes, and a value with a space, `"`, `=` or `\\` is quoted.
    """

    def line(
        self, created: float, level: str, logger: str, message: str, fields: dict[str, Any], error: str | None = None
    ) -> str:
        shown = " ".join(f"{k}={_field(v)}" for k, v in fields.items() if v is not None)
        text = f"{_timestamp(created)} {level:<7} {_escaped(message)}"
        text = f"{text}  {shown}" if shown else text
        return f"{text}\n{error}" if error is not None else text


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: each could end or rewrite a line.
# A backslash is escaped too, so that an escape in the log always stands for what was sent.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_QUOTED = re.compile(r'[\x00-\x1f\x7f-\x9f\u2028\u2029\\"]')  # what a quoted value escapes
_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_SHORT_ESCAPES = {"\n": r"\n", "\r": r"\r", "\t": r"\t", "\\": "\\\\", '"': r"\""}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}")


def _escaped(text: str) -> str:
    """`text` with every control character and backslash written as an escape."""
    return _CONTROL.sub(_escape, text)


def _field(value: object) -> str:
    """A field's value as the text format shows it: bare if it is one plain word, else quoted and escaped."""
    text = str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _QUOTED.sub(_escape, text) + '"'


class LateLine(Protocol):
    """What a line is made of, asked for only when the line is written (`BufferedHandler.write_later`)."""

    def message(self) -> str: ...

    def fields(self) -> dict[str, Any]: ...


# A line logged inside a running event loop waits at most this long, or until this many wait.
FLUSH_AFTER = 0.1  # seconds; QUOTAGATE_LOG_FLUSH
MAX_PENDING = 1024  # lines


class BufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes a running event loop's lines together, as nginx's `access_log
    buffer= flush=` does, and formats request lines only then.

    A line logged inside a running loop waits until `flush_after` seconds have passed since the first
    one waiting, or until MAX_PENDING lines wait; then all go out in one write. A WARNING or worse goes
    out at once, with every line before it, and so does a line logged outside a loop or from another
    loop's thread. `flush_after=0` writes at the end of the loop's turn. `flush()` and `close()` write
    what waits: logging's shutdown at exit calls both, and the app's lifespan at its end
    (`flush_logs`). A process killed with SIGKILL loses what was waiting: at most `flush_after` seconds.

    A request's line is formatted when it is written (`write_later`), many in a row: formatted alone,
    right after the wake-up that ended its request, one took ~24 µs of a lone request's ~550 µs of CPU
    (timed inside the gateway at 1 connection), against ~7 µs in a loop of lines.
    """

    def __init__(self, stream: TextIO, *, flush_after: float = FLUSH_AFTER) -> None:
        super().__init__(stream)
        self.flush_after = flush_after
        self._pending: list[str | tuple[float, str, LateLine]] = []  # lines, or what late lines are made of
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop whose timer or turn's end writes them
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._hold(line, urgent=record.levelno >= logging.WARNING)

    def write_later(self, logger: str, line: LateLine) -> None:
        """An INFO line of `logger`, as `emit` would write it, made from `line` when it is written.

        `line` must not change from now on. Made without a LogRecord (see `direct_handler`).
        """
        with self.lock:  # type: ignore[union-attr]
            self._hold((time.time(), logger, line), urgent=False)

    def _hold(self, item: str | tuple[float, str, LateLine], *, urgent: bool) -> None:
        self._pending.append(item)
        loop = _running_loop()
        if urgent or loop is None or self._flush_on not in (None, loop) or len(self._pending) >= MAX_PENDING:
            self._write_pending()
        elif self._flush_on is None:
            self._flush_on = loop
            if self.flush_after > 0:
                self._timer = loop.call_later(self.flush_after, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def _write_pending(self) -> None:
        timer, flush_on, self._timer, self._flush_on = self._timer, self._flush_on, None, None
        if timer is not None and flush_on is _running_loop():  # another thread's loop: let it fire, to no effect
            timer.cancel()
        if self._pending:
            pending, self._pending = self._pending, []
            self.stream.write("".join(item if isinstance(item, str) else self._late(*item) for item in pending))
        super().flush()

    def _late(self, created: float, logger: str, line: LateLine) -> str:
        formatter = self.formatter
        assert isinstance(formatter, FieldsFormatter)
        return formatter.line(created, "INFO", logger, line.message(), line.fields()) + self.terminator


def configure_logging(
    log_format: str = "auto", stream: TextIO | None = None, *, flush_after: float = FLUSH_AFTER
) -> None:
    """Send the `quotagate` loggers to `stream` (stderr): JSON, or text when `auto` meets a terminal.

    Lines logged inside the event loop wait up to `flush_after` seconds to go out together (BufferedHandler).
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    as_text = log_format == "text" or (log_format == "auto" and stream.isatty())
    global _installed
    handler = _installed = BufferedHandler(stream, flush_after=flush_after)
    handler.setFormatter(TextFormatter() if as_text else JsonFormatter())
    logger = logging.getLogger(LOGGER)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # No line prints a thread, process or process name: skip looking them up for every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


_installed: BufferedHandler | None = None


def direct_handler(logger: logging.Logger) -> BufferedHandler | None:
    """The handler `configure_logging` installed, if it alone would write `logger`'s INFO records; else None.

    The request log then hands its line straight to it (`write_later`): on the one logger that writes
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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def flush_logs() -> None:
    """Write every line the installed handler holds (the app calls it as it stops)."""
    if _installed is not None:
        _installed.flush()


def _timestamp(created: float) -> str:
    return f"{_second(int(created))}.{int(created % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    """`2026-11-21T16:00:14`: formatted once per second, not once per line."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
