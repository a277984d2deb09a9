"""`make bench`: run every benchmark, one after the other, and gather their figures in one report.

Each benchmark is its own script that writes bench/results/NAME.json (and prints its table); this
runner starts them as subprocesses, so one that fails is reported and the others still run, then
writes bench/results/report.md (and report.json) with every table in one place and the PNGs beside it.

  .venv/bin/python bench/report.py                      # all of them
  .venv/bin/python bench/report.py --only overhead,surge --quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# name → (script, arguments for a quick run, what it measures)
BENCHMARKS: dict[str, tuple[str, list[str], str]] = {
    "engine": ("engine.py", [], "quota engine: decisions/s, CPU per decision, memory per account"),
    "backend": ("backend.py", ["--rounds", "3"], "diffusion backend: images/s with batching on vs off"),
    "overhead": ("overhead.py", ["--rounds", "1", "--concurrency", "1,64"], "gateway overhead vs reference servers"),
    "surge": (
        "surge.py",
        ["--quick"],
        "launch-day surge: the fleet's shared capacity and line against per-process shedding",
    ),
}


def run(name: str, quick: bool) -> dict[str, object]:
    """Run one benchmark script; its exit code, wall time and printed output."""
    script, quick_args, _ = BENCHMARKS[name]
    command = [sys.executable, str(BENCH / script), *(quick_args if quick else [])]
    print(f"==> {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(done.stdout, flush=True)
    return {"exit_code": done.returncode, "wall_s": round(time.perf_counter() - started, 1), "output": done.stdout}


def section(name: str, outcome: dict[str, object]) -> str:
    """The markdown for one benchmark: its own table if it wrote one, else what it printed."""
    _, _, title = BENCHMARKS[name]
    lines = [f"## {name}: {title}", ""]
    if outcome["exit_code"] != 0:
        lines += [f"**failed** (exit {outcome['exit_code']}); its output:", "", "```", str(outcome["output"])[-4000:]]
        return "\n".join([*lines, "```", ""])
    table = RESULTS / f"{name}.md"
    lines.append(table.read_text() if table.exists() else f"```\n{str(outcome['output']).strip()}\n```")
    lines += [f"![{name}]({name}.png)" if (RESULTS / f"{name}.png").exists() else "", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="shorter runs (noisier); for trying the runner")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    outcomes = {name: run(name, args.quick) for name in names}
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = [
        "# quotagate benchmarks",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `bench/report.py{' --quick' if args.quick else ''}`. "
        "Compare ratios within this run: the machine is shared and absolute figures drift.",
        "",
        *(section(name, outcome) for name, outcome in outcomes.items()),
    ]
    (RESULTS / "report.md").write_text("\n".join(report))
    gathered = {
        name: {
            "exit_code": outcome["exit_code"],
            "wall_s": outcome["wall_s"],
            "results": json.loads((RESULTS / f"{name}.json").read_text())
            if outcome["exit_code"] == 0 and (RESULTS / f"{name}.json").exists()
            else None,
        }
        for name, outcome in outcomes.items()
    }
    (RESULTS / "report.json").write_text(json.dumps(gathered, indent=2) + "\n")
    failed = [name for name, outcome in outcomes.items() if outcome["exit_code"] != 0]
    print(f"report: {RESULTS / 'report.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
