"""The files a local stack keeps under its data directory, and how the CLI finds a running one."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT = Path(".quotagate")


@dataclass(frozen=True)
class DataDir:
    """Layout: redis/ (data, AOF, socket), models/ (the tiny model), key-secret, admin-token, stack.json."""

    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None) -> DataDir:
        """`path`, else $QUOTAGATE_DATA_DIR, else ./.quotagate; made absolute."""
        chosen = path or os.environ.get("QUOTAGATE_DATA_DIR") or DEFAULT
        return cls(Path(chosen).resolve())

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.json"

    def key_secret(self, *, create: bool = False) -> bytes:
        """The HMAC secret API keys are hashed with; made on first use when `create`."""
        return self._secret("key-secret", create)

    @property
    def admin_token_file(self) -> Path:
        return self.root / "admin-token"

    def admin_token(self, *, create: bool = False) -> bytes:
        """The token of the local stack's admin API; made on first use when `create`."""
        return self._secret(self.admin_token_file.name, create)

    def _secret(self, name: str, create: bool) -> bytes:
        path = self.root / name
        if not path.exists():
            if not create:
                raise FileNotFoundError(f"{path}: no {name}; start the stack with `quotagate up` first")
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        return path.read_text().strip().encode()

    def write_stack(self, info: dict[str, Any]) -> None:
        """Record where a running stack listens, for `quotagate keys` and friends."""
        self.stack_file.write_text(json.dumps(info, indent=2) + "\n")

    def read_stack(self) -> dict[str, Any]:
        """What `write_stack` recorded; FileNotFoundError if no stack ran here."""
        try:
            return dict(json.loads(self.stack_file.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.stack_file}: no stack here; start one with `quotagate up` or pass --data-dir / --redis-url"
            ) from None

    def clear_stack(self) -> None:
        self.stack_file.unlink(missing_ok=True)
