"""`mixer stack up|down|status`: the local orchestration stack as background processes.

- a Prefect server on 127.0.0.1 (SQLite database in the stack folder),
- a process work pool and one worker polling it (it runs the deployments of prefect.yaml),
- the MLflow server over the project's store (`mixer server`).

Each runs in a session of its own (so `down` stops its children too), logs to `<folder>/<name>.log`
and is recorded in `<folder>/pids.json`; `up` waits for every health check before returning.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from mixer.config import Config

STACK_DIR = ".stack"
PIDS_FILE = "pids.json"
POOL = "mixer-pool"
HOST = "127.0.0.1"  # loopback only: none of these servers authenticates its callers
# Cold starts on a busy 2-core machine: the Prefect server migrates its database (~10 s), the MLflow
# server imports mlflow and migrates a fresh SQLite store (up to ~50 s).
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0
_BIN = Path(sys.executable).parent


class StackError(ValueError):
    """A stack that cannot start, or a part of it that is down: one line saying what to do."""


@dataclass
class Service:
    name: str
    pid: int
    url: str  # what a user opens (the UI) or what answers the health check
    log: str
    # Part of its command line (before and after `mixer server` execs mlflow): a recycled pid running
    # something else is never signalled.
    marker: str


def up(cfg: Config, folder: Path, prefect_port: int = 4200, mlflow_port: int = 5000, pool: str = POOL) -> list[Service]:
    """Start the stack and wait until it is healthy; a failed start stops what it had started."""
    folder = folder.resolve()
    running = [s for s in _recorded(folder) if _alive(s)]
    if running:
        raise StackError(f"the stack in {folder} is already up ({', '.join(s.name for s in running)}); "
                         f"`mixer stack status` or `mixer stack down`")
    for port in (prefect_port, mlflow_port):
        if not _port_free(port):
            raise StackError(f"{HOST}:{port} is in use (another server?); stop it or pick another port")
    folder.mkdir(parents=True, exist_ok=True)
    api = f"http://{HOST}:{prefect_port}/api"
    mlflow_url = f"http://{HOST}:{mlflow_port}"
    prefect_env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(folder / "prefect-home"),
                   "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    services: list[Service] = []
    try:
        server = _start(folder, "prefect-server", prefect_server_command(prefect_port), prefect_env, cfg.root,
                        f"http://{HOST}:{prefect_port}", f"--port {prefect_port}")
        services.append(server)
        _wait(server, f"{api}/health")
        _ensure_pool(pool, prefect_env, cfg.root)
        # Flow runs of the worker track to this stack's MLflow server unless the user chose a store.
        worker_env = {**prefect_env, "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", mlflow_url)}
        worker = _start(folder, "worker", [str(_BIN / "prefect"), "worker", "start", "--pool", pool, "--type",
                                           "process"], worker_env, cfg.root, f"{api}/work_pools/{pool}", f"--pool {pool}")
        services.append(worker)
        # The server serves the project's own store, whatever MLFLOW_TRACKING_URI the shell has.
        mlflow_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        mlflow = _start(folder, "mlflow", mlflow_server_command(cfg, mlflow_port), mlflow_env, cfg.root, mlflow_url,
                        f"--port {mlflow_port}")
        services.append(mlflow)
        _wait(mlflow, f"{mlflow_url}/health")
        _wait_worker_online(worker, api, pool)
    except BaseException:
        for service in reversed(services):
            _stop(service)
        raise
    _write(folder, services)
    return services


def prefect_server_command(port: int) -> list[str]:
    """The Prefect server, bound to HOST: its API runs flows and holds no authentication."""
    return [str(_BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]


def mlflow_server_command(cfg: Config, port: int) -> list[str]:
    """`mixer server` on HOST: the MLflow server over the project's store, also unauthenticated."""
    return [sys.executable, "-m", "mixer.cli", "server", "--host", HOST, "--port", str(port),
            "--params", str(cfg.root / "params.yaml")]


def down(folder: Path) -> list[str]:
    """Stop every recorded process (SIGTERM to its session, SIGKILL after STOP_TIMEOUT_S); the stopped names."""
    folder = folder.resolve()
    services = _recorded(folder)
    stopped = [service.name for service in reversed(services) if _stop(service)]
    (folder / PIDS_FILE).unlink(missing_ok=True)
    return stopped


def status(folder: Path) -> list[tuple[Service, bool]]:
    """Each recorded service and whether its process is alive."""
    return [(service, _alive(service)) for service in _recorded(folder.resolve())]


def _start(folder: Path, name: str, argv: list[str], env: dict[str, str], cwd: Path, url: str,
           marker: str) -> Service:
    log = folder / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=cwd, start_new_session=True)
    return Service(name, process.pid, url, str(log), marker)


def answers_ok(url: str) -> bool:
    """Whether GET `url` answers 200 within 2 s (a health endpoint of a server being started)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait(service: Service, health_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(service):
            raise StackError(f"{service.name} exited during start-up; see {service.log}")
        if answers_ok(health_url):
            return
        time.sleep(0.5)
    raise StackError(f"{service.name}: {health_url} not healthy after {START_TIMEOUT_S:.0f} s; see {service.log}")


def _wait_worker_online(worker: Service, api: str, pool: str) -> None:
    """The worker is up when the server lists it as ONLINE in the pool (it has polled once)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    request = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    while time.monotonic() < deadline:
        if not _alive(worker):
            raise StackError(f"the worker exited during start-up; see {worker.log}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if any(w.get("status") == "ONLINE" for w in json.load(response)):
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise StackError(f"the worker did not come online in pool {pool} after {START_TIMEOUT_S:.0f} s; see {worker.log}")


def _ensure_pool(pool: str, env: dict[str, str], cwd: Path) -> None:
    prefect = str(_BIN / "prefect")
    if subprocess.run([prefect, "work-pool", "inspect", pool], env=env, cwd=cwd, capture_output=True).returncode == 0:
        return
    done = subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], env=env, cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"prefect work-pool create {pool} failed: {' '.join((done.stderr or done.stdout).split())}")


def _stop(service: Service) -> bool:
    if not _alive(service):
        return False
    try:
        os.killpg(service.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _alive(service):
        time.sleep(0.2)
    try:
        os.killpg(service.pid, signal.SIGKILL)  # children that outlived the leader, or a hung leader
    except ProcessLookupError:
        pass
    return True


def _alive(service: Service) -> bool:
    """The recorded pid runs the recorded program (not a zombie, not a recycled pid)."""
    try:
        stat = Path(f"/proc/{service.pid}/stat").read_text()
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and service.marker in cmdline


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((HOST, port)) != 0


def _recorded(folder: Path) -> list[Service]:
    path = folder / PIDS_FILE
    if not path.is_file():
        return []
    return [Service(**entry) for entry in json.loads(path.read_text())]


def _write(folder: Path, services: list[Service]) -> None:
    (folder / PIDS_FILE).write_text(json.dumps([asdict(s) for s in services], indent=2) + "\n")


def arguments(parser: argparse.ArgumentParser) -> None:
    """`mixer stack` arguments (the CLI's Command entry)."""
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=Path(STACK_DIR), help="pids and logs (default: .stack)")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--pool", default=POOL, help="the process work pool the worker polls")


def command(cfg: Config, args: argparse.Namespace) -> None:
    """`mixer stack up|down|status`: what each prints is what a user needs next."""
    if args.action == "up":
        services = up(cfg, args.dir, args.prefect_port, args.mlflow_port, args.pool)
        for service in services:
            print(f"{service.name:<15} pid {service.pid:<8} {service.url}  (log {service.log})")
        print(f"export PREFECT_API_URL=http://{HOST}:{args.prefect_port}/api   # then: prefect deploy --all")
    elif args.action == "down":
        stopped = down(args.dir)
        print(f"stopped {', '.join(stopped)}" if stopped else f"nothing running in {args.dir}")
    else:
        rows = status(args.dir)
        if not rows:
            raise StackError(f"no stack recorded in {args.dir}; `mixer stack up`")
        for service, alive in rows:
            print(f"{service.name:<15} {'up' if alive else 'DOWN':<5} pid {service.pid:<8} {service.url}")
        down_names = [service.name for service, alive in rows if not alive]
        if down_names:
            raise StackError(f"{', '.join(down_names)} not running; see the logs in {args.dir}, then "
                             f"`mixer stack down && mixer stack up`")
