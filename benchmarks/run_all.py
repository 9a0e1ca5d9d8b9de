"""Run every benchmark, compare each figure with its target, print a table.

Each benchmark in this folder is started as its own subprocess with
``--json`` (so no benchmark warms caches or leaves threads for the next one)
and its last stdout line is parsed as the JSON result. A benchmark whose
script does not exist yet is reported as ``missing``, not as a failure of
the whole run; one that crashes or prints no JSON is reported as ``error``.

    python benchmarks/run_all.py [--json] [--only NAME ...] [--timeout S]

With ``--json`` the last line is one JSON object:
``{"ok": bool, "machine": {...}, "benchmarks": {name: {"status", "seconds",
"figures", "checks": [{"figure", "value", "op", "target", "ok"}]}}}``.
Exit code 0 when every present benchmark ran and met every target, else 1.
"""

from __future__ import annotations

import os
import sys

# benchmarks/ holds a ``queue.py``: keep it from shadowing the stdlib module.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent


class Target(NamedTuple):
    """A figure's bound: ``value op bound`` must hold (op is ``>=`` or ``<=``)."""

    figure: str
    op: str
    bound: float

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


#: The targets of issue 7, per benchmark script (file stem).
TARGETS: dict[str, list[Target]] = {
    "event_log": [
        Target("events_per_s", ">=", 100_000),
        Target("ack_p99_ms", "<=", 50),
        Target("ratio_vs_per_event_commit", ">=", 1000),
    ],
    "queue": [Target("items_per_s", ">=", 20_000)],
    "recovery": [
        Target("replay_s", "<=", 5),
        Target("replay_with_snapshot_s", "<=", 0.5),
        Target("peak_rss_mb", "<=", 1000),
    ],
    "ticks": [Target("ticks_per_s", ">=", 100_000), Target("p99_latency_ms", "<=", 10)],
    # issue 13: process start to "ready" on a 1M-event log, start-up verification on
    "restart": [Target("restart_s", "<=", 1.0)],
    # issue 11: the worst quote age of non-active contracts against the physical bound of a refresh cycle
    "freshness": [
        Target("staleness_vs_bound", "<=", 1.25),
        Target("never_priced", "<=", 0),
        Target("errors_101", "<=", 10),
    ],
    # issue 16: a 6.5 h, 500-contract, 100-line day re-run per configuration (the slowest of 60/100/200 lines)
    "what_if": [Target("replay_s", "<=", 10.0)],
}


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import deltalake

        delta = deltalake.__version__
    except ImportError:
        delta = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "deltalake": delta,
        "platform": platform.platform(),
    }


def run_one(name: str, timeout: float) -> dict[str, Any]:
    """Run ``benchmarks/<name>.py --json`` and check its figures against :data:`TARGETS`."""
    script = HERE / f"{name}.py"
    if not script.exists():
        return {"status": "missing", "seconds": 0.0, "figures": {}, "checks": [], "detail": f"{script.name} not found"}
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(script), "--json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE.parent,
        )
    except subprocess.TimeoutExpired:
        return {
            "status": "error",
            "seconds": timeout,
            "figures": {},
            "checks": [],
            "detail": f"timed out after {timeout:g} s",
        }
    seconds = round(time.perf_counter() - started, 1)
    lines = proc.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        figures = None
    if proc.returncode != 0 or not isinstance(figures, dict):
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {
            "status": "error",
            "seconds": seconds,
            "figures": figures if isinstance(figures, dict) else {},
            "checks": [],
            "detail": f"exit {proc.returncode}: {tail}",
        }
    checks = []
    for target in TARGETS.get(name, []):
        value = figures.get(target.figure)
        ok = isinstance(value, int | float) and target.met(value)
        checks.append({"figure": target.figure, "value": value, "op": target.op, "target": target.bound, "ok": ok})
    status = "ok" if all(c["ok"] for c in checks) else "below target"
    return {"status": status, "seconds": seconds, "figures": figures, "checks": checks}


def discover() -> list[str]:
    """Every benchmark script here (and every one with a target, present or not)."""
    own = {Path(__file__).stem, "growth"}  # growth.py is long and reported separately
    present = {p.stem for p in HERE.glob("*.py") if p.stem not in own and not p.stem.startswith("_")}
    return sorted(present | set(TARGETS))


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(f"{'benchmark':<11} {'figure':<27} {'value':>12}   {'target':<12} {'':<4}")
    for name, result in results.items():
        if not result["checks"]:
            print(f"{name:<11} {'-':<27} {'-':>12}   {'-':<12} {result['status']} {result.get('detail', '')}")
            continue
        for check in result["checks"]:
            value = check["value"]
            shown = (
                f"{value:,.2f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
            )
            verdict = "ok" if check["ok"] else "MISS"
            target = f"{check['op']} {check['target']:,g}"
            print(f"{name:<11} {check['figure']:<27} {shown:>12}   {target:<12} {verdict}")
        print(f"{'':<11} ({result['seconds']} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    args = parser.parse_args()
    names = args.only or discover()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, args.timeout)
    print_table(results)
    ok = all(r["status"] in ("ok", "missing") for r in results.values())
    if args.json:
        print(json.dumps({"ok": ok, "machine": machine(), "benchmarks": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
