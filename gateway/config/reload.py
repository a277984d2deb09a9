"""Hot reload of the quota file: a file watch and SIGHUP swap the live config; a bad file is refused.

Each request reads `LiveConfig.current` once, at its start, so a request in flight finishes on the
config it started with and none is dropped. Counters live in Redis under each limit's counter name,
not under its numbers, so new limits apply to the usage already counted. Every uvicorn worker
process watches the file for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.config.quotas import Config, parse_config, read_config_text
from gateway.errors import ConfigError
from gateway.observe.metrics import GatewayMetrics

log = logging.getLogger("quotagate.reload")


class LiveConfig:
    """The config in force now, swapped whole (one attribute store) by a reload that passes its checks."""

    def __init__(
        self, config: Config, path: Path, metrics: GatewayMetrics, *, check: Callable[[Config], None] = lambda _: None
    ) -> None:
        self.current = config
        self._path = path
        self._metrics = metrics
        self._check = check  # what the file alone cannot tell, e.g. that every upstream pool has URLs
        text, loaded = _read(path)
        # The text the last reload looked at, so an unchanged file is a no-op.
        self._seen: str | None = text if isinstance(loaded, Config) and loaded.version == config.version else None
        self._pending: str | None = None
        _note_expired_overrides(config)

    def reload(self) -> bool:
        """Load the file now (SIGHUP); True if it was applied. A refused file leaves the old config in force."""
        text, loaded = _read(self._path)
        self._seen, self._pending = text, None
        return self._apply(loaded)

    def poll(self) -> None:
        """Apply the file if it changed since the last look.

        A file that does not load is refused only once it reads the same on two polls in a row, so a
        save caught half-written is not reported; a file that loads is applied at once.
        """
        text, unreadable = _read_text(self._path)
        if text == self._seen:  # not parsed again: the YAML takes 1–3 ms, twice a second per worker
            self._pending = None
            return
        loaded = _load(self._path, text, unreadable)
        if isinstance(loaded, ConfigError) and text != self._pending:
            self._pending = text
            return
        self._seen, self._pending = text, None
        self._apply(loaded)

    async def watch(self, stop: asyncio.Event, *, every: float) -> None:
        """Poll the file every `every` seconds until `stop` is set (run it as a task)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if not stop.is_set():
                self.poll()

    def _apply(self, loaded: Config | ConfigError) -> bool:
        if isinstance(loaded, Config):
            try:
                self._check(loaded)
            except ConfigError as exc:
                loaded = exc
        if isinstance(loaded, ConfigError):
            self._metrics.config_reloads.labels("failure").inc()
            log.error("config reload refused; version %s stays in force: %s", self.current.version, loaded)
            return False
        previous, self.current = self.current, loaded
        self._metrics.declare(loaded.plans, loaded.routes)
        self._metrics.loaded_config(loaded.version)
        self._metrics.config_reloads.labels("success").inc()
        log.info("config reloaded from %s: version %s → %s", loaded.source, previous.version, loaded.version)
        _note_expired_overrides(loaded)
        return True


@contextlib.contextmanager
def reload_on_sighup(live: LiveConfig) -> Iterator[None]:
    """Reload on SIGHUP while inside. Only the main thread can take signals (TestClient's loop is not on it)."""
    loop = asyncio.get_running_loop()
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        loop.add_signal_handler(signal.SIGHUP, live.reload)
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)


def _note_expired_overrides(config: Config) -> None:
    """An override past its `until` is harmless (it no longer applies), but ops may want to tidy it away."""
    now = time.time()
    for name, override in config.overrides.items():
        if now >= override.until.timestamp():
            log.info("override of plan %s ended at %s and no longer applies", name, override.until.isoformat())


def _read(path: Path) -> tuple[str, Config | ConfigError]:
    """The file's text (or why it cannot be read) and what it loads to."""
    text, unreadable = _read_text(path)
    return text, _load(path, text, unreadable)


def _read_text(path: Path) -> tuple[str, ConfigError | None]:
    """The file's text and None, or why it cannot be read twice over (the same failure reads the same)."""
    try:
        return read_config_text(path), None
    except ConfigError as error:
        return str(error), error


def _load(path: Path, text: str, unreadable: ConfigError | None) -> Config | ConfigError:
    if unreadable is not None:
        return unreadable
    try:
        return parse_config(text, source=str(path))
    except ConfigError as exc:
        return exc
