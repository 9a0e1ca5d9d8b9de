#!/usr/bin/env python3
"""Slotwise: the composition root and the command line.

    python runtime.py [run] [--config FILE] [--data-dir DIR] [--demo] [--duration S]
                      [--ib-host H] [--ib-port P] [--client-id N] [--log-level L] [--log-file PATH]
    python runtime.py registry add|remove CONID [CONID ...] --strategy NAME [--data-dir DIR]
    python runtime.py registry list [--data-dir DIR] [--json]
    python runtime.py status  [--data-dir DIR] [--json]
    python runtime.py replay  [--data-dir DIR] [--as-of ISO-TIME | --seq N] [--json]
    python runtime.py audit   [--data-dir DIR] [--conid C] [--type T] [--since ISO] [--until ISO]
                              [--format table|jsonl|csv]
    python runtime.py verify  [--data-dir DIR] [--digest FILE]
    python runtime.py digest  [--data-dir DIR]
    python runtime.py contracts [--json] [--path stream|queue|overflow|portfolio] [--stale-over S] [--offline]
    python runtime.py queue dead-letters [--json] [--offline] | queue requeue CONID [CONID ...]
    python runtime.py fleet   --root DIR-OR-URI [--json]   (every account's data dir under a root)
    python runtime.py what-if [--data-dir DIR] [--max-lines 60,100,200] [--monitoring-s 30,60] [--json] [--plot F]

``run`` builds the actor graph (DESIGN.md section 2) and runs until SIGINT or
SIGTERM (or ``--duration``), then stops it in order: no new work, streams
cancelled, writers flushed, snapshots written, log closed; exit 0. This is
the only module that configures logging.

Exit codes: 0 success; 1 a refused or failed command (broken log, no
runtime, bad input); 2 usage errors; 3 the event log failed while running;
130 a client command stopped by Ctrl-C (SIGINT; ``run`` stops gracefully, exit 0).
"""

from __future__ import annotations

if __name__ == "__main__":
    import _signal  # built in, imports nothing: in place before the imports below, which take tenths of a second

    def _interrupted_early(signum: int, frame: object) -> None:
        """Ctrl-C before main() runs: nothing is open yet; one line, not a traceback from inside an import."""
        import os

        os.write(2, b"error: interrupted\n")
        os._exit(130)

    _signal.signal(_signal.SIGINT, _interrupted_early)

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from actors.cli_checks import (
    OneLineParser,
    data_dir_problem,
    duration,
    error_line,
    log_file_problem,
    log_level,
    port_problem,
)
from actors.fleet_view import add_parser as fleet_parser
from actors.operator_cli import add_parsers as operator_parsers
from actors.what_if_cli import add_parser as what_if_parser
from storage.permissions import runtime_dir, set_private_umask

# delta-rs logs through env_logger, at WARN unless RUST_LOG says otherwise, straight to stderr:
# one S3 call without credentials prints dozens of aws_config lines in front of our one-line
# error. env_logger reads RUST_LOG once, when deltalake is first imported, so this comes
# before any import that reaches it (none above does). A RUST_LOG the user set wins.
os.environ.setdefault("RUST_LOG", "error")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOG_FAILED = 0, 1, 2, 3
#: 128 + SIGINT, as a shell reports a command Ctrl-C stopped.
EXIT_INTERRUPTED = 130
COMMANDS = ("run", "registry", "status", "replay", "audit", "verify", "digest", "contracts", "queue", "fleet", "what-if")


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="runtime.py",
        description="Slotwise keeps every IB position and its market data in sync within IB's market data lines.",
        epilog="With no command, 'run' is assumed. Exit codes: 0 ok, 1 failed, 2 usage, 3 event log failed, 130 Ctrl-C.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,registry,status,replay,audit,verify,digest,contracts,queue,fleet,what-if}")

    def data_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="data directory or delta-rs URI (default ./data, or $SLOTWISE_DATA_DIR)")
        p.add_argument("--config", help="TOML config file (its [runtime] data_dir is used when --data-dir is absent)")

    run = sub.add_parser("run", help="run the runtime (default)")
    data_dir_arg(run)
    run.add_argument("--demo", action="store_true", help="run against the built-in simulated IB account")
    run.add_argument(
        "--duration", type=duration, help="stop cleanly after S seconds, 0: until stopped (demo default: [demo] default_duration_s)"
    )
    run.add_argument("--ib-host")
    run.add_argument("--ib-port", type=int)
    run.add_argument("--client-id", type=int)
    run.add_argument("--allow-broken-log", action="store_true", help="start even if verify finds a broken hash chain")
    run.add_argument("--log-level", type=log_level, help="TRACE, DEBUG, INFO (default), WARNING, ... or $SLOTWISE_LOG_LEVEL")
    run.add_argument("--log-file", metavar="PATH", help="also write the log to PATH (rotated at 50 MB, 10 files kept)")

    registry = sub.add_parser("registry", help="change or list the active strategies of the running runtime")
    reg_sub = registry.add_subparsers(dest="registry_command", required=True)
    for name in ("add", "remove"):
        p = reg_sub.add_parser(name, help=f"{name} contracts {'to' if name == 'add' else 'from'} a strategy")
        p.add_argument("conids", nargs="+", type=int, metavar="CONID")
        p.add_argument("--strategy", required=True)
        p.add_argument("--expected-quantity", type=float, help="(add) expected position, for reconciliation")
        if name == "add":
            p.add_argument(
                "--priority",
                type=int,
                default=0,
                help="the strategy's claim on a line when lines are short: higher streams first (default 0)",
            )
        data_dir_arg(p)
    listing = reg_sub.add_parser("list", help="list active contracts and their strategies")
    listing.add_argument("--json", action="store_true")
    data_dir_arg(listing)

    status = sub.add_parser("status", help="status of the running runtime")
    status.add_argument("--json", action="store_true")
    data_dir_arg(status)

    replay = sub.add_parser("replay", help="rebuild registry and queue from the log")
    target = replay.add_mutually_exclusive_group()
    target.add_argument("--as-of", help="state after the last event at or before this ISO-8601 time (UTC if no zone)")
    target.add_argument("--seq", type=int, help="state after event N")
    replay.add_argument("--json", action="store_true")
    data_dir_arg(replay)

    audit = sub.add_parser("audit", help="print the event timeline")
    audit.add_argument("--conid", type=int, action="append", help="only this contract's events (repeatable)")
    audit.add_argument("--type", action="append", dest="types", help="only events of this type (repeatable)")
    audit.add_argument("--since", help="ISO-8601 time, inclusive")
    audit.add_argument("--until", help="ISO-8601 time, inclusive")
    audit.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")
    data_dir_arg(audit)

    verify = sub.add_parser("verify", help="check seq continuity, the hash chain, payloads, snapshots and signed checkpoints")
    verify.add_argument("--digest", metavar="FILE", help="prove the log still holds the head in FILE (from 'digest')")
    data_dir_arg(verify)

    digest = sub.add_parser("digest", help="print the newest signed head of the log (JSON), for an auditor to keep")
    data_dir_arg(digest)
    operator_parsers(sub, data_dir_arg)
    fleet_parser(sub)
    what_if_parser(sub, data_dir_arg)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    return parser.parse_args(argv)


if __name__ == "__main__":
    # Usage errors and --help need nothing but the standard library: answer them
    # before importing the dependencies, which may not be installed yet.
    parse_args(sys.argv[1:])

try:
    import msgspec
    import pykka
    from loguru import logger

    from actors.base import RecoveryError
    from actors.config import Config, ConfigError, load_config
    from actors.control import ControlServer, ControlUnavailable, request
    from actors.fleet_view import cmd_fleet
    from actors.handlers import HandlerSet
    from actors.log_bursts import BurstFilter
    from actors.messaging import CommandRejected, ReplyFuture, ask, ask_async
    from actors.operator_cli import CONTROL_REQUESTS as OPERATOR_REQUESTS
    from actors.operator_cli import answer_control as answer_operator
    from actors.operator_cli import cmd_contracts, cmd_queue
    from events.commands import CommandError, decode_command
    from events.log import RuntimeStarted, RuntimeStopped
    from events.queue import QueueStats, Requeue
    from events.registry import AddActive, AddActiveMany, ListActive, RemoveActive, RemoveActiveMany
    from storage.checkpointer import Checkpointer
    from storage.checkpoints import Checkpoint, CheckpointStore, CheckpointsUnreadable, FileHasher
    from storage.event_log import EventLog, LogFailedError
    from storage.file_hashes import KnownFile, load_known
    from storage.lock import DataDirLocked
    from storage.object_store import export_storage_settings, reach_problem, store_error
    from storage.signing import Signer, SigningKeyError, load_signer, resolve_key_path
    from storage.snapshots import SnapshotStore
    from storage.tables import is_local, table_uri
except ModuleNotFoundError as _missing:
    if __name__ != "__main__":
        raise
    sys.exit(f"error: {_missing.name} is not installed: run `pip install .` in the checkout first")

# ---------------------------------------------------------------------- logging


class _InterceptHandler(logging.Handler):
    """Route the stdlib logging of pykka, ib_insync and asyncio into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


#: Bursts of alike lines (one per contract, say) are cut to their first few and a summary; the run loop flushes it.
BURSTS = BurstFilter()
_LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level:<7} | {name}: {message}"


def configure_logging(level: str = "INFO", log_file: str | None = None) -> None:
    logger.remove()
    logger.add(sys.stderr, level=level, backtrace=False, diagnose=False, format=_LOG_FORMAT, filter=BURSTS.filter)
    if log_file:  # loguru rotates and prunes it; checked writable before anything started (cli_checks)
        logger.add(
            log_file, level=level, backtrace=False, diagnose=False, format=_LOG_FORMAT, filter=BURSTS.filter,
            rotation="50 MB", retention=10,
        )  # fmt: skip
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    for name in ("pykka", "ib_insync", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)



def resolve_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {"runtime": {"data_dir": getattr(args, "data_dir", None)}}
    if getattr(args, "command", None) == "run":
        overrides["ib"] = {"host": args.ib_host, "port": args.ib_port, "client_id": args.client_id}
    return load_config(getattr(args, "config", None), overrides=overrides)  # SLOTWISE_LOG_LEVEL is skipped there


# ---------------------------------------------------------------------- the runtime


#: AF_UNIX socket paths are at most 107 bytes on Linux (sun_path is 108 with its NUL).
_MAX_SOCKET_PATH = 107


def control_socket_path(data_dir: str) -> Path:
    """The control socket lives in the data directory; in this user's runtime dir for object-store URIs,
    and for a data directory so deep that the socket's path would pass the AF_UNIX limit (the runtime
    would refuse to start there)."""
    if is_local(data_dir):
        local = Path(data_dir.removeprefix("file://"))
        path = local / "slotwise.sock"
        if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
            return path
        data_dir = str(local.resolve())  # the same name from any working directory
    # the CLI and the runtime are different processes: the name must not depend on hash() (randomised per process)
    digest = hashlib.sha256(data_dir.encode()).hexdigest()[:12]
    return runtime_dir() / f"slotwise-{digest}.sock"


#: Commands the control socket passes on; claims and acks stay with the worker.
_REGISTRY_COMMANDS = (AddActive, RemoveActive, AddActiveMany, RemoveActiveMany, ListActive)
_QUEUE_COMMANDS = (Requeue, QueueStats)


class Runtime:
    """Builds the actor graph, runs it, and stops it in order."""

    def __init__(self, config: Config, *, demo: bool = False, allow_broken_log: bool = False) -> None:
        self.config = config
        self.demo = demo
        self.allow_broken_log = allow_broken_log
        self.data_dir = config.runtime.data_dir
        self.stop_requested = threading.Event()
        self.stop_reason = "stopped"
        self.log_failure: LogFailedError | None = None
        self.actor_failure: str | None = None
        self.started_at = time.monotonic()
        self.log: EventLog | None = None
        #: RuntimeStarted is in the log; only then does a stop append RuntimeStopped (a refused start appends nothing)
        self.announced = False
        self.refs: dict[str, pykka.ActorRef[Any]] = {}
        self.handlers = HandlerSet()
        self.control: ControlServer | None = None
        self.metrics: Any = None
        self._prehash: FileHasher | None = None
        #: The verified signed list of data files hashed before (storage/file_hashes.py): not read again if unchanged.
        self._known_files: Mapping[str, KnownFile] = {}
        #: The newest signed checkpoint, as the prefetch read it (None: the check reads it itself).
        self._newest_checkpoint: Callable[[], Checkpoint | None] | None = None
        self._rate = (time.monotonic(), 0)
        self.events_per_s = 0.0

    # ---------------------------------------------------------------- start

    def start(self) -> None:
        from actors.fake_ib_demo import demo_positions
        from actors.ib_base import AddSubscriber
        from actors.position_writer import PositionWriter
        from actors.queue import QueueActor
        from actors.reconciliation import Reconciliation
        from actors.registry import RegistryActor
        from actors.router import ActiveAtStart, RouterSettings, StreamRouter
        from actors.worker import QueueWorker, WorkerSettings
        from events.ib import Connect, MarketUpdate, PositionChanged, PositionsComplete

        rt = self.config.runtime
        if self.config.metrics.enabled:
            from actors.metrics import MetricsServer

            # bound before the log opens: a port in use refuses the start with nothing written
            metrics = self.config.metrics
            try:
                self.metrics = MetricsServer(metrics.host, metrics.port, self.metrics_snapshot).start()
            except OSError as exc:
                raise StartRefused(f"metrics port {metrics.host}:{metrics.port} cannot be opened: {exc.strerror or exc}") from None
        try:  # the key before the log: a missing or bad key refuses the start with nothing written
            self.signer = audit_signer(self.config, create=not CheckpointStore(self.data_dir).exists())
        except SigningKeyError as exc:
            raise StartRefused(str(exc)) from None
        if self.signer is not None and self.config.audit.hash_cache and is_local(self.data_dir):
            self._known_files = load_known(self.data_dir, trusted_keys(self.config, self.signer))
        self._prehash = self._prefetch_signed_files()
        self.log = EventLog.open(self.data_dir, config=self.config.log)
        self.log.add_failure_listener(self._on_log_failure)
        # The start-up check and the actors' recovery only read the log: they run at once. Each actor waits
        # for the check's verdict before it appends or tells anyone anything (EventLog.wait_start_check), and
        # nothing else appends before it either (RuntimeStarted, the checkpointer, the positions writer).
        start_check = self._start_check()
        snapshots = SnapshotStore(self.data_dir, preload=True)  # one read serves every actor's recovery
        registry = RegistryActor.start(self.log, snapshots, snapshot_every=rt.snapshot_every)
        queue = QueueActor.start(
            self.log,
            snapshots,
            max_attempts=rt.max_attempts,
            backoff_base_s=rt.retry_backoff_s,
            backoff_cap_s=rt.retry_backoff_cap_s,
            snapshot_every=rt.snapshot_every,
            dead_letter_retry_s=rt.dead_letter_retry_s,
        )
        reconciliation = Reconciliation.start(self.log, snapshots)
        self.refs.update(registry=registry, queue=queue, reconciliation=reconciliation)
        if self.demo:
            from actors.fake_ib import FakeIbActor, FakeIbSettings

            demo = self.config.demo
            positions = demo_positions(demo.stocks, demo.option_strategies, demo.seed)
            ib = FakeIbActor.start(
                FakeIbSettings(
                    positions=positions,
                    line_limit=demo.true_lines or rt.max_lines,
                    tick_interval_s=demo.tick_interval_s,
                    snapshot_latency_s=demo.snapshot_latency_s,
                    snapshot_latency_max_s=demo.snapshot_latency_max_s,
                    portfolio_interval_s=demo.portfolio_interval_s,
                    disconnect_every_s=demo.disconnect_every_s,
                    disconnect_for_s=demo.disconnect_for_s,
                    seed=demo.seed,
                )
            )
        else:
            from actors.ib import IbActor  # ib_insync: imported only by a runtime that talks to IB

            ib = IbActor.start(self.config.ib)  # it connects at Connect, below
        self.refs["ib"] = ib
        fresh = self.config.freshness
        router_settings = RouterSettings.from_config(
            fresh, max_lines=rt.max_lines, snapshot_timeout_s=self.config.ib.snapshot_timeout_s
        )
        router = StreamRouter.start(
            self.log,
            router_settings,
            ib=ib,
            queue=queue,
            handlers=self.handlers,
            snapshots=snapshots,
        )
        self.refs["router"] = router
        checkpointer = start_check()  # a broken log raises here; the actors then stay inert and write nothing
        self._discard_stale_snapshots(snapshots)
        if checkpointer is not None:
            checkpointer.start()
        self.log.append(
            RuntimeStarted(
                writer_id=self.log.writer_id,
                pid=os.getpid(),
                host=socket.gethostname(),
                mode="demo" if self.demo else "run",
                max_lines=rt.max_lines,
                freshness={f: float(getattr(self.config.freshness, f)) for f in self.config.freshness.__struct_fields__},
            ),
            stream="runtime",
            key="runtime",
        )
        self.announced = True
        self.log.start_check_done(True)
        writer = PositionWriter.start(self.data_dir, self.config.positions, table_maintenance=self.config.log)
        self.refs["positions"] = writer
        for recovered in (registry, queue, reconciliation, router):  # a log an actor cannot replay stops the start here
            error = recovered.proxy().recovery_error.get(timeout=600)
            if error is not None:
                raise error
        if self.demo:
            self._seed_demo_registry(registry, demo_positions)
        self.handlers.add(writer, accepts=(MarketUpdate, PositionChanged), batches=True)
        # subscribe first, then read the registry: an activation may arrive twice, never not at all
        registry_proxy = registry.proxy()
        registry_proxy.add_subscriber(router).get(timeout=10)
        registry_proxy.add_subscriber(reconciliation).get(timeout=10)
        router.tell(
            ActiveAtStart(
                conids=sorted(registry_proxy.all_active().get(timeout=10)),
                priorities=registry_proxy.priorities().get(timeout=10),
            )
        )
        worker = QueueWorker.start(
            WorkerSettings(
                max_snapshot_msgs_per_s=fresh.max_snapshot_msgs_per_s,
                lease_s=rt.lease_s,
                snapshot_timeout_s=self.config.ib.snapshot_timeout_s,
            ),
            queue=queue,
            ib=ib,
            router=router,
            handlers=self.handlers,
        )
        self.refs["worker"] = worker
        for ref in (router, worker, writer, reconciliation):
            ib.tell(AddSubscriber(ref))
        _ = PositionsComplete
        ib.tell(Connect())
        self.control = ControlServer(control_socket_path(self.data_dir), self._handle_control).start()
        logger.info(
            "slotwise running ({}; data {}, at most {} lines, {} always for snapshots; targets {:g} s, overflow {:g} s)",
            "demo" if self.demo else f"IB {self.config.ib.host}:{self.config.ib.port}",
            self.data_dir,
            rt.max_lines,
            fresh.min_snapshot_lines,
            fresh.monitoring_s,
            fresh.overflow_s,
        )

    def _discard_stale_snapshots(self, snapshots: SnapshotStore) -> None:
        """Delete snapshots past the log's durable end before anything is appended; refuse the start if it fails.

        Such a snapshot names events the log never got (an events table restored from an older backup, a
        commit lost after it was taken). Every actor ignores it, but once the log grows past its seq the next
        start would load it and skip the events at the seqs it claims. So it goes before the first append
        of this run (RuntimeStarted, which also releases the actors), or the run does not start.
        """
        assert self.log is not None
        backed = self.log.opened_seq
        for stream in snapshots.streams_past(backed):
            try:
                snapshots.discard_after(stream, backed)
            except Exception as exc:  # noqa: BLE001 - any failure: the start must not go on
                self.log.start_check_done(False)
                raise StartRefused(
                    f"snapshots of {stream} past the log's end (seq {backed}) could not be discarded ({exc}); "
                    "fix the snapshots table's storage and start again"
                ) from None

    def _prefetch_signed_files(self) -> FileHasher | None:
        """Start hashing the data files of the newest signed checkpoint, for the start-up check (or None).

        Hashing them is most of the check's work when they must be read
        (sha256 of every file it signed: ~220 MB on a million-event log);
        begun here, it runs while the log opens and the actors start. A file
        still exactly as it was when a checkpointer hashed it is not read
        again (the signed list of ``storage.file_hashes``; ``[audit]
        hash_cache``). It may begin before the log's lock is taken: Delta
        never rewrites a file in place, and a file changed after this read
        would be as changed after a later one; the check compares every
        listed file either way.
        """
        store = CheckpointStore(self.data_dir)
        if not self.config.runtime.verify_on_start or self.signer is None or not store.exists():
            return None
        hasher = FileHasher(table_uri(self.data_dir, "events"), known=self._known_files)
        newest: Future[Checkpoint | None] = Future()
        self._newest_checkpoint = newest.result  # the check reads it once, from here (0.05 s a read)

        def prefetch() -> None:
            try:
                checkpoint = store.newest()
            except CheckpointsUnreadable as exc:
                newest.set_exception(exc)  # the check reports it
                return
            newest.set_result(checkpoint)
            hasher.prefetch([] if checkpoint is None else [f.path for f in checkpoint.files], workers=min(8, os.cpu_count() or 1))

        threading.Thread(target=prefetch, name="prehash", daemon=True).start()
        return hasher

    def _start_check(self) -> Callable[[], Checkpointer | None]:
        """Start the start-up check in a thread; the call returned waits for it and raises what it raised.

        It reads the log (the newest signed checkpoint's files, then the
        tail, or the whole chain) while the actors recover from it, which
        also only reads: on a million-event log they are the two longest
        steps of a start. The log holds every actor's first append until the
        verdict (``EventLog.expect_start_check``). Once the log passed, the
        thread also builds the signer's checkpointer (its constructor only
        reads the newest checkpoint); the call returns it, not yet started.
        """
        assert self.log is not None
        log, signer = self.log, self.signer

        def checkpointer(newest: Checkpoint | None = None) -> Checkpointer | None:
            if signer is None:
                return None
            try:
                return Checkpointer(
                    log,
                    signer,
                    every=self.config.audit.checkpoint_every,
                    newest=newest,
                    known=self._known_files,
                    keep_hashes=self.config.audit.hash_cache,
                )
            except CheckpointsUnreadable as exc:
                raise StartRefused(str(exc)) from None

        if not self.config.runtime.verify_on_start:
            return checkpointer
        log.expect_start_check()
        failure: list[BaseException] = []
        made: list[Checkpointer | None] = []

        def check() -> None:
            try:
                made.append(checkpointer(self._verify_on_start()))
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread, which raises it
                failure.append(exc)

        thread = threading.Thread(target=check, name="start-check", daemon=True)
        thread.start()

        def wait() -> Checkpointer | None:
            thread.join()
            if failure:
                log.start_check_done(False)
                raise failure[0]
            return made[0]

        return wait

    def _verify_on_start(self) -> Checkpoint | None:
        """The start-up check; raises BrokenLogError. Returns the signed checkpoint it began from, if it did."""
        from storage.attest import verify_start
        from storage.verify import verify_log

        if not self.config.runtime.verify_on_start:
            return None
        if self.signer is None:
            report: Any = verify_log(table_uri(self.data_dir, "events"))
        else:
            assert self.log is not None
            report = verify_start(
                self.data_dir,
                trusted_keys(self.config, self.signer),
                events=self.log.start_view(),
                hasher=self._prehash,
                newest=self._newest_checkpoint,
            )
            if report.ok and report.method == "checkpoint":
                hasher = self._prehash  # made whenever there are checkpoints to start from
                assert hasher is not None
                logger.info(
                    "start-up verified from the signed checkpoint at seq {}: its data files ({} unchanged since they "
                    "were hashed, {} read and hashed), then {} later events",
                    report.last_seq - report.events,
                    hasher.reused,
                    hasher.hashed,
                    report.events,
                )
            elif report.ok and report.last_seq:
                logger.info("start-up verified the whole chain ({}); the next start begins at a checkpoint", report.reason)
        if report.ok:
            return getattr(report, "checkpoint", None)  # verify_log's report has none
        where = "" if report.first_bad_seq is None else f" at seq {report.first_bad_seq}"
        message = f"the event log is broken{where}: {report.problem}"
        if not self.allow_broken_log:
            raise BrokenLogError(f"{message}. Run 'python runtime.py verify' for details; --allow-broken-log starts anyway.")
        logger.error("{}; starting anyway (--allow-broken-log)", message)
        return None

    def _seed_demo_registry(self, registry: pykka.ActorRef[Any], demo_positions: Any) -> None:
        """First demo run: register the legs of the first option strategies as active."""
        if registry.proxy().all_active().get(timeout=10):
            return
        demo = self.config.demo
        legs = [p for p in demo_positions(demo.stocks, demo.option_strategies, demo.seed) if p.sec_type == "OPT"]
        groups: list[list[Any]] = []
        for leg in legs:  # strategies are built leg after leg, sharing symbol and expiry
            if groups and (groups[-1][0].symbol, groups[-1][0].expiry) == (leg.symbol, leg.expiry):
                groups[-1].append(leg)
            else:
                groups.append([leg])
        items = []
        for k, group in enumerate(groups[: demo.active_strategies]):
            name = f"{group[0].symbol.replace(' ', '')}-{group[0].expiry}-{k}"
            items.extend(
                AddActive(conid=leg.conid, strategy=name, source="demo", expected_quantity=leg.position) for leg in group
            )
        if items:
            ask(registry, AddActiveMany(items=items), timeout=30)
            logger.info("demo: {} option legs of {} strategies registered active", len(items), min(len(groups), demo.active_strategies))

    # ---------------------------------------------------------------- run and stop

    def _on_log_failure(self, error: LogFailedError) -> None:
        self.log_failure = error
        self.stop_reason = "event log failed"
        self.stop_requested.set()

    def run(self, duration: float | None, status_every: float | None) -> None:
        deadline = None if not duration else time.monotonic() + duration
        next_status = time.monotonic() + (status_every or 0)
        while not self.stop_requested.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.stop_reason = f"--duration {duration:g}s elapsed"
                break
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - now))
            self.stop_requested.wait(wait)
            BURSTS.flush(logger)
            dead = [name for name, ref in self.refs.items() if not ref.is_alive()]
            if dead and not self.stop_requested.is_set():
                # pykka stops an actor whose told message raised; running on without it would be silent damage
                self.actor_failure = f"the {', '.join(dead)} actor stopped unexpectedly (its error is in the log above)"
                self.stop_reason = self.actor_failure
                logger.error("{}; stopping the runtime", self.actor_failure)
                break
            if status_every and time.monotonic() >= next_status:
                next_status += status_every
                if self.demo:
                    _print_status(self.status_line())
                else:  # a service has no terminal: its status goes to the log
                    logger.bind(periodic=True).info("status: {}", self.status_line())

    def stop(self) -> None:
        """Stop in order: no new work, streams cancelled, writers flushed, snapshots, log closed."""
        BURSTS.flush(logger, final=True)
        logger.info("stopping: {}", self.stop_reason)
        if self.log is not None:
            self.log.start_check_done(False)  # a start that failed before the verdict: the actors stay inert
        if self.control is not None:
            self.control.stop()
        if self.metrics is not None:
            self.metrics.stop()
        for name in ("worker", "router", "ib", "reconciliation", "positions", "queue", "registry"):
            ref = self.refs.get(name)
            if ref is None:
                continue
            try:
                ref.stop(timeout=30)
            except pykka.Timeout:
                logger.error("{} did not stop within 30 s", name)
            except pykka.ActorDeadError:
                pass
        pykka.ActorRegistry.stop_all(timeout=10)
        if self.log is not None:
            if self.log.failed is None and self.announced:
                try:
                    self.log.append(RuntimeStopped(reason=self.stop_reason[:200]), stream="runtime", key="runtime")
                except LogFailedError:
                    pass
            self.log.close()

    # ---------------------------------------------------------------- status and control

    def status(self) -> dict[str, Any]:
        from actors.router import RouterStatus
        from actors.worker import WorkerStatus
        from events.ib import IbStats
        from events.positions import WriterStats

        assert self.log is not None
        out: dict[str, Any] = {"uptime_s": round(time.monotonic() - self.started_at, 1), "mode": "demo" if self.demo else "run"}
        out["max_lines"] = self.config.runtime.max_lines
        out["min_snapshot_lines"] = self.config.freshness.min_snapshot_lines
        # every part is asked at once: each answers when it reaches the question in its mailbox and what it has
        # persisted is durable, and a status waits for the slowest part instead of for the sum of them (at a
        # start, the router's answer waits for the commit of its start-up events: ~0.07 s)
        reply = self._ask_all(
            ib=IbStats(), router=RouterStatus(), queue=QueueStats(), worker=WorkerStatus(), positions=WriterStats()
        )
        try:
            ib = reply("ib")
            out["ib"] = {
                "connected": ib.connected,
                "state": str(ib.state),
                "requests_sent": ib.requests_sent,
                "lines_in_use": ib.lines_in_use,
            }
            out["peak_lines"] = ib.peak_lines
            out["snapshots_in_flight"] = ib.snapshots_in_flight
        except Exception as exc:  # noqa: BLE001 - status must answer even if a part does not
            out["ib"] = {"connected": False, "state": f"unknown ({exc!r})"}
        try:
            router = reply("router")
            # the line ledger's figures: the one count of lines (streams + open snapshots)
            out["lines_in_use"] = router.lines_in_use
            out["lines_free"] = router.lines_free
            out["line_limit"] = router.line_limit
            out["learned_line_limit"] = router.line_cap
            out["snapshot_lines"] = router.snapshot_lines
            out["streams"] = router.streams
            out["overflow"] = router.overflow
            out["active"] = router.active
            out["known_contracts"] = router.known
            out["stream_budget"] = router.budget
            out["freshness"] = {
                "monitoring_s": self.config.freshness.monitoring_s,
                "overflow_s": self.config.freshness.overflow_s,
                "ages": router.ages,
            }
        except Exception as exc:  # noqa: BLE001
            out["router_error"] = repr(exc)
        try:
            stats = reply("queue")
            out["queue"] = {"pending": stats.pending, "processing": stats.processing, "failed": stats.failed}
            out["dead_letters"] = stats.failed
        except Exception as exc:  # noqa: BLE001
            out["queue_error"] = repr(exc)
        try:
            worker = reply("worker")
            out["worker"] = msgspec.to_builtins(worker)
        except Exception as exc:  # noqa: BLE001
            out["worker_error"] = repr(exc)
        try:
            writer = reply("positions")
            out["positions_rows_written"] = writer.rows_written
        except Exception as exc:  # noqa: BLE001
            out["positions_error"] = repr(exc)
        now, seq = time.monotonic(), self.log.last_seq
        then, before = self._rate
        if now - then >= 1.0:
            self.events_per_s = (seq - before) / (now - then)
            self._rate = (now, seq)
        out["last_seq"] = seq
        out["durable_seq"] = self.log.durable_seq
        out["events_per_s"] = round(self.events_per_s, 1)
        out["log"] = {k: v for k, v in self.log.stats().items() if k in ("commits", "commit_ms_p50", "commit_ms_max", "failed")}
        return out

    def _ask_all(self, **commands: Any) -> Callable[[str], Any]:
        """Ask each actor named its command now; the call returned waits (5 s at most) for one's reply or raises its error."""
        pending: dict[str, ReplyFuture | Exception] = {}
        for name, command in commands.items():
            try:
                pending[name] = ask_async(self.refs[name], command)
            except Exception as exc:  # noqa: BLE001 - not started, or stopped: that part of the status says so
                pending[name] = exc

        def reply(name: str) -> Any:
            asked = pending[name]
            if isinstance(asked, Exception):
                raise asked
            return asked.get(timeout=5)

        return reply

    def status_line(self) -> str:
        s = self.status()
        q = s.get("queue", {})
        ages = s.get("freshness", {}).get("ages", {})

        def age(path: str) -> str:
            a = ages.get(path)
            if not a or not a.get("count"):
                return f"{path} -"
            never = f" ({a['never_priced']} unpriced)" if a.get("never_priced") else ""
            return f"{path} {a['count']} p50 {a['p50_s']:.1f}s max {a['max_s']:.1f}s{never}"

        limit = s.get("line_limit", s["max_lines"])
        learned = "" if s.get("learned_line_limit") is None else " known"
        return (
            f"lines {s.get('lines_in_use', '?')}/{limit}{learned} (streams {s.get('streams', '?')}, "
            f"snapshots {s.get('snapshot_lines', '?')}) | age {age('stream')}, {age('overflow')}, {age('queue')}"
            f" | queue pending {q.get('pending', '?')} failed {q.get('failed', '?')}"
            f" | rows {s.get('positions_rows_written', '?')} | events {s['last_seq']} ({s['events_per_s']}/s)"
            f" | IB {s['ib'].get('state')}"
        )

    def metrics_snapshot(self) -> dict[str, Any]:
        """The status, once the runtime has started (metrics are served from before the log opens)."""
        return self.status() if self.control is not None else {}

    def _handle_control(self, line: bytes) -> dict[str, Any]:
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            return _control_error("invalid", f"not JSON: {exc.msg} at column {exc.colno}")
        if not isinstance(raw, dict):
            return _control_error("invalid", "a request is a JSON object with a 'type'")
        if raw.get("type") in OPERATOR_REQUESTS:
            return answer_operator(raw, self.refs)
        if raw.get("type") == "status":
            if set(raw) - {"type"}:
                return _control_error("invalid", "status takes no fields", field=sorted(set(raw) - {"type"})[0])
            return {"ok": True, "reply": self.status()}
        try:
            command = decode_command(line)
        except CommandError as exc:
            return _control_error("invalid", str(exc), field=exc.field)
        if isinstance(command, _REGISTRY_COMMANDS):
            target = self.refs["registry"]
        elif isinstance(command, _QUEUE_COMMANDS):
            target = self.refs["queue"]
        else:
            return _control_error("forbidden", f"{raw.get('type')} is not accepted on the control socket")
        try:
            reply = ask(target, command, timeout=30)
        except CommandRejected as exc:
            r = exc.rejected
            return _control_error(r.code, r.message, field=r.field)
        except LogFailedError as exc:
            return _control_error("log_failed", str(exc))
        return {"ok": True, "reply": msgspec.to_builtins(reply)}


class BrokenLogError(RuntimeError):
    """``run`` refused to append to a log whose hash chain is broken."""


class StartRefused(RuntimeError):
    """``run`` cannot start for a reason the operator must fix; nothing was written."""


def _control_error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"ok": False, "error": error}


def _print_status(line: str) -> None:
    """A status line on stdout, if stdout can take it.

    stdout may sit on the same full disk that just stopped the log, or be a
    closed pipe; an informational line must never keep the runtime from
    stopping cleanly.
    """
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        pass


def run_runtime(config: Config, *, demo: bool, duration: float | None, allow_broken_log: bool) -> int:
    if demo and duration is None:
        duration = config.demo.default_duration_s or None
    runtime = Runtime(config, demo=demo, allow_broken_log=allow_broken_log)

    def on_signal(signum: int, _frame: Any) -> None:
        runtime.stop_reason = signal.Signals(signum).name
        runtime.stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runtime.start()
    except DataDirLocked as exc:
        logger.error("{}", exc)
        return EXIT_FAILED
    except (BrokenLogError, StartRefused, RecoveryError) as exc:
        logger.error("{}", exc)
        runtime.stop()
        return EXIT_FAILED
    except OSError as exc:  # the data directory went away or became unwritable between the checks and the open
        logger.error("the runtime cannot start: {}", exc)
        runtime.stop()
        return EXIT_FAILED
    except LogFailedError as exc:
        logger.error("the event log failed while starting: {}", exc)
        runtime.stop()
        return EXIT_LOG_FAILED
    except BaseException:  # noqa: BLE001 - whatever failed, the started actors must be stopped
        logger.exception("the runtime failed to start")
        runtime.stop()  # actor threads would otherwise keep the process alive
        return EXIT_FAILED
    try:
        runtime.run(duration, config.runtime.status_interval_s)
    finally:
        if demo:
            _print_status(runtime.status_line())
        runtime.stop()
    if runtime.log_failure is not None:
        logger.error(
            "stopped because the event log failed: {}. Everything acknowledged before is in the log; "
            "fix the storage and start again.",
            runtime.log_failure,
        )
        return EXIT_LOG_FAILED
    if runtime.actor_failure is not None:
        return EXIT_FAILED
    logger.info("stopped cleanly")
    return EXIT_OK


# ---------------------------------------------------------------------- client commands


def _call_runtime(data_dir: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    path = control_socket_path(data_dir)
    try:
        return request(path, payload)
    except ControlUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    except OSError as exc:  # e.g. a socket of another user's runtime
        print(f"error: the runtime's control socket {path} cannot be used: {exc.strerror or exc}", file=sys.stderr)
        return None


def cmd_registry(args: argparse.Namespace, config: Config) -> int:
    data_dir = config.runtime.data_dir
    if args.registry_command == "list":
        answer = _call_runtime(data_dir, {"type": "registry.list"})
        if answer is None:
            return EXIT_FAILED
        if not answer["ok"]:
            print(f"error: {answer['error']['message']}", file=sys.stderr)
            return EXIT_FAILED
        registry = answer["reply"]["registry"]
        if args.json:
            print(json.dumps(registry, sort_keys=True))
        else:
            for conid in sorted(registry, key=int):
                print(f"{conid:>12}  {', '.join(registry[conid])}")
            print(f"{len(registry)} active contracts")
        return EXIT_OK
    if args.registry_command == "add":
        items = [
            {
                "conid": c,
                "strategy": args.strategy,
                "source": "cli",
                "expected_quantity": args.expected_quantity,
                "priority": args.priority,
            }
            for c in args.conids
        ]
        payload: dict[str, Any] = {"type": "registry.add_active_many", "items": items}
    else:
        items = [{"conid": c, "strategy": args.strategy, "source": "cli"} for c in args.conids]
        payload = {"type": "registry.remove_active_many", "items": items}
    answer = _call_runtime(data_dir, payload)
    if answer is None:
        return EXIT_FAILED
    if not answer["ok"]:
        err = answer["error"]
        where = f" (field {err['field']})" if err.get("field") else ""
        print(f"error: {err['message']}{where}; nothing was changed", file=sys.stderr)
        return EXIT_FAILED
    for result in answer["reply"]["results"]:
        verb = "changed" if result["changed"] else "unchanged"
        state = "active" if result["active"] else "not active"
        detail = f" ({result['detail']})" if result.get("detail") else ""
        print(f"{result['conid']} {args.strategy}: {verb}, now {state}{detail}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    """Ask the running runtime (control socket) for its status; DESIGN.md section 5."""
    answer = _call_runtime(config.runtime.data_dir, {"type": "status"})
    if answer is None:
        return EXIT_FAILED
    if not answer["ok"]:
        print(f"error: {answer['error']['message']}", file=sys.stderr)
        return EXIT_FAILED
    status = answer["reply"]
    if args.json:
        print(json.dumps(status, sort_keys=True))
        return EXIT_OK
    q = status.get("queue", {})
    log = status.get("log", {})
    ib = status.get("ib", {})
    print(f"uptime          {status['uptime_s']} s ({status['mode']})")
    print(f"IB              {ib.get('state')}{'' if ib.get('connected') else ' (not connected)'}")
    learned = status.get("learned_line_limit")
    limit = f"{status.get('line_limit')} ({'known' if learned is not None else 'max_lines; not yet known'})"
    print(
        f"lines in use    {status.get('lines_in_use')} of {limit}: streams {status.get('streams')} "
        f"(at most {status.get('stream_budget')}), snapshots {status.get('snapshot_lines')}, free {status.get('lines_free')}"
    )
    print(f"active          {status.get('active')} (overflow waiting for a line: {status.get('overflow')})")
    fresh = status.get("freshness") or {}
    for path, a in sorted((fresh.get("ages") or {}).items()):
        if a.get("count"):
            unpriced = f", {a['never_priced']} never priced" if a.get("never_priced") else ""
            print(
                f"age {path:<11} {a['count']} contracts: p50 {a['p50_s']:.1f} s, p99 {a['p99_s']:.1f} s, "
                f"max {a['max_s']:.1f} s{unpriced}"
            )
    if fresh:
        print(f"targets         {fresh.get('monitoring_s'):g} s, overflow {fresh.get('overflow_s'):g} s")
    print(f"queue           pending {q.get('pending')}, processing {q.get('processing')}, failed {q.get('failed')}")
    print(f"dead letters    {status.get('dead_letters')}")
    print(f"positions       {status.get('positions_rows_written')} rows written")
    print(
        f"event log       last seq {status['last_seq']} (durable {status.get('durable_seq')}), "
        f"{status['events_per_s']} events/s, commit p50 {_ms(log.get('commit_ms_p50'))}, max {_ms(log.get('commit_ms_max'))}"
    )
    problems = {k: v for k, v in status.items() if k.endswith("_error")}
    for name, error in sorted(problems.items()):
        print(f"unanswered      {name.removesuffix('_error')}: {error}")
    return EXIT_OK


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _events_table_missing(data_dir: str) -> bool:
    """True (and says so) when ``data_dir`` has no event log: a mistyped --data-dir must not read as empty."""
    from storage.reader import table_exists

    uri = table_uri(data_dir, "events")
    if table_exists(uri):
        return False
    print(f"error: no event log at {uri}", file=sys.stderr)
    return True


def _unreadable(exc: BaseException, data_dir: str) -> int:
    if (store := store_error(data_dir, exc)) is not None:  # the object store went away after the start-up check
        print(f"error: {store}", file=sys.stderr)
        return EXIT_FAILED
    print(f"error: the event log cannot be read: {error_line(exc)}. Run 'python runtime.py verify' for the first bad seq.", file=sys.stderr)
    return EXIT_FAILED


def _stdout_closed() -> int:
    """The reader of our output went away (``| head``): not an error, and no traceback at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    """Rebuild registry and queue from the log as of now, ``--seq N`` or ``--as-of TIME``."""
    from storage.reader import to_utc
    from storage.replay import ReplayError, replay

    data_dir = config.runtime.data_dir
    try:
        as_of = to_utc(args.as_of) if args.as_of is not None else None
    except ValueError as exc:
        print(f"error: --as-of {args.as_of!r} is not an ISO-8601 time: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if _events_table_missing(data_dir):
        return EXIT_FAILED
    try:
        result = replay(data_dir, seq=args.seq, as_of=as_of)
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a damaged file surfaces as Arrow, OS or decode errors alike
        return _unreadable(exc, data_dir)
    data = result.to_json(items=True)
    try:
        if args.json:
            print(json.dumps(data, sort_keys=True))
            return EXIT_OK
        q = data["queue"]
        print(f"state after seq {data['seq']} ({data['ts'] or 'no event at or before that point'})")
        print(f"registry: {len(data['registry'])} active contracts")
        for conid in sorted(data["registry"], key=int)[:50]:
            print(f"  {conid:>12}  {', '.join(data['registry'][conid])}")
        if len(data["registry"]) > 50:
            print(f"  ... and {len(data['registry']) - 50} more (use --json)")
        print(f"queue: pending {q['pending']}, processing {q['processing']}, failed {q['failed']}")
        if q["processing"]:
            print("  (processing: claimed by the worker at that seq; a restart or an expired lease returns them)")
        failed = [i for i in q["items"] if i["status"] == "FAILED"]
        for item in failed[:20]:
            code = f" (IB {item['code']})" if item.get("code") is not None else ""
            print(f"  dead letter {item['conid']} item {item['item_id']}: failed {item['failures']} times, last: {item['last_error']}{code}")
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more dead letters (use --json)")
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    return EXIT_OK


def cmd_audit(args: argparse.Namespace, config: Config) -> int:
    """Print the timeline; filters go into the Delta scan (storage.reader.read_batches)."""
    from storage.audit import NoEventLog, audit_events, write_audit

    try:
        events = audit_events(config.runtime.data_dir, conid=args.conid, types=args.types, since=args.since, until=args.until)
    except NoEventLog as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        write_audit(events, args.format, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    except Exception as exc:  # noqa: BLE001 - a damaged file surfaces as Arrow, OS or decode errors alike
        return _unreadable(exc, config.runtime.data_dir)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    """Seq continuity, hash chain, payloads, snapshots, signed checkpoints; exit 0 intact, 1 naming the first bad seq."""
    from storage.attest import DigestError, check_checkpoints, load_digest, verify_digest
    from storage.verify import verify_data_dir

    data_dir = config.runtime.data_dir
    if args.digest is not None:
        try:
            digest = load_digest(args.digest)
        except DigestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if _events_table_missing(data_dir):
            return EXIT_FAILED
        proof = verify_digest(data_dir, digest)
        if not proof.ok:
            where = "" if proof.first_bad_seq is None else f" at seq {proof.first_bad_seq}"
            print(f"BROKEN{where}: {proof.problem}")
            return EXIT_FAILED
        print(
            f"ok: the log holds the digest's head, seq {digest.seq} (hash {digest.hash[:16]}..., signed {digest.time} "
            f"by key {digest.key_fingerprint[:16]}...); {_count(proof.checkpoints, 'signed checkpoint')} up to it agree; "
            f"hash chain intact through seq {proof.last_seq}"
        )
        return EXIT_OK
    if _events_table_missing(data_dir):
        return EXIT_FAILED
    trusted = _cli_trusted_keys(config, data_dir)
    if trusted is None:
        return EXIT_FAILED
    report = verify_data_dir(data_dir)
    signed = check_checkpoints(data_dir, trusted)
    # a rewrite with a recomputed chain shows first in the checkpoints: name whichever seq comes first
    if not signed.ok and (report.ok or (signed.first_bad_seq or 0) < (report.first_bad_seq or 0)):
        report.ok, report.first_bad_seq, report.problem = False, signed.first_bad_seq, signed.problem
    if report.ok:
        checkpoints = f"; {_count(signed.checkpoints, 'signed checkpoint')} verified" if signed.checkpoints else ""
        print(f"ok: {report.events} events, seq 1..{report.last_seq}, hash chain intact, every payload decodes{report.detail}{checkpoints}")
        return EXIT_OK
    print(f"BROKEN{'' if report.first_bad_seq is None else f' at seq {report.first_bad_seq}'}: {report.problem}")
    return EXIT_FAILED


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cmd_digest(args: argparse.Namespace, config: Config) -> int:
    """Print the newest signed head as one JSON object: what an auditor stores outside the data directory."""
    from storage.attest import digest_of

    data_dir = config.runtime.data_dir
    if _events_table_missing(data_dir):
        return EXIT_FAILED
    trusted = _cli_trusted_keys(config, data_dir)
    if trusted is None:
        return EXIT_FAILED
    try:
        newest = CheckpointStore(data_dir).newest()
    except CheckpointsUnreadable as exc:
        print(f"error: {exc}; run 'python runtime.py verify'", file=sys.stderr)
        return EXIT_FAILED
    if newest is None:
        print(f"error: no signed checkpoint in {data_dir} yet (one is written every [audit] checkpoint_every events and at every clean stop)", file=sys.stderr)
        return EXIT_FAILED
    if not newest.signature_valid() or newest.statement.public_key not in trusted:
        print(f"error: the newest checkpoint (seq {newest.seq}) is not validly signed by a trusted key; run 'python runtime.py verify'", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(msgspec.to_builtins(digest_of(newest))))
    return EXIT_OK


def _cli_trusted_keys(config: Config, data_dir: str) -> set[str] | None:
    """The public keys checkpoints may be signed with; None (after saying why) when the key is needed and unusable."""
    try:
        return trusted_keys(config, audit_signer(config, create=False))
    except SigningKeyError as exc:
        if not CheckpointStore(data_dir).exists():
            return set(config.audit.trusted_keys)  # nothing signed yet: nothing to check the key against
        print(f"error: {exc}; it is needed to check the signed checkpoints", file=sys.stderr)
        return None


def audit_signer(config: Config, *, create: bool) -> Signer | None:
    """The [audit] signing key (created first if ``create`` and it is missing), or None when signing is off."""
    if not config.audit.sign:
        return None
    return load_signer(resolve_key_path(config.audit.signing_key), create=create)


def trusted_keys(config: Config, signer: Signer | None) -> set[str]:
    """This installation's public key and the retired ones of [audit] trusted_keys."""
    keys = set(config.audit.trusted_keys)
    if signer is not None:
        keys.add(signer.public_key)
    return keys


def main(argv: list[str] | None = None) -> int:
    set_private_umask()  # before any thread: data files 0600, directories 0700 (storage/permissions.py)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = resolve_config(args)
        level = _log_level(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    export_storage_settings(config.storage)  # [storage] -> AWS_*, for every table this process opens
    # refused before anything is opened: a mistake must leave the data directory as it was
    problem = data_dir_problem(config.runtime.data_dir, write=args.command == "run")
    if problem is None and (store := _tables_location(args, config)) is not None:
        problem = reach_problem(store)  # s3:// only: credentials, region, endpoint, bucket
    if problem is None and args.command == "run" and config.metrics.enabled:
        problem = port_problem(config.metrics.host, config.metrics.port)
    if problem is None and args.command == "run" and args.log_file:
        problem = log_file_problem(args.log_file)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_FAILED
    configure_logging(level, getattr(args, "log_file", None))
    if args.command == "run":
        return run_runtime(config, demo=args.demo, duration=args.duration, allow_broken_log=args.allow_broken_log)
    handler = {"registry": cmd_registry, "status": cmd_status, "replay": cmd_replay, "audit": cmd_audit, "verify": cmd_verify, "digest": cmd_digest}
    handler.update(contracts=lambda a, c: cmd_contracts(a, c, _call_runtime), queue=lambda a, c: cmd_queue(a, c, _call_runtime))
    handler.update(fleet=cmd_fleet)
    handler["what-if"] = _cmd_what_if
    try:
        return handler[args.command](args, config)
    except BrokenPipeError:  # `... | head` closed our stdout: the reader has what it wanted
        return _stdout_closed()


def _tables_location(args: argparse.Namespace, config: Config) -> str | None:
    """The data dir (or fleet root) whose tables this command opens; None for the socket clients."""
    if args.command == "fleet":
        return args.root
    if args.command in ("run", "replay", "audit", "verify", "digest", "what-if") or getattr(args, "offline", False):
        return config.runtime.data_dir
    return None


def _cmd_what_if(args: argparse.Namespace, config: Config) -> int:
    from actors.what_if_cli import cmd_what_if

    return cmd_what_if(args, config)


def _log_level(args: argparse.Namespace) -> str:
    """``--log-level``, else ``$SLOTWISE_LOG_LEVEL``, else INFO for ``run`` and WARNING for the client commands."""
    if getattr(args, "log_level", None):
        return args.log_level
    env = os.environ.get("SLOTWISE_LOG_LEVEL")
    if env is None:
        return "INFO" if args.command == "run" else "WARNING"
    try:
        return log_level(env)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"environment variable SLOTWISE_LOG_LEVEL: {exc}") from None


def _exit(code: int) -> None:
    """Leave without running interpreter teardown.

    Every command has finished its work by here (the run command has closed
    the log: everything is durable). Arrow's and delta-rs's native thread
    pools can still be winding down, and tearing the interpreter down under
    them aborts the process now and then ("terminate called without an active
    exception", SIGABRT) -- which would turn a clean exit 0 into a crash. So
    flush what we printed and exit directly.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a full disk: nothing more can be said there
            pass
    logging.shutdown()
    os._exit(code)


def _main_or_fail() -> int:
    """``main()``, with anything that escapes it turned into exit 1.

    An exception leaving ``main`` would otherwise end in interpreter
    shutdown, which waits forever for the actors' (non-daemon) threads: the
    runtime would hang instead of exiting. Everything acknowledged is already
    durable, so leaving through :func:`_exit` loses nothing.
    """
    try:
        return main()
    except SystemExit as exc:  # argparse's --help and usage errors, sys.exit()
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        with contextlib.suppress(Exception):
            print(exc.code, file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C in a client command (run has its own handler: a graceful stop)
        with contextlib.suppress(Exception):
            print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException:  # noqa: BLE001 - the last line of defence; the traceback goes to stderr if it can
        with contextlib.suppress(Exception):
            traceback.print_exc()
        return EXIT_FAILED


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C is main()'s KeyboardInterrupt
    _exit(_main_or_fail())
