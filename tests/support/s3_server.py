"""A real S3 API server on loopback: moto's server mode, one request at a time.

Object storage is tested against an S3 server speaking HTTP, never a mock of
the client (DESIGN.md section 6): delta-rs's own S3 client talks to it.

moto answers a conditional put (``If-None-Match: *``, which delta-rs 1.6
uses for every commit) by checking for the key and then writing it, two steps
under no lock. Two racing commits could both succeed there and a lost commit
would look like our bug; real S3 decides atomically. Serialising the WSGI
app's requests gives moto S3's atomicity, so a lost commit can only be ours.

Used by the tests (a session-scoped fixture) and by
``benchmarks/event_log.py --s3-server``. Start with :meth:`S3Server.start`;
:meth:`S3Server.env` is what a client needs in its environment.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["S3Server", "serve"]

ROOT = Path(__file__).resolve().parents[2]

#: moto accepts any credentials; these only have to be present and the same everywhere.
ACCESS_KEY = "slotwise-test"
SECRET_KEY = "slotwise-test-secret"
REGION = "us-east-1"


class _Serialised:
    """A WSGI app that runs one request at a time (body included, as moto reads it inside the call)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()
        self.requests = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self._lock:
            self.requests += 1
            # materialise the response under the lock: a lazy iterable would finish the work after release
            return list(self._app(environ, start_response))


def serve(port: int = 0) -> None:
    """Run the serialised moto S3 server on ``127.0.0.1:port``; print the port, serve until killed.

    This runs in a process of its own: delta-rs holds the GIL through some
    blocking calls (``DeltaTable.is_deltatable`` does), so a server thread in
    the client's process would never get to answer them.
    """
    from moto.server import MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Quiet(MotoRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    # moto's S3 app alone: no per-request guessing of the service (a third of each request's time)
    app = _Serialised(create_backend_app("s3"))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=Quiet)
    print(server.server_port, flush=True)
    server.serve_forever()


class S3Server:
    """moto's S3 on ``127.0.0.1:<free port>``, in a child process."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self, timeout: float = 60.0) -> S3Server:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.s3_server"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the moto S3 server did not start (said {line!r})")
        self.port = int(line)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()

    @property
    def endpoint(self) -> str:
        assert self.port, "start() first"
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard ``AWS_*`` variables delta-rs (and boto3, DuckDB, Polars) read."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` through boto3 (moto's own dependency); returns ``s3://name``."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
