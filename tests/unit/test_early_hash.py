"""Hashing the data files before the imports (storage/early_hash.py): which starts do it, and what it yields."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage.early_hash import EarlyHashes, measure_local, start_for_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def signed_dir(tmp_path: Path) -> Path:
    """A data directory shaped like a signed log: events with data files, and a checkpoints table."""
    data = tmp_path / "data"
    (data / "events" / "_delta_log").mkdir(parents=True)
    (data / "checkpoints").mkdir()
    for i in range(5):
        (data / "events" / f"part-{i}.parquet").write_bytes(os.urandom(1000 + i))
    (data / "events" / "_delta_log" / "00000000000000000000.json").write_text("{}")
    return data


def test_the_files_are_hashed_as_the_start_up_check_hashes_them(signed_dir: Path) -> None:
    early = start_for_run(str(signed_dir), None, {})
    assert early is not None
    taken = early.take(["part-1.parquet", "part-3.parquet"])
    assert set(taken) == {"part-1.parquet", "part-3.parquet"}
    for name, future in taken.items():
        raw = (signed_dir / "events" / name).read_bytes()
        assert future.result(timeout=10) == (len(raw), hashlib.sha256(raw).hexdigest())
        assert future.result() == measure_local(signed_dir / "events" / name)


def test_files_the_checkpoint_does_not_list_are_not_hashed_once_it_is_known(tmp_path: Path) -> None:
    events = tmp_path / "events"
    events.mkdir()
    for i in range(50):
        (events / f"part-{i:02d}.parquet").write_bytes(os.urandom(200_000 + i))
    early = EarlyHashes(events, workers=1)
    early.take(["part-49.parquet"])  # the largest, begun first
    unwanted = [future for name, future in early._futures.items() if name != "part-49.parquet"]
    assert sum(future.cancelled() for future in unwanted) >= len(unwanted) - 2  # all but those already begun
    assert early._futures["part-49.parquet"].result(timeout=10)[0] == 200_049
    assert early._futures["part-00.parquet"].cancelled()  # the smallest, queued last


@pytest.mark.parametrize(
    ("environ", "config_flag"),
    [
        ({"SLOTWISE_AUDIT_SIGN": "false"}, None),  # an unsigned start checks the whole chain, not files
        ({"SLOTWISE_RUNTIME_VERIFY_ON_START": "false"}, None),
        ({}, "slotwise.toml"),  # the config file may name another data directory: not guessed
    ],
)
def test_starts_that_check_no_signed_files_or_whose_data_dir_is_not_yet_known_hash_nothing(
    signed_dir: Path, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], config_flag: str | None
) -> None:
    monkeypatch.chdir(signed_dir.parent)  # ./data is this directory
    flag = None if config_flag else str(signed_dir)
    assert start_for_run(flag, config_flag, environ) is None


def test_the_data_dir_comes_from_the_flag_the_environment_or_the_default(signed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(signed_dir.parent)
    for early in (
        start_for_run(None, None, {}),
        start_for_run(None, None, {"SLOTWISE_DATA_DIR": str(signed_dir)}),
        start_for_run(f"file://{signed_dir}", None, {}),
    ):
        assert early is not None
        assert early.serves(signed_dir / "events")
        assert early.serves(f"file://{signed_dir}/events")
        assert not early.serves(signed_dir.parent / "other" / "events")
    assert start_for_run("s3://bucket/data", None, {}) is None
    assert start_for_run(str(signed_dir.parent / "empty"), None, {}) is None  # no signed log there


def test_runtime_run_begins_hashing_before_its_imports(signed_dir: Path) -> None:
    """The point of the module: it runs with the standard library alone, ahead of pyarrow and deltalake."""
    probe = (
        "import sys, runpy; sys.argv = ['runtime.py', 'run', '--data-dir', sys.argv[1]]\n"
        "import storage.early_hash as e\n"
        "real = e.start_for_run\n"
        "def spy(*a):\n"
        "    print('early', 'pyarrow' in sys.modules, 'deltalake' in sys.modules, real(*a) is not None, flush=True)\n"
        "    raise SystemExit(0)\n"
        "e.start_for_run = spy\n"
        "runpy.run_path('runtime.py', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    out = subprocess.run(
        [sys.executable, "-c", probe, str(signed_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert out.stdout.strip() == "early False False True", out.stderr[-2000:]
