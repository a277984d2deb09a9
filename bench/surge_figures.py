"""The six figures of a surge run, from what the clients saw (surge_load.Tally), the image services' own counts,
and samples of both taken every SAMPLE_EVERY_S seconds; and the table that sets two revisions side by side.

1. the most images a service ever held at once ÷ the capacity it advertises (slots + queue), the worst service;
2. of the surge's seconds in which some free image waited (its client told to come back, or its job queued),
   the share during which the services had every slot taken (the services' mean);
3. the paid p99 (200 answers) from the surge's start to the last free image ÷ the p99 of the paid load alone;
4. free generation requests (POSTs) per image delivered, for each kind of client; the async clients' job
   GETs beside them;
5. the median over queued jobs of |actual wait − ETA told| / ETA told, the actual wait running from the 202 to
   the job's request reaching a service; the ETA counted as at least 1 s, as the gateway's own
   `quotagate_job_eta_error` does (a job told 0.2 s and started at 0.5 s is not 150 % wrong);
6. Jain's fairness index (Σx)² / (n·Σx²) of free accounts' waits, an account's wait being the seconds from
   first asking for each of its images to having it, summed over its images. Accounts are compared with
   those that arrived in the same second (the index of each such cohort, weighted by its size): a line
   served in order makes later arrivals wait longer, which is order, not unfairness. The index over all
   accounts at once is given beside it.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from surge_load import KINDS, Tally

SAMPLE_EVERY_S = 0.25


@dataclass(frozen=True, slots=True)
class Sample:
    """At `t` (s since the start): images waiting at the clients, each service's held images and busy seconds, the
    images the services made so far, and the fleet's shared view where the gateway keeps one (surge.py:
    fleet_view)."""

    t: float
    waiting: int
    held: tuple[int, ...]
    busy_s: tuple[float, ...]
    made: int
    fleet: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Span:
    """The phases of one run, in seconds since its start."""

    surge_start: float
    surge_end: float  # the last free account done (or given up at the deadline)


def jain(values: list[float]) -> float:
    """Jain's index of `values`: 1 when all are equal, 1/n when one has everything; 1 for none or all zero."""
    total, squares = sum(values), sum(v * v for v in values)
    return 1.0 if squares == 0 else total * total / (len(values) * squares)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values or [math.nan])[0]


def figures(tally: Tally, samples: list[Sample], services: list[dict[str, Any]], span: Span,
            baseline_end: float) -> dict[str, Any]:  # fmt: skip
    """Every figure of one run, with what it was computed from."""
    return {
        "in_flight": _in_flight(services),
        "busy": _busy(samples, span),
        "paid": _paid(tally, baseline_end, span),
        "requests": _requests(tally),
        "eta": _eta(tally, services),
        "fairness": _fairness(tally),
    }


def _in_flight(services: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [service["most_held"] / service["capacity"] for service in services]
    return {
        "ratio": max(ratios),
        "by_service": [
            {
                "most_held": s["most_held"],
                "capacity": s["capacity"],
                "refused": s["refused"],
                "dropped": s["dropped"],
                "made": s["made"],
            }  # fmt: skip
            for s in services
        ],
    }


def _busy(samples: list[Sample], span: Span) -> dict[str, Any]:
    waited = busy = 0.0
    for before, after in zip(samples, samples[1:], strict=False):
        if before.t < span.surge_start or after.t > span.surge_end or before.waiting == 0:
            continue
        waited += after.t - before.t
        busy += statistics.fmean(b - a for a, b in zip(before.busy_s, after.busy_s, strict=True))
    return {"share": busy / waited if waited else math.nan, "waited_s": waited, "busy_s": busy}


def _paid(tally: Tally, baseline_end: float, span: Span) -> dict[str, Any]:
    answers = list(zip(tally.paid_at, tally.paid_ms, tally.paid_status, strict=True))
    unloaded = [ms for at, ms, status in answers if status == 200 and at < baseline_end]
    surge = [ms for at, ms, status in answers if status == 200 and span.surge_start <= at < span.surge_end]
    statuses: dict[str, int] = defaultdict(int)
    for _, _, status in answers:
        statuses[str(status)] += 1
    return {
        "p99_unloaded_ms": p99(unloaded),
        "p99_surge_ms": p99(surge),
        "p50_unloaded_ms": statistics.median(unloaded) if unloaded else math.nan,
        "p50_surge_ms": statistics.median(surge) if surge else math.nan,
        "ratio": p99(surge) / p99(unloaded) if unloaded and surge else math.nan,
        "statuses": dict(statuses),
    }


def _requests(tally: Tally) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in KINDS:
        posts = sum(n for name, n in tally.requests.items() if name.startswith(f"{kind} POST "))
        gets = sum(n for name, n in tally.requests.items() if name.startswith(f"{kind} GET "))
        images = tally.delivered[kind]
        by_kind[kind] = {
            "posts": posts,
            "gets": gets,
            "images": images,
            "posts_per_image": posts / images if images else math.nan,
            "requests_per_image": (posts + gets) / images if images else math.nan,
        }
    return {"by_kind": by_kind, "answers": dict(tally.requests), "jobs": dict(tally.jobs),
            "errors": dict(tally.errors), "gave_up": tally.gave_up}  # fmt: skip


def _eta(tally: Tally, services: list[dict[str, Any]]) -> dict[str, Any]:
    arrivals: dict[str, float] = {}
    for service in services:
        arrivals |= service.get("jobs", {})
    errors, raw, late, told_s, actual_s = [], [], [], [], []
    for job, told, accepted_wall in tally.etas:
        if job in arrivals:
            actual = arrivals[job] - accepted_wall
            told_s.append(told)
            actual_s.append(actual)
            errors.append(abs(actual - told) / max(told, 1.0))
            raw.append(abs(actual - told) / told if told > 0 else math.inf)
            late.append(actual - told)
    turns = [(actual - told) / max(told, 1.0) for told, actual in tally.turns]
    shares = [(actual - told) / max(told, 1.0) for told, actual in zip(told_s, actual_s, strict=True)]
    return {
        # Retry-After clients: how late (> 0) the request that was let in went, against the first turn told.
        "retry_after_turns": len(turns),
        "retry_after_median_late": statistics.median(turns) if turns else math.nan,
        "samples": [(round(told, 2), round(actual, 2)) for told, actual in zip(told_s, actual_s, strict=True)],
        "jobs": len(tally.etas),
        "started": len(errors),
        "median_error": statistics.median(errors) if errors else math.nan,
        "median_error_unfloored": statistics.median(raw) if raw else math.nan,
        "median_late_s": statistics.median(late) if late else math.nan,  # > 0: jobs started after their ETA
        "median_late": statistics.median(shares) if shares else math.nan,  # the same, as a share of the ETA
        "p90_error": statistics.quantiles(errors, n=10)[8] if len(errors) >= 2 else math.nan,
    }


def _fairness(tally: Tally) -> dict[str, Any]:
    cohorts: dict[int, list[float]] = defaultdict(list)
    everyone = []
    for arrived, wait in zip(tally.account_arrived, tally.account_wait, strict=True):
        if not math.isnan(wait):
            cohorts[int(arrived)].append(wait)
            everyone.append(wait)
    sized = [(len(waits), jain(waits)) for waits in cohorts.values() if len(waits) >= 2]
    weight = sum(n for n, _ in sized)
    return {
        "by_arrival_second": sum(n * j for n, j in sized) / weight if weight else math.nan,
        "all_accounts": jain(everyone) if everyone else math.nan,
        "accounts": len(everyone),
        "unfinished": sum(math.isnan(w) for w in tally.account_wait),
        "median_wait_s": statistics.median(everyone) if everyone else math.nan,
        "p99_wait_s": p99(everyone) if everyone else math.nan,
    }


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def _number(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, target, value) for one revision's figures."""
    f = results["figures"]
    kinds = f["requests"]["by_kind"]
    has_jobs = f["eta"]["jobs"] > 0
    ra, aj = kinds["retry-after"], kinds["async"]
    async_text = (
        f"{_number(aj['posts_per_image'])} ({_number(aj['requests_per_image'])} with the job GETs)"
        if has_jobs
        else f"{_number(aj['posts_per_image'])} (no jobs here: these clients retried on Retry-After)"
    )
    paid = f["paid"]
    return [
        ("1. most images ever in flight at a service ÷ its capacity", "≤ 1.0",
         f"{_number(f['in_flight']['ratio'])} ({max(s['most_held'] for s in f['in_flight']['by_service'])} "
         f"of {f['in_flight']['by_service'][0]['capacity']})"),
        ("2. share of surge seconds the services had every slot taken while free images waited", "≥ 95 %",
         f"{_percent(f['busy']['share'])} (of {f['busy']['waited_s']:.0f} s)"),
        ("3. paid p99 during the surge ÷ unloaded", "≤ 1.5",
         f"{_number(paid['ratio'])} ({paid['p99_unloaded_ms']:.0f} → {paid['p99_surge_ms']:.0f} ms)"),
        ("4a. free POSTs per image delivered, Retry-After clients", "≤ 2", _number(ra["posts_per_image"])),
        ("4b. free POSTs per image delivered, async-job clients", "≤ 1.1", async_text),
        ("5. median \\|actual wait − ETA\\| ÷ ETA of queued jobs", "≤ 20 %",
         f"{_percent(f['eta']['median_error'])} ({f['eta']['started']} jobs)" if has_jobs else "n/a (no jobs, no ETA)"),
        ("6. Jain's index of free accounts' waits, within each arrival second", "≥ 0.9",
         f"{_number(f['fairness']['by_arrival_second'])} (all at once: {_number(f['fairness']['all_accounts'])})"),
    ]  # fmt: skip


def table(today: dict[str, Any] | None, previous: dict[str, Any] | None) -> str:
    """The figures of both revisions (either may be missing: not run), one row each."""
    runs = [run for run in (today, previous) if run is not None]
    columns = [rows(run) for run in runs]
    heads = [f"{name} (`{run['revision']}`)" for name, run in (("today", today), ("previous", previous)) if run]
    lines = ["| figure | target | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for i, (name, target, _) in enumerate(columns[0]):
        lines.append(f"| {name} | {target} | " + " | ".join(column[i][2] for column in columns) + " |")
    return "\n".join(lines)
