"""A real `mlflow server` for tests: SQLite backend, file:// artifacts, a free port on 127.0.0.1.

The server does not proxy artifacts (`--no-serve-artifacts`): clients read and write the artifact
folder directly, as the project's own server does (see params.yaml, mlflow.artifact_root).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixer.stack import answers_ok

# A cold start imports mlflow and migrates a fresh SQLite database: ~15 s on an idle 2-core box,
# ~50 s on a busy one.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0

# Clients in tests fail fast instead of retrying a dead server for minutes (the default is 7 retries
# with backoff and a 120 s timeout per request).
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it; a tiny race with other starters remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(tmp: Path, port: int) -> list[str]:
    artifacts = tmp / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    return [str(Path(sys.executable).parent / "mlflow"), "server",
            "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--default-artifact-root", artifacts.as_uri(),
            "--no-serve-artifacts", "--workers", "1"]


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path,
                 timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll GET `url` (a health endpoint) until it answers 200; fail early, with the log, if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[1]} exited with {process.returncode}:\n{_tail(log)}")
        if answers_ok(url):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s:\n{_tail(log)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it starts workers), then SIGKILL whatever is left of it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        process.wait()
        return
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # a worker that outlived the leader, or a hung leader
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def running_server(tmp: Path) -> Iterator[str]:
    """Serve `tmp`/mlflow.db and `tmp`/artifacts; yield the http:// URI; stop the server on any exit."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    with log.open("wb") as out:
        # A session of its own: the group id is the server's pid, so stop() reaches its workers too.
        process = subprocess.Popen(server_command(tmp, port), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=tmp, start_new_session=True)
    try:
        wait_healthy(f"{uri}/health", process, log)
        yield uri
    finally:
        stop(process)


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"
