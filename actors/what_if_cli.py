"""``python runtime.py what-if``: would more lines, or other targets, have kept the positions fresher?

    python runtime.py what-if [--data-dir D] [--since T] [--until T] [--max-lines 60,100,200]
                              [--monitoring-s 30,60] [--step S] [--jobs N] [--json] [--plot FILE.png|FILE.html]

Re-runs the recorded period through the real router, queue and worker on
simulated time (:mod:`actors.what_if_sim`), once per configuration, and
prints the faithfulness check first: the configuration that was running,
replayed, against what the positions table recorded. Only then the rows of
the other configurations, which are as trustworthy as that check says.

A row "N lines" is an account with N market data lines and ``max_lines``
N; ``--monitoring-s`` varies the target age of non-active contracts. Every
other setting is the one the record says was running. Nothing in the data
directory changes. By default every snapshot is replayed at the instant
the runtime's worker would send it; ``--step 1`` sends a second's worth of
the message budget together (each up to a second late), for a replay about
1.5 times as fast that favours fewer lines by up to a second
(docs/audit.md). The replays share nothing, so they run in parallel, one
worker process per core (``--jobs``). Argument parsing needs the standard
library only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_what_if", "positive_list"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Periods at least this long replay their configurations in parallel by default (shorter ones take < 1 s each).
PARALLEL_FROM_S = 600.0
#: Extra lines of one IB "quote booster" pack: the default second row.
BOOSTER_PACK_LINES = 100


#: What the config accepts for ``[runtime] max_lines`` and a ``[freshness]`` target (actors.config): a row
#: for a configuration the runtime would refuse to start with answers nothing.
MAX_LINES_MOST = 100_000
TARGET_S_MOST = 86_400.0


def positive_list(kind: type, most: float | None = None, what: str = "") -> Any:
    """argparse type: a comma-separated list of positive numbers (``60,100,200``), each at most ``most``."""

    def parse(text: str) -> list[Any]:
        values = []
        for part in text.split(","):
            try:
                value = kind(part.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} is not a {'whole ' if kind is int else ''}number") from None
            if not math.isfinite(value) or value <= 0:
                raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} must be a number > 0")
            if most is not None and value > most:
                raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} must be at most {most:g} ({what})")
            values.append(value)
        if len(values) > 12:
            raise argparse.ArgumentTypeError(f"{text!r}: at most 12 values")
        return sorted(set(values))

    return parse


def _jobs(text: str) -> int:
    values = positive_list(int)(text)
    if len(values) != 1 or values[0] > 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes from 1 to 64")
    return int(values[0])


#: The replayed worker's default step (s): none, every snapshot at its token's instant (SimConfig.step_s).
DEFAULT_STEP_S = 0.0
#: The token bucket holds a second's worth of the message budget: a longer step would send no more together.
MAX_STEP_S = 1.0


def step_seconds(text: str) -> float:
    """argparse type: the replay's step, 0 (exact) to MAX_STEP_S seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_STEP_S:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 (exact) to {MAX_STEP_S:g} s")
    return value


def iso_time(text: str) -> str:
    """argparse type: an ISO-8601 time (UTC when it names no zone) that is a point in UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time (e.g. 2026-11-30T14:30:00Z)") from None
    try:
        (value if value.tzinfo is None else value.astimezone(UTC)).replace(tzinfo=UTC).timestamp()
    except (OverflowError, ValueError):  # 9999-12-31T23:59:59-14:00 is past the last UTC time Python has
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: years 1 to 9999, in UTC") from None
    return text


def add_parser(sub: Any, data_dir_arg: Any) -> None:
    """Add ``what-if`` to the command line's subparsers."""
    p = sub.add_parser("what-if", help="replay the recorded period with other line counts or targets: how fresh would it have been?")
    data_dir_arg(p)
    p.add_argument("--since", type=iso_time, help="ISO-8601 start of the period (default: the first run recorded)")
    p.add_argument("--until", type=iso_time, help="ISO-8601 end of the period (default: the last thing recorded)")
    p.add_argument(
        "--max-lines",
        type=positive_list(int, MAX_LINES_MOST, "the most [runtime] max_lines allows"),
        help=f"line counts to try, comma-separated (default: as run, and as run + {BOOSTER_PACK_LINES}: a booster pack)",
    )
    p.add_argument(
        "--monitoring-s",
        type=positive_list(float, TARGET_S_MOST, "a day: the most [freshness] monitoring_s allows"),
        help="target ages (s) of non-active contracts to try (default: as run)",
    )
    p.add_argument(
        "--step",
        type=step_seconds,
        default=DEFAULT_STEP_S,
        help="seconds, up to 1: the replayed worker sends a step's worth of snapshots together, each up to a step "
        "late, for a faster replay (default 0: each as the runtime sends it)",
    )
    p.add_argument("--jobs", type=_jobs, help="replays run at once, in worker processes (default: one per core for periods of 10 min or more)")
    p.add_argument("--json", action="store_true", help="one JSON object: period, faithfulness, a row per configuration")
    p.add_argument("--plot", metavar="FILE", help="write a chart: FILE.png, or FILE.html (the chart and the table in one page)")


def _plot_problem(path: str | None) -> tuple[int, str] | None:
    """Why the chart could not be written, and the exit code; checked before the replay, which can take minutes."""
    if path is None:
        return None
    if not path.lower().endswith((".png", ".html")):
        return EXIT_USAGE, f"--plot {path!r}: the file must end in .png or .html"
    if importlib.util.find_spec("matplotlib") is None:  # found, not imported: the chart imports it when drawn
        return EXIT_USAGE, "--plot needs matplotlib, which is not installed (pip install '.[plot]')"
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        return EXIT_FAILED, f"--plot {path}: that is a directory"
    if not folder.exists():
        return EXIT_FAILED, f"--plot {path}: directory {folder} does not exist"
    if not folder.is_dir():
        return EXIT_FAILED, f"--plot {path}: {folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):  # the chart is written beside its name, then moved onto it
        return EXIT_FAILED, f"--plot {path}: directory {folder} is not writable by this user"
    return None


def cmd_what_if(args: argparse.Namespace, config: Any) -> int:
    """Replay, print (or --json), and --plot; exit 1 when the data directory holds nothing to replay."""
    problem = _plot_problem(args.plot)
    if problem is not None:
        code, words = problem
        print(f"error: {words}", file=sys.stderr)
        return code
    from actors.cli_checks import error_line
    from actors.what_if_report import faithfulness, figures_of_record
    from storage.recorded_day import NoRecordError, UnreadableTableError, read_recorded_day

    data_dir = config.runtime.data_dir
    try:
        day = _with_queue_at_start(read_recorded_day(data_dir, since=args.since, until=args.until), data_dir)
    except NoRecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except UnreadableTableError as exc:
        cause = error_line(exc.__cause__ or exc)
        print(f"error: cannot read the record in {data_dir}: {exc.what}: {cause}", file=sys.stderr)
        return EXIT_FAILED
    as_run = dataclasses.replace(_as_run(day, config), step_s=args.step)
    kept = as_run.freshness.min_snapshot_lines
    if too_few := [n for n in args.max_lines or [] if n <= kept]:
        print(
            f"error: --max-lines {too_few[0]}: the run kept {kept} lines for snapshots (min_snapshot_lines {kept}), so streams "
            f"would get none and the runtime would refuse to start; try more than {kept}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    configs = [as_run] + [
        _variant(as_run, lines, monitoring)
        for lines in (args.max_lines or [as_run.max_lines, as_run.max_lines + BOOSTER_PACK_LINES])
        for monitoring in (args.monitoring_s or [as_run.freshness.monitoring_s])
    ]
    recorded = figures_of_record(day, monitoring_s=as_run.freshness.monitoring_s, overflow_s=as_run.freshness.overflow_s)
    default_jobs = 1 if day.duration_s < PARALLEL_FROM_S else os.cpu_count() or 1  # a process costs ~1 s to start
    jobs = min(args.jobs or default_jobs, len(configs))
    if jobs > 1:
        rows = _replay_in_processes(jobs, day, configs)
    else:
        rows = [_replay(day, sim_config) for sim_config in configs]
    check = faithfulness(recorded, rows[0])
    report = _report(day, as_run, check, rows)
    if args.plot:
        from actors.what_if_plot import write_plot

        try:
            write_plot(args.plot, report)
        except OSError as exc:
            print(f"error: --plot {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print(report)
        if args.plot:
            print(f"chart written to {args.plot}")
    return EXIT_OK


def _with_queue_at_start(day: Any, data_dir: str) -> Any:
    """``day`` with the queue as it stood when the period began (the replay starts from that backlog).

    At a start the runtime recovered its queue from the log; in the middle of
    a run the queue held what was waiting then. Either way it is the state
    after the events before the period: the newest queue snapshot before it,
    then the queue's events up to its start.
    """
    from actors.base import state_at
    from actors.queue_state import QueueState
    from storage.recorded_day import reading

    if day.seq_before_start <= 0:
        return day
    with reading("the queue's snapshot and events before the period"):
        state = state_at(data_dir, "queue", QueueState, seq=day.seq_before_start, until_us=day.start_us)
    if not state.items:
        return day
    return dataclasses.replace(day, queue_at_start=state.dump())


def _replay_in_processes(jobs: int, day: Any, configs: list[Any]) -> list[Any]:
    """One process per configuration at a time: the replays share nothing, and each is CPU-bound Python.

    A Ctrl-C is this process's to answer. The workers start with SIGINT
    blocked (a child keeps its parent's signal mask), so the one a terminal
    sends the whole process group prints no traceback from a worker still
    starting; here it ends the workers at once and cancels what is queued,
    instead of waiting for the replays under way.
    """
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds delta-rs threads
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context)
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            results = pool.map(_replay, [day] * len(configs), configs)  # every worker is started by now
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C held meanwhile arrives here
        rows = list(results)
    except BaseException:
        for worker in multiprocessing.active_children():
            worker.terminate()  # a replay under way is not waited for: it can take minutes
        pool.shutdown(cancel_futures=True)  # the pool finds its workers gone and releases its queues at once
        raise
    pool.shutdown()
    return rows


def _replay(day: Any, sim_config: Any) -> Any:
    """One configuration's replay and its figures (also run in a worker process: a module-level function)."""
    from actors.what_if_report import figures_of_outcome
    from actors.what_if_sim import simulate

    started = time.process_time()
    figures = figures_of_outcome(day, simulate(day, sim_config))
    figures.extra["replay_cpu_s"] = round(time.process_time() - started, 2)
    return figures


def _as_run(day: Any, config: Any) -> Any:
    """The configuration the record says was running; [freshness] from the config where the log predates it."""
    import msgspec

    from actors.fake_ib import FakeIbSettings
    from actors.what_if_sim import SimConfig

    fresh, rt = config.freshness, config.runtime
    known = fresh.__struct_fields__  # a log written by another version may name settings this one lacks
    recorded = {k: v for k, v in day.settings.items() if k in known}
    max_lines = day.max_lines or rt.max_lines
    return SimConfig(
        label="as run",
        max_lines=max_lines,
        true_lines=day.true_lines or max_lines,
        learned_at_start=day.learned_at_start,
        freshness=msgspec.convert(msgspec.structs.asdict(fresh) | recorded, type(fresh), strict=False),
        max_attempts=rt.max_attempts,
        retry_backoff_s=rt.retry_backoff_s,
        retry_backoff_cap_s=rt.retry_backoff_cap_s,
        dead_letter_retry_s=rt.dead_letter_retry_s,
        lease_s=rt.lease_s,
        snapshot_timeout_s=config.ib.snapshot_timeout_s,
        as_run=True,
        # a gateway's requests go through the IB actor's pacer; the demo's fake IB has none
        pacing_per_s=config.ib.pacing_per_s if day.paced else None,
        pacing_window_s=1.0 + config.ib.pacing_guard_s,
        min_stream_age_s=config.ib.min_stream_age_s if day.paced else FakeIbSettings().min_stream_age_s,
    )


def _variant(as_run: Any, lines: int, monitoring_s: float) -> Any:
    """An account with ``lines`` lines (configured and at IB), and the as-run settings otherwise.

    What the runtime knew of its limit at the start carries over: an account
    that had learned its limit would know the new one too.
    """
    from dataclasses import replace

    import msgspec

    same = monitoring_s == as_run.freshness.monitoring_s
    return replace(
        as_run,
        label=f"{lines} lines" + ("" if same else f", monitoring {monitoring_s:g} s"),
        max_lines=lines,
        true_lines=lines,
        learned_at_start=None if as_run.learned_at_start is None else lines,
        freshness=msgspec.structs.replace(as_run.freshness, monitoring_s=monitoring_s),
        as_run=False,
    )


def _iso(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1e6, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _report(day: Any, as_run: Any, check: Any, rows: list[Any]) -> dict[str, Any]:
    return {
        "period": {
            "since": _iso(day.start_us),
            "until": _iso(day.end_us),
            "duration_s": round(day.duration_s, 1),
            "contracts": len(day.contracts),
            "active_at_start": len(day.active_at_start),
            "registry_changes": len(day.active_changes),
            "snapshots_recorded": day.snapshots_recorded,
            "interruptions": len(day.interruptions_us),
            "snapshot_rate_refusals": len(day.rate_limited_us),
            "down_s": round(sum(b - a for a, b in day.down) / 1e6, 1),
            "line_limit_recorded": day.true_lines,
            "settings_recorded": bool(day.settings),
            "step_s": as_run.step_s,
            # requests reach IB as the IB actor's pacer lets them leave (None: a demo day, the fake IB has none)
            "pacing_per_s": as_run.pacing_per_s,
            "pacing_window_s": as_run.pacing_window_s,
        },
        "faithfulness": check.to_json() | {"as_run": check.replayed.to_json()},
        "rows": [row.to_json() for row in rows],
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _ages(figures: dict[str, Any]) -> str:
    return f"{_fmt(figures['p50_s'])}/{_fmt(figures['p99_s'])}/{_fmt(figures['max_s'])}"


def _pacing_words(period: dict[str, Any]) -> str:
    if period["pacing_per_s"] is None:
        return "; IB as the demo's fake IB (no pacer)"
    return f"; requests paced as the IB actor sends them ({period['pacing_per_s']:g} in {period['pacing_window_s']:g} s)"


def _print(report: dict[str, Any]) -> None:
    from actors.what_if_report import step_words

    period, check = report["period"], report["faithfulness"]
    print(
        f"what-if over {period['since']} .. {period['until']} ({period['duration_s']:g} s): {period['contracts']} contracts, "
        f"{period['snapshots_recorded']} snapshots recorded, IB's line limit {_fmt(period['line_limit_recorded'])}; "
        + step_words(period["step_s"])
        + _pacing_words(period)
    )
    if not period["settings_recorded"]:
        print("note: this log predates recorded [freshness] settings; the config file's (or the defaults) stand in for them")
    verdict = "faithful" if check["faithful"] else "NOT faithful: read the rows below as rough"
    print(f"faithfulness (the as-run configuration replayed vs the positions table; p99 within {check['within']:.0%} or 1 s): {verdict}")
    for path, name in (("active", "active contracts"), ("other", "other contracts")):
        p = check["p99"][path]
        print(f"  p99 age of {name:<17} recorded {_fmt(p['recorded_s']):>8} s   replayed {_fmt(p['replayed_s']):>8} s   {'ok' if p['ok'] else 'differs'}")
    header = f"{'configuration':<28} {'streamed':>8} {'active p50/p99/max s':>22} {'other p50/p99/max s':>22} {'missed':>7} {'past target':>12} {'snap/s':>7} {'101s':>5}"
    print(header)
    for row in [check["recorded"], *report["rows"]]:
        share = "-" if row["streamed_share"] is None else f"{row['streamed_share']:.0%}"
        print(
            f"{row['label']:<28} {share:>8} {_ages(row['active']):>22} {_ages(row['other']):>22} {row['missed_contracts']:>7} "
            f"{row['missed_s']:>10g} s {row['snapshot_msgs_per_s']:>7g} {row['extra'].get('refusals_101', '-'):>5}"
        )
    worst = report["rows"][0]["worst"]
    if worst:
        names = ", ".join(f"{w['symbol']} {w['conid']} ({w['over_target_s']:g} s)" for w in worst)
        print(f"longest past target, as run: {names}")
    sys.stdout.flush()
