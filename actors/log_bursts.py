"""Bursts of alike log lines collapsed into their first few and one summary line.

Why: one event often touches many contracts at once -- thirty contracts
registered that IB does not hold, a hundred streams IB answers "delayed"
for at start-up -- and one line per contract buries the line that matters.
Lines are alike when they come from the same place in the code (module,
function, line number) and start with the same word: one line of shared
code (an actor base class saying "registry recovered", "queue recovered")
speaks for different things, a per-contract line does not. Within a window, the first ``keep`` of them are
written; the rest are counted, and when the window closes one line says how
many were left out and quotes the first of them. ERROR and above are never
held back, nor lines bound with ``periodic=True`` (the status line: alike by
design, and wanted every time).

The runtime (the only module that configures loguru) installs
:meth:`BurstFilter.filter` on every sink and calls :meth:`BurstFilter.flush`
from its main loop and at stop. Every sink sees the same decision: it is
kept on the record, which loguru hands to each sink in turn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BurstFilter"]

_ERROR_NO = 40
_DECISION = "_burst_pass"


class _Site:
    __slots__ = ("first_left_out", "left_out", "level", "level_no", "passed", "started")

    def __init__(self, now: float) -> None:
        self.started = now
        self.passed = 0
        self.left_out = 0
        self.first_left_out = ""
        self.level = "INFO"
        self.level_no = 0


class BurstFilter:
    """Per call site: ``keep`` lines per ``window_s``, then a count; :meth:`flush` reports the counts."""

    def __init__(self, keep: int = 3, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep = keep
        self.window_s = window_s
        self.clock = clock
        self._sites: dict[tuple[str, str, int, str], _Site] = {}
        self._lock = threading.Lock()

    def filter(self, record: dict[str, Any]) -> bool:
        """loguru filter: True to write the record. Decided once per record, for every sink alike."""
        extra = record["extra"]
        if _DECISION not in extra:
            extra[_DECISION] = self._decide(record)
        return bool(extra[_DECISION])

    def _decide(self, record: dict[str, Any]) -> bool:
        if record["level"].no >= _ERROR_NO or record["extra"].get("burst_summary") or record["extra"].get("periodic"):
            return True
        message = record["message"]
        key = (record["name"] or "", record["function"], record["line"], message.split(" ", 1)[0])
        now = self.clock()
        with self._lock:
            site = self._sites.get(key)
            if site is None or (now - site.started >= self.window_s and site.left_out == 0):
                site = self._sites[key] = _Site(now)
            if site.passed < self.keep:
                site.passed += 1
                return True
            if site.left_out == 0:
                site.first_left_out = record["message"]
            site.left_out += 1
            if record["level"].no > site.level_no:
                site.level, site.level_no = record["level"].name, record["level"].no
            return False

    def flush(self, log: Any, *, final: bool = False) -> int:
        """Write one summary line per site whose window closed with lines left out; returns how many."""
        now = self.clock()
        due: list[tuple[str, str, int, float, str]] = []
        with self._lock:
            for key, site in list(self._sites.items()):
                if not final and now - site.started < self.window_s:
                    continue
                if site.left_out:
                    due.append((key[0], site.level, site.left_out, now - site.started, site.first_left_out))
                del self._sites[key]
        for name, level, count, span, first in due:
            quoted = first if len(first) <= 160 else first[:157] + "..."
            summary = log.bind(burst_summary=True).patch(lambda record, name=name: record.update(name=name))
            summary.log(level, "... and {} more like that in the last {:.0f} s, the first: {}", count, span, quoted)
        return len(due)
