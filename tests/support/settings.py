"""Gateway settings for apps a test builds in its own process."""

from __future__ import annotations

from types import MappingProxyType

from gateway.config.settings import Settings

from .keys import SECRET


def settings_for(redis_url: str, upstream_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "config_path": "quotas.yaml",
        "redis_url": redis_url,
        "key_secret": SECRET,
        "upstreams": MappingProxyType({"diffusion": (upstream_url,)}),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
