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


def plot_surge(results: dict[str, Any], path: Path) -> None:
    """Per plan, admitted/shed/rejected per second over the surge, and the paid p99 latency."""
    series = results["timeline"]
    seconds = [row["t"] for row in series]
    plans = results["plans"]
    fig, axes = plt.subplots(1, len(plans) + 1, figsize=(5 * (len(plans) + 1), 4.2))
    for ax, plan in zip(axes, plans, strict=False):
        for outcome in ("admitted", "shed", "rejected", "failed"):
            ax.plot(seconds, [row[plan].get(outcome, 0) for row in series], label=outcome)
        ax.set(title=f"{plan}: answers per second", xlabel="seconds", ylabel="requests/s")
        ax.legend(fontsize=8)
    latency = axes[-1]
    latency.plot(seconds, [row["paid_p99_ms"] for row in series], label="paid p99 under the surge")
    latency.axhline(results["paid_p99_unloaded_ms"], color="grey", linestyle="--", label="paid p99 unloaded")
    latency.axhline(2 * results["paid_p99_unloaded_ms"], color="red", linestyle=":", label="2× unloaded")
    for edge in (results["baseline_s"], results["baseline_s"] + results["surge_s"]):
        for ax in axes:
            ax.axvline(edge, color="black", linewidth=0.6, alpha=0.5)
    latency.set(title="paid p99 latency (surge between the black lines)", xlabel="seconds", ylabel="ms")
    latency.set_yscale("log")
    latency.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
