"""Child process for the log crash test: 4 threads append until the parent SIGKILLs us.

Each acknowledged (durable) event is printed as ``ack <thread> <n> <seq>``
only after its receipt resolved, so every line the parent read names an
event the log promised to keep.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storage.event_log import EventLog
from storage.tables import LogConfig
from tests.faults.crash_probe import CrashProbe

_print_lock = threading.Lock()


def produce(log: EventLog, thread: int, start: int) -> None:
    n = start
    while True:
        receipts = [
            (n + i, log.append(CrashProbe(thread=thread, n=n + i), stream=f"t{thread}", key=str(thread)))
            for i in range(50)
        ]
        n += 50
        for number, receipt in receipts:
            seq = receipt.wait(30)
            with _print_lock:
                sys.stdout.write(f"ack {thread} {number} {seq}\n")
        sys.stdout.flush()


def main() -> None:
    data_dir, round_no = sys.argv[1], int(sys.argv[2])
    config = LogConfig(flush_ms=2, compact_every_commits=25, vacuum_every_compactions=2, vacuum_retention_hours=0)
    log = EventLog.open(data_dir, config=config)
    print("ready", flush=True)
    threads = [threading.Thread(target=produce, args=(log, t, round_no * 10_000_000), daemon=True) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
