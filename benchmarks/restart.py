"""Benchmark: restart of the runtime on a log of 1,000,000 events, with start-up verification on.

What is measured: ``python runtime.py run --demo`` as a fresh process on an
existing data directory; the clock runs from just before the process is
spawned until its control socket answers ``status`` (the log verified, the
actors recovered, the control server up): what an operator waits for.
Then SIGTERM and a clean stop (which signs the head and lists the signed
files' hashes with their identities: ``storage.file_hashes``), and the
next run.

Two kinds of start, alternated in one session so both see the same machine:

* ``restart_s``: signed checkpoints on (``[audit] sign = true``): the newest
  checkpoint's signature, its data files (Delta log, sizes, sha256), then
  the chain only after it. Each measured start follows a signed clean stop,
  as every start of a deployment that signs does: after each unsigned
  start one more signed start (not measured) signs what it appended, which
  the next signed start would otherwise re-hash as a tail no real restart has.
* ``restart_full_verify_s``: ``[audit] sign = false``, i.e. start-up as it
  was before signed checkpoints: the whole chain re-hashed.

Each figure is the median of ``--runs`` starts, with the checkout's
modules byte-compiled first (as a deployment's are after its first run,
unless ``PYTHONDONTWRITEBYTECODE`` is set). Also reported, measured in
this process on the same log: ``start_check_s`` (the signed start-up check
alone, every signed file read and hashed), ``start_check_listed_s`` (the
same with the signed list of file hashes, as a restart in place runs it;
``files_read_listed`` files it still read) and ``full_verify_s`` (the whole-chain check alone), and
``python_start_s`` (a bare ``python runtime.py --help``: the interpreter and
argument parsing, the floor of any start).

The log is the one of ``benchmarks/recovery.py`` (registry and queue events
from the actors' own decision code, snapshots at 99%), then signed once.
Build it once and reuse it with ``--keep DIR``. The signing key is kept in
the data directory's parent (never ``~/.config``). Target: restart_s <= 1.0.

    python benchmarks/restart.py [--events N] [--keep DIR] [--runs N] [--json]
"""

from __future__ import annotations

import os
import sys

# benchmarks/ holds a ``queue.py``: keep it from shadowing the stdlib module.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from loguru import logger

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime.py"


def sign_existing(data_dir: str, key: Path) -> dict[str, Any]:
    """Open the log once with the signing thread: it re-hashes the unsigned rows and signs the head at close."""
    from storage.checkpointer import Checkpointer
    from storage.event_log import EventLog
    from storage.signing import load_signer
    from storage.tables import LogConfig

    started = time.perf_counter()
    log = EventLog.open(data_dir, config=LogConfig(maintenance=False))
    checkpointer = Checkpointer(log, load_signer(key, create=True), every=10_000).start()
    log.close(timeout=600)
    return {"sign_s": round(time.perf_counter() - started, 2), "signed_checkpoints": checkpointer.written}


def checks(data_dir: str, key: Path) -> dict[str, float]:
    """The start-up check and the full check, alone, timed in this process."""
    from storage.attest import verify_start
    from storage.checkpoints import FileHasher
    from storage.file_hashes import load_known
    from storage.signing import load_signer
    from storage.tables import table_uri
    from storage.verify import verify_log

    trusted = {load_signer(key).public_key}
    started = time.perf_counter()
    fast = verify_start(data_dir, trusted)
    fast_s = time.perf_counter() - started
    if not fast.ok or fast.method != "checkpoint":
        raise RuntimeError(f"the signed start-up check did not take the checkpoint path: {fast}")
    started = time.perf_counter()
    hasher = FileHasher(table_uri(data_dir, "events"), known=load_known(data_dir, trusted))
    listed = verify_start(data_dir, trusted, hasher=hasher)
    listed_s = time.perf_counter() - started
    if not listed.ok or listed.method != "checkpoint":
        raise RuntimeError(f"the signed start-up check with the list of file hashes failed: {listed}")
    started = time.perf_counter()
    full = verify_log(table_uri(data_dir, "events"))
    full_s = time.perf_counter() - started
    if not full.ok:
        raise RuntimeError(f"the log does not verify: {full}")
    return {
        "start_check_s": round(fast_s, 3),
        "start_check_listed_s": round(listed_s, 3),
        "files_read_listed": hasher.hashed,
        "full_verify_s": round(full_s, 3),
        "events": full.last_seq,
    }


def serves_status(sock: Path) -> bool:
    from actors.control import ControlUnavailable, request

    try:
        return bool(request(sock, {"type": "status"}, timeout=5)["ok"])
    except (ControlUnavailable, OSError, ValueError):
        return False


def one_start(data_dir: str, key: Path, *, signed: bool, scratch: Path) -> float:
    """Spawn the runtime, time it to a ``status`` answer, stop it cleanly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    env["SLOTWISE_AUDIT_SIGNING_KEY"] = str(key)
    env["SLOTWISE_AUDIT_SIGN"] = "true" if signed else "false"
    sock = Path(data_dir) / "slotwise.sock"
    argv = [sys.executable, str(RUNTIME), "run", "--demo", "--duration", "0", "--data-dir", data_dir, "--log-level", "WARNING"]
    with open(scratch / "runtime.stderr", "ab") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
        while not serves_status(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"the runtime exited with {proc.returncode}; see {scratch / 'runtime.stderr'}")
            time.sleep(0.01)
        ready = time.perf_counter() - started
        proc.send_signal(signal.SIGTERM)
        if proc.wait(600) != 0:
            raise RuntimeError(f"the runtime stopped with {proc.returncode}; see {scratch / 'runtime.stderr'}")
    return ready


def python_start() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, str(RUNTIME), "--help"], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--contracts", type=int, default=10_000)
    parser.add_argument("--keep", help="build the log in this directory (reused if it already holds one)")
    parser.add_argument("--runs", type=int, default=3, help="starts of each kind (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    # the bytecode caches a deployment has after its first run: without them (PYTHONDONTWRITEBYTECODE, set on some
    # machines) every measured start would also compile each module changed since the caches were last written
    subprocess.run([sys.executable, "-m", "compileall", "-q", "actors", "events", "storage"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from benchmarks.recovery import build

    with tempfile.TemporaryDirectory(prefix="slotwise-bench-restart-") as tmp:
        data_dir = args.keep or os.path.join(tmp, "data")
        key = Path(data_dir).resolve().parent / "restart-bench-signing.key"
        prepared: dict[str, Any] = {}
        if not os.path.exists(os.path.join(data_dir, "events")):
            built = build(data_dir, args.events, args.contracts)
            prepared.update({k: v for k, v in built.items() if k != "events"}, built_events=built["events"])
        if not os.path.exists(os.path.join(data_dir, "checkpoints")):
            prepared.update(sign_existing(data_dir, key))
        signed_runs: list[float] = []
        full_runs: list[float] = []
        one_start(data_dir, key, signed=True, scratch=Path(tmp))  # not measured: the log's last stop is signed
        for _ in range(args.runs):
            signed_runs.append(one_start(data_dir, key, signed=True, scratch=Path(tmp)))
            full_runs.append(one_start(data_dir, key, signed=False, scratch=Path(tmp)))
            one_start(data_dir, key, signed=True, scratch=Path(tmp))  # not measured: signs the unsigned run's tail
        alone = checks(data_dir, key)
        floor = python_start()
    result = {
        "benchmark": "restart",
        "events": alone["events"],
        "restart_s": round(statistics.median(signed_runs), 3),
        "restart_full_verify_s": round(statistics.median(full_runs), 3),
        "restart_s_runs": [round(x, 3) for x in signed_runs],
        "restart_full_verify_s_runs": [round(x, 3) for x in full_runs],
        "start_check_s": alone["start_check_s"],
        "start_check_listed_s": alone["start_check_listed_s"],
        "files_read_listed": alone["files_read_listed"],
        "full_verify_s": alone["full_verify_s"],
        "python_start_s": round(floor, 3),
        **prepared,
        "targets": {"restart_s": 1.0},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>28}: {value}")


if __name__ == "__main__":
    main()
