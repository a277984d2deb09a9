"""PNG figures of the bench results (matplotlib, the optional `bench` extra; the JSON and tables need none)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402


def plot_overhead(results: dict[str, Any], path: Path) -> None:
    """Requests/s and server CPU µs per request for each server, by concurrency."""
    runs, concurrency = results["runs"], [str(c) for c in results["concurrency"]]
    fig, (rate_ax, cpu_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, by_c in runs.items():
        rate_ax.plot(concurrency, [by_c[c]["per_s"] for c in concurrency], marker="o", label=name)
        cpu_ax.plot(concurrency, [by_c[c]["server_cpu_us"] for c in concurrency], marker="o", label=name)
    rate_ax.set(title="throughput", xlabel="open connections", ylabel="requests/s")
    cpu_ax.set(title="server CPU per request (lower is better)", xlabel="open connections", ylabel="µs")
    rate_ax.set_yscale("log")
    cpu_ax.set_yscale("log")
    rate_ax.legend(fontsize=8)
    fig.suptitle(results["pinning"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
