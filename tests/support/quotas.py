"""Quota files for tests: plans written in one line each, and the one route every test gateway serves."""

from __future__ import annotations

from pathlib import Path

IMAGES = "/v1/images/generations"


def plan(
    name: str,
    *,
    priority: int = 0,
    daily: int | str = 3,
    rate: int = 60,
    burst: int = 10,
    concurrency: int | None = None,
) -> str:
    """One plan of a quota file: a daily quota, a per-minute rate and, when given, a concurrency limit."""
    lines = [
        f"  {name}:",
        f"    priority: {priority}",
        f"    daily_images: {daily}",
        f"    rate: {{images: {rate}, per: minute, burst: {burst}}}",
    ]
    if concurrency is not None:
        lines.append(f"    concurrency: {concurrency}")
    return "\n".join(lines) + "\n"


def quotas_yaml(*plans: str, pool: str | None = None) -> str:
    """A quota file with these plans, the images route to the `diffusion` upstream, and `pool` as its pool."""
    text = "timezone: UTC\nplans:\n" + "".join(plans)
    text += f"routes:\n  - path: {IMAGES}\n    upstream: diffusion\n    cost: images\n"
    if pool is not None:
        text += f"pools:\n  diffusion: {{{pool}}}\n"
    return text


# A free plan of three images a day and an unlimited pro plan: what most gateway tests run with.
QUOTAS = quotas_yaml(
    plan("free", daily=3, rate=60, burst=10),
    plan("pro", priority=10, daily="unlimited", rate=6000, burst=100),
)


def quota_file(directory: Path, text: str = QUOTAS) -> Path:
    """`text` written to `<directory>/quotas.yaml`, for gateways that read (and reload) it."""
    path = directory / "quotas.yaml"
    path.write_text(text)
    return path


# A free plan with room to burst and a paid plan too wide to meet: what the fault tests run with.
RELIABILITY_QUOTAS = quotas_yaml(
    plan("free", daily=3, rate=600, burst=100),
    plan("paid", priority=10, daily=100000, rate=100000, burst=10000),
)
