"""An ``s3://`` data dir that cannot be used is one line, exit 1, nothing written, in seconds.

Missing credentials, a missing region, an endpoint nothing listens on, a
bucket that does not exist, a plain-http endpoint without ``AWS_ALLOW_HTTP``:
each command that opens tables runs as a subprocess with a clean ``AWS_*``
environment (and ``RUST_LOG`` unset, as a user has it), against the loopback
S3 server where there is one. delta-rs's own answer was a page of Rust
``aws_config`` WARN lines and a traceback ("OSError: Operation not
supported"), after up to three minutes of retries for an unreachable endpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from storage.object_store import configuration_problem, store_error
from tests.integration.test_bad_inputs import assert_refused
from tests.support.s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

ROOT = Path(__file__).resolve().parents[2]

#: Every command that opens the tables of a data dir (``{d}``) or a fleet root.
COMMANDS = {
    "run": ["run", "--demo", "--duration", "5", "--data-dir", "{d}"],
    "verify": ["verify", "--data-dir", "{d}"],
    "replay": ["replay", "--data-dir", "{d}"],
    "audit": ["audit", "--data-dir", "{d}"],
    "digest": ["digest", "--data-dir", "{d}"],
    "contracts-offline": ["contracts", "--offline", "--data-dir", "{d}"],
    "dead-letters-offline": ["queue", "dead-letters", "--offline", "--data-dir", "{d}"],
    "what-if": ["what-if", "--data-dir", "{d}"],
    "fleet": ["fleet", "--root", "{d}"],
}


def _run(args: list[str], data_dir: str, env: dict[str, str], home: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """``runtime.py`` with only ``env``'s ``AWS_*`` variables, no RUST_LOG, and an empty home (no ~/.aws)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SLOTWISE_")) and k != "RUST_LOG"}
    clean.update(HOME=str(home), AWS_EC2_METADATA_DISABLED="true", **env)  # an instance role, if any, is not ours
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "runtime.py", *(a.format(d=data_dir) for a in args)],
        cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return result, time.monotonic() - started


def _objects(server: S3Server, bucket: str) -> list[str]:
    client = boto3.client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name=REGION,
    )  # fmt: skip
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket.removeprefix("s3://")).get("Contents", [])]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on, for the whole test.

    The socket stays bound and never listens: a connect is refused, and no other process (another test's
    server, another run on the machine) can take the port between this fixture and the command's connect.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_no_credentials_is_one_line(command: list[str], bucket: str, s3_server: S3Server, tmp_path: Path) -> None:
    env = {k: v for k, v in s3_server.env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    result, _ = _run(command, f"{bucket}/acct", env, tmp_path)
    assert_refused(result, 1, f"{bucket}/acct", "no AWS credentials", "AWS_ACCESS_KEY_ID", "[storage]")
    assert _objects(s3_server, bucket) == []


def test_no_credentials_and_no_endpoint_is_one_line(tmp_path: Path) -> None:
    """The reported case: AWS itself, nothing configured (delta-rs went to IMDS, warned, and failed)."""
    result, _ = _run(COMMANDS["verify"], "s3://nobucket/acct", {"AWS_REGION": REGION}, tmp_path)
    assert_refused(result, 1, "error: s3://nobucket/acct: no AWS credentials (set AWS_ACCESS_KEY_ID")


def test_no_region_for_aws_itself_is_one_line(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    result, _ = _run(COMMANDS["replay"], "s3://nobucket/acct", env, tmp_path)
    assert_refused(result, 1, "s3://nobucket/acct", "no AWS region", "AWS_REGION")


@pytest.mark.parametrize("command", ["run", "verify", "fleet"])
def test_an_endpoint_nothing_listens_on_is_one_line_within_seconds(
    command: str, s3_server: S3Server, closed_port: int, tmp_path: Path
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    result, elapsed = _run(COMMANDS[command], "s3://bucket/acct", {**s3_server.env(), "AWS_ENDPOINT_URL": endpoint}, tmp_path)
    assert_refused(result, 1, "s3://bucket/acct", f"cannot reach the object store at {endpoint}", "connection refused")
    assert elapsed < 30, f"took {elapsed:.1f} s (delta-rs alone retries for up to 3 minutes)"


@pytest.mark.parametrize("command", ["run", "audit", "fleet"])
def test_a_missing_bucket_is_one_line(command: str, s3_server: S3Server, tmp_path: Path) -> None:
    result, _ = _run(COMMANDS[command], "s3://no-such-bucket/acct", s3_server.env(), tmp_path)
    assert_refused(result, 1, "s3://no-such-bucket/acct", "bucket 'no-such-bucket' does not exist", s3_server.endpoint)


def test_a_plain_http_endpoint_without_allow_http_is_one_line(bucket: str, s3_server: S3Server, tmp_path: Path) -> None:
    env = {k: v for k, v in s3_server.env().items() if k != "AWS_ALLOW_HTTP"}
    result, _ = _run(COMMANDS["run"], f"{bucket}/acct", env, tmp_path)
    assert_refused(result, 1, "plain http", "AWS_ALLOW_HTTP")
    assert _objects(s3_server, bucket) == []


def test_a_usable_bucket_is_not_refused(bucket: str, s3_server: S3Server, tmp_path: Path) -> None:
    """The checks refuse only what fails: an empty prefix of a good bucket is 'no event log', as before."""
    result, _ = _run(COMMANDS["verify"], f"{bucket}/acct", s3_server.env(), tmp_path)
    assert_refused(result, 1, f"no event log at {bucket}/acct/events")


# ---------------------------------------------------------------------- the offline check, without a server


def test_credentials_may_come_from_a_profile_a_shared_file_or_an_ec2_role(tmp_path: Path) -> None:
    uri, region = "s3://b/acct", {"AWS_REGION": "eu-west-1"}
    assert configuration_problem(uri, {**region, "HOME": str(tmp_path)}, root=tmp_path) is not None
    assert configuration_problem(uri, {**region, "HOME": str(tmp_path), "AWS_PROFILE": "trading"}, root=tmp_path) is None
    assert configuration_problem(uri, {**region, "HOME": str(tmp_path), "AWS_WEB_IDENTITY_TOKEN_FILE": "/t"}, root=tmp_path) is None
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\n")
    assert configuration_problem(uri, {"HOME": str(tmp_path)}, root=tmp_path) is None  # the region may be in it too
    (tmp_path / ".aws" / "credentials").unlink()
    (tmp_path / "sys" / "class" / "dmi" / "id").mkdir(parents=True)
    (tmp_path / "sys" / "class" / "dmi" / "id" / "sys_vendor").write_text("Amazon EC2\n")
    assert configuration_problem(uri, {"HOME": str(tmp_path)}, root=tmp_path) is None
    assert configuration_problem(uri, {"HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true"}, root=tmp_path) is not None


def test_local_and_other_uris_are_left_alone(tmp_path: Path) -> None:
    assert configuration_problem(str(tmp_path), {}) is None
    assert configuration_problem("az://container/acct", {}) is None
    assert store_error(str(tmp_path), OSError("Operation not supported")) is None
