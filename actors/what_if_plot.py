"""The what-if chart: quote age percentiles against lines, per target, and the contracts longest past target.

matplotlib, not plotly: it writes a PNG with no browser, server or
JavaScript bundle, opens anywhere (a ticket, an e-mail, a terminal image
viewer), and is the most widely kept plotting library in Python. An
``.html`` file is one self-contained page: the same PNG inlined, and the
report's table, so it reads without the terminal too. The Agg backend is
forced: the trading host has no display.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from actors.what_if_report import step_words

__all__ = ["render_png", "write_plot"]


def render_png(report: dict[str, Any]) -> bytes:
    """Two panels: age percentiles vs lines (one line per target and path), and the worst contracts as run."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r["extra"].get("as_run")]
    as_run = report["rows"][0]
    fig, (ages_ax, worst_ax) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    series: dict[tuple[str, float], list[tuple[int, float, float]]] = defaultdict(list)
    for row in rows:
        extra = row["extra"]
        for path in ("active", "other"):
            figures = row[path]
            if figures["p99_s"] is not None:
                series[(path, extra["monitoring_s"])].append((extra["max_lines"], figures["p50_s"], figures["p99_s"]))
    for (path, monitoring_s), points in sorted(series.items()):
        points.sort()
        lines = [p[0] for p in points]
        name = f"{'active' if path == 'active' else 'other'} (monitoring {monitoring_s:g} s)"
        (drawn,) = ages_ax.plot(lines, [p[2] for p in points], marker="o", label=f"p99 {name}")
        ages_ax.plot(lines, [p[1] for p in points], marker=".", linestyle="--", color=drawn.get_color(), label=f"p50 {name}")
    run_lines = as_run["extra"]["max_lines"]
    for path, marker in (("active", "s"), ("other", "D")):
        if as_run[path]["p99_s"] is not None:
            ages_ax.scatter([run_lines], [as_run[path]["p99_s"]], marker=marker, color="black", zorder=5, label=f"p99 {path}, as run")
    recorded = report["faithfulness"]["recorded"]
    for path, marker in (("active", "x"), ("other", "+")):
        if recorded[path]["p99_s"] is not None:
            ages_ax.scatter([run_lines], [recorded[path]["p99_s"]], marker=marker, s=90, color="red", zorder=6, label=f"p99 {path}, recorded")
    ages_ax.set_xlabel("market data lines")
    ages_ax.set_ylabel("quote age (s)")
    ages_ax.set_title("Quote age by line count (lower is fresher)")
    ages_ax.grid(True, alpha=0.3)
    ages_ax.legend(fontsize=7, loc="upper right")
    worst = as_run["worst"]
    if worst:
        names = [f"{w['symbol']} {w['conid']}" for w in worst][::-1]
        worst_ax.barh(names, [w["over_target_s"] for w in worst][::-1], color="tab:red")
        worst_ax.set_xlabel("seconds past target age")
    else:
        worst_ax.text(0.5, 0.5, "no contract passed its target", ha="center", va="center", transform=worst_ax.transAxes)
        worst_ax.set_yticks([])
    worst_ax.set_title("Longest past target, as run")
    period = report["period"]
    verdict = "faithful" if report["faithfulness"]["faithful"] else "NOT faithful"
    fig.suptitle(
        f"what-if {period['since']} .. {period['until']}, {period['contracts']} contracts; replay {verdict}; {step_words(period.get('step_s', 0))}",
        fontsize=10,
    )
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()


def write_plot(path: str, report: dict[str, Any]) -> None:
    """Write the chart to ``path``: a PNG, or an HTML page holding it and the table; all of it, or nothing."""
    png = render_png(report)
    data = png if path.lower().endswith(".png") else _page(report, png).encode("utf-8")
    target = Path(path)
    # beside the target, then moved onto it: a full disk or a Ctrl-C part-way leaves no half-written chart
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _cell(figures: dict[str, Any]) -> str:
    return "/".join("-" if figures[k] is None else f"{figures[k]:g}" for k in ("p50_s", "p99_s", "max_s"))


def _page(report: dict[str, Any], png: bytes) -> str:
    period = report["period"]
    rows = [report["faithfulness"]["recorded"], *report["rows"]]
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                row["label"],
                "-" if row["streamed_share"] is None else f"{row['streamed_share']:.0%}",
                _cell(row["active"]),
                _cell(row["other"]),
                row["missed_contracts"],
                f"{row['missed_s']:g}",
                f"{row['snapshot_msgs_per_s']:g}",
            )
        )
        + "</tr>"
        for row in rows
    )
    image = base64.b64encode(png).decode("ascii")
    title = html.escape(f"Slotwise what-if, {period['since']} .. {period['until']}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em .8em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}</style></head><body>"
        f"<h1>{title}</h1><p>{period['contracts']} contracts, {period['snapshots_recorded']} snapshots recorded; "
        f"the replay of the configuration that ran is {'faithful' if report['faithfulness']['faithful'] else 'NOT faithful'} "
        f"to the positions table (p99 ages within 20% or 1 s); {html.escape(step_words(period.get('step_s', 0)))}.</p>"
        f"<img alt='quote age by line count' src='data:image/png;base64,{image}'>"
        "<table><tr><th>configuration</th><th>streamed</th><th>active p50/p99/max s</th><th>other p50/p99/max s</th>"
        f"<th>missed</th><th>past target s</th><th>snapshots/s</th></tr>{body}</table></body></html>\n"
    )
