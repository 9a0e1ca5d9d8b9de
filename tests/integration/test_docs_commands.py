"""Every command README.md and docs/ show, run against a demo, so the pages cannot drift from the code.

The commands are read from the pages' shell blocks (``sh``/``console``
blocks, and ``$ ``-prompted lines elsewhere) and run in page order through a
shell, from a directory that looks like the checkout (``runtime.py`` and the
packages linked in) with a running default demo in ``./data``. Every data
directory a page names is that demo, except for ``--demo`` runs, which each
get a fresh directory of their own (and at most a second of ``--duration``).
Commands that differ only in their numbers (another conid, another time)
run once. A command must exit 0 without a traceback: the pages' outputs (including
the failures they provoke by tampering first) are not compared, only that
each command, as printed, still works.

A few commands cannot run here; each is listed in ``NOT_HERE`` with the
reason, and that list is checked against the pages too, so it cannot rot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from actors.config import ConfigError, load_config
from actors.fake_ib_demo import demo_positions
from tests.integration.test_end_to_end import ROOT, cli, wait_for

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Commands that need what this machine does not have: pattern -> why.
NOT_HERE = {
    r"^python3 -m venv ": "set-up: the environment this test runs in",
    r"runtime\.py --config slotwise\.toml": "runs against a real TWS / IB Gateway",
    r"runtime\.py --ib-host ": "runs against a real IB Gateway",
    r"^python demo_with_faults\.py": "a script the page defines inline, with faults injected into the demo",
    r"(--data-dir|--root) s3://": "object storage: tests/s3 runs these against a loopback S3 server",
}
#: Commands that need the runtime stopped (the page says so): run after the demo ends.
AFTER_STOP = (r"optimize\.compact",)
#: Only these programs are run; other shell lines in the pages (cat, rm, cp, echo) show or tamper.
RUNNABLE = re.compile(r"^(python3? |\.venv/bin/python |cp slotwise\.example\.toml )")
DEMO_CONIDS = {p.conid for p in demo_positions(240, 60, 7)}


def page_commands() -> list[tuple[str, int, str]]:
    """(page, line number, command) for every shell command shown, in page order."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)\s*$", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            block = lines[i + 1 : end]
            prompted = any(line.startswith("$ ") for line in block)
            if fence.group(1) in ("sh", "bash", "console", "") and (prompted or fence.group(1) in ("sh", "bash")):
                k = 0
                while k < len(block):
                    line, number = block[k], i + 2 + k
                    if prompted and not line.startswith("$ "):
                        k += 1
                        continue
                    command = line.removeprefix("$ ")
                    while command.endswith("\\") and k + 1 < len(block):
                        k += 1
                        command = command[:-1] + " " + block[k].strip()
                    if command.strip() and not command.lstrip().startswith("#"):
                        found.append((page.relative_to(ROOT).as_posix(), number, command.strip()))
                    k += 1
            i = end + 1
    return found


def _reason_not_here(command: str) -> str | None:
    return next((why for pattern, why in NOT_HERE.items() if re.search(pattern, command)), None)


class Demo:
    """The default demo, running on ``<root>/data`` from a directory that looks like the checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
        env["SLOTWISE_AUDIT_CHECKPOINT_EVERY"] = "100"  # the pages' `digest` needs a signed checkpoint soon
        with open(root / "demo.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "runtime.py", "--demo", "--duration", "0"], cwd=root, stdout=subprocess.DEVNULL, stderr=err, env=env
            )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    root = tmp_path_factory.mktemp("docs")
    for name in ("runtime.py", "actors", "events", "storage", "benchmarks", "slotwise.example.toml", "pyproject.toml"):
        (root / name).symlink_to(ROOT / name)
    (root / "auditor").mkdir()
    running = Demo(root)
    try:
        wait_for(lambda: _connected(root, running.proc), 60, "the demo to connect")
        yield running
    finally:
        running.stop()


def _connected(root: Path, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, (root / "demo.stderr").read_text()
    result = cli("status", "--json", "--data-dir", str(root / "data"))
    return result.returncode == 0 and json.loads(result.stdout)["ib"]["connected"]


def _localise(command: str, root: Path, scratch: dict[str, Path]) -> str:
    """The page's command, pointed at this test's directories and interpreter."""
    command = re.sub(r"^(\.venv/bin/python|python3?) ", f"{sys.executable} ", command)
    demo_run = "--demo" in command.split()

    def data_dir(match: re.Match[str]) -> str:
        if not demo_run:
            return f"--data-dir {root / 'data'}"
        return f"--data-dir {scratch.setdefault(match.group(1), root / f'scratch-{len(scratch)}')}"

    command = re.sub(r"--data-dir (\S+)", data_dir, command)
    # at most a second each; 0 ("until stopped") too, and the demo's default 60 s
    command = re.sub(r"--duration (\d+(\.\d+)?)", lambda m: f"--duration {min(float(m.group(1)) or 1.0, 1.0):g}", command)
    if demo_run and "--duration" not in command:
        command += " --duration 1"
    if demo_run and "--data-dir" not in command:
        command += f" --data-dir {scratch.setdefault(f'unnamed-{len(scratch)}', root / f'scratch-{len(scratch)}')}"
    # a period shown as a day of its own (the day the page was written): the day the demo recorded, today (UTC)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    command = re.sub(r"(--(?:since|until) )\d{4}-\d{2}-\d{2}T", lambda m: f"{m.group(1)}{today}T", command)
    return command.replace("/tmp/auditor/", f"{root / 'auditor'}/")


def test_the_pages_show_commands_and_every_exception_still_matches_one() -> None:
    commands = [c for _, _, c in page_commands()]
    assert any("runtime.py contracts" in c for c in commands)
    for pattern in NOT_HERE:
        assert any(re.search(pattern, c) for c in commands), f"NOT_HERE {pattern!r} matches no command any more"


def test_registry_commands_use_contracts_the_demo_knows() -> None:
    """A newcomer types them against the demo: an unknown conid would be refused by IB and dead-lettered."""
    for page, line, command in page_commands():
        match = re.search(r"runtime\.py registry (add|remove) ((?:\d+ )+)", command + " ")
        if match:
            conids = {int(c) for c in match.group(2).split()}
            assert conids <= DEMO_CONIDS, f"{page}:{line}: {sorted(conids - DEMO_CONIDS)} are not in the demo account"


@pytest.mark.timeout(400)
def test_every_command_shown_runs(demo: Demo) -> None:
    root = demo.root
    scratch: dict[str, Path] = {}
    later: list[tuple[str, int, str]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    failures = []

    def run(page: str, line: int, command: str, local: str) -> None:
        result = subprocess.run(local, shell=True, cwd=root, capture_output=True, text=True, timeout=120, env=env, check=False)
        if result.returncode != 0 or "Traceback" in result.stderr:
            failures.append(f"{page}:{line}: {command}\n  -> exit {result.returncode}: {result.stderr.strip()[-500:]}")

    def run_chain(chain: list[tuple[str, int, str, str]]) -> None:
        for page, line, command, local in chain:
            run(page, line, command, local)

    # two at a time (most of each command is interpreter start-up); a command that reads a file an
    # earlier one wrote (`> digest.json`) joins that one's chain, which keeps page order
    chains: list[list[tuple[str, int, str, str]]] = []
    writers: dict[str, list[tuple[str, int, str, str]]] = {}
    ran = 0
    shapes: set[str] = set()
    for page, line, command in page_commands():
        if _reason_not_here(command) or not RUNNABLE.match(command):
            continue
        # the same command for another contract, time or directory adds nothing but seconds
        shape = re.sub(r"\d+(\.\d+)?", "N", re.sub(r"--data-dir \S+", "--data-dir D", command))
        if shape in shapes:
            continue
        shapes.add(shape)
        if any(re.search(p, command) for p in AFTER_STOP):
            later.append((page, line, command))
            continue
        item = (page, line, command, _localise(command, root, scratch))  # in page order: each directory's place
        chain = next((c for name, c in writers.items() if name in command), None)
        if chain is None:
            chain = []
            chains.append(chain)
        chain.append(item)
        for written in re.findall(r">\s*(\S+)", command):
            writers[written] = chain
        ran += 1
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run_chain, chains))
    assert demo.proc.poll() is None, "the demo must still run after every command"
    assert demo.stop() == 0
    for page, line, command in later:
        run(page, line, command, _localise(command, root, scratch))
        ran += 1
    assert ran >= 15
    assert not failures, "\n".join(failures)


def test_every_toml_block_shown_is_a_valid_config(tmp_path: Path) -> None:
    """``toml`` blocks, and what ``$ cat X.toml`` prints in a transcript, load as a config."""
    blocks = [
        (page, block)
        for page in PAGES
        for pattern in (r"^```toml\n(.*?)^```", r"^\$ cat \S+\.toml\n(.*?)^(?:\$ |```)")
        for block in re.findall(pattern, page.read_text(), flags=re.MULTILINE | re.DOTALL)
    ]
    assert blocks
    for n, (page, block) in enumerate(blocks):
        path = tmp_path / f"{n}.toml"
        path.write_text(block)
        try:
            load_config(path, environ={})
        except ConfigError as exc:
            pytest.fail(f"{page.relative_to(ROOT)}: a config block is refused: {exc}")
