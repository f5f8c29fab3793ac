"""The door to DVC: which version of the data a result was computed on, and how to get that data.

The data version is the hash DVC recorded for the prepared data folder in dvc.lock, so two results
with the same version saw byte-identical arrays; `check_data_matches_lock` makes sure the folder still
holds that version before anything reads it. `reproduce_ingest` runs the DVC `ingest` stage (what the
Prefect ingest flow calls), `checkout_data` restores the recorded version without rebuilding it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from dvc.dvcfile import LOCK_FILE, PROJECT_FILE
from dvc.exceptions import DvcException
from dvc.lock import FAILED_TO_LOCK_MESSAGE
from dvc.repo import Repo

from mixer import config
from mixer.config import Config
from mixer.data import DataError
from mixer.lockfile import INGEST_STAGE, data_version

log = logging.getLogger(__name__)

STAGE_PARAMS = ("out_dir", "val_fraction", "split_seed")  # data.* the stage reads besides url and md5
# A holder is another `dvc repro`/`pull` of this project; an ingest takes seconds to a few minutes.
LOCK_TIMEOUT_S = 600.0
_LOCKED = FAILED_TO_LOCK_MESSAGE.split(".")[0]  # "Unable to acquire lock": what dvc prints on LockError
_BIN = Path(sys.executable).parent  # this environment's `dvc` and `mixer` (the stage's command)


def check_data_matches_lock(root: Path, data_dir: Path) -> str | None:
    """The data version of `data_dir` in `root`/dvc.lock, once DVC confirms the folder still holds it.

    Raises ModifiedDataError when a file was edited, replaced, added or removed since (or the folder is
    gone). None, checking nothing, when dvc.lock records no `ingest` output at `data_dir` (a new project, or
    data prepared elsewhere by an override). DVC hashes the files itself; its state database skips files
    unchanged since it last hashed them (~0.4 s in all for CIFAR-100; a full re-hash reads 185 MB once).
    In-process, without the repository lock, so it also works inside a `dvc repro` stage.
    """
    version = data_version(root, data_dir)
    if version is None:
        return None
    try:
        with Repo(str(root)) as repo:
            # Absolute: DVC resolves a relative target against the working directory, which a flow run
            # shares with its other threads.
            (stage,) = repo.stage.collect(f"{root / PROJECT_FILE}:{INGEST_STAGE}")
            out = next((o for o in stage.outs if Path(o.fs_path).resolve() == data_dir.resolve()), None)
            change = next(iter(out.workspace_status().values()), None) if out is not None else None
    except DvcException as err:
        raise VersioningError(f"{root}: cannot compare {data_dir} with {LOCK_FILE} ({_one_line(str(err))}); "
                              f"see `dvc status {INGEST_STAGE}`") from None
    if change == "modified":
        raise ModifiedDataError(f"{out}: modified since {LOCK_FILE} recorded it (md5 {version}: a file was edited, "
                                f"replaced, added or removed); run `dvc checkout {out}` to restore that version, "
                                f"or `dvc repro {INGEST_STAGE}` to rebuild it")
    if change == "deleted":
        raise ModifiedDataError(f"{out}: missing, but {LOCK_FILE} records md5 {version}; run `dvc checkout {out}` "
                                f"to restore it, or `dvc repro {INGEST_STAGE}` to rebuild it")
    return version


class VersioningError(ValueError):
    """DVC could not provide the data (stage failed, repository locked for too long, ...): one line."""


class ModifiedDataError(DataError):
    """The prepared data is not the version dvc.lock records (changed by hand since): one line."""


def reproduce_ingest(cfg: Config, lock_timeout_s: float = LOCK_TIMEOUT_S) -> str:
    """Bring `data/cifar100` to the version params.yaml describes, through DVC; returns that version.

    With a default remote: `dvc pull ingest` first (a version built elsewhere is downloaded, not
    rebuilt), then `dvc repro ingest`, then `dvc push ingest` (so other machines can pull it). A
    repository held by another dvc process is waited for (up to `lock_timeout_s`), not failed on.
    """
    _refuse_stage_overrides(cfg)
    env = _stage_environment(cfg)
    remote = _default_remote(cfg.root)
    if remote:
        try:
            _dvc(cfg.root, env, lock_timeout_s, "pull", INGEST_STAGE)
        except DvcCommandError as err:  # e.g. a version nobody pushed yet: repro builds it below
            log.warning("%s; reproducing instead", err)
    _dvc(cfg.root, env, lock_timeout_s, "repro", INGEST_STAGE)
    if remote:
        _dvc(cfg.root, env, lock_timeout_s, "push", INGEST_STAGE)
    return _recorded_version(cfg)


def checkout_data(cfg: Config, lock_timeout_s: float = LOCK_TIMEOUT_S) -> str:
    """Make the workspace data match dvc.lock (pull from the default remote, else the local cache).

    For readers such as the nightly check: nothing is rebuilt, so the version is the one recorded.
    """
    command = "pull" if _default_remote(cfg.root) else "checkout"
    try:
        _dvc(cfg.root, dict(os.environ), lock_timeout_s, command, INGEST_STAGE)
    except DvcCommandError as err:
        raise VersioningError(f"{err}: the data version in dvc.lock is neither in the DVC cache nor the "
                              f"remote; run the ingest-cifar100 flow or `dvc repro ingest`") from None
    return _recorded_version(cfg)


class DvcCommandError(VersioningError):
    """A dvc command exited non-zero."""


def _recorded_version(cfg: Config) -> str:
    version = data_version(cfg.root, cfg.data.out_dir)
    if version is None:
        raise VersioningError(f"{cfg.root / LOCK_FILE}: records no `{INGEST_STAGE}` output at {cfg.data.out_dir}; "
                              f"run `dvc repro ingest`")
    return version


def _refuse_stage_overrides(cfg: Config) -> None:
    """The stage runs `mixer ingest` on params.yaml: an override of what it reads would be ignored."""
    on_disk = config.load(cfg.root / config.PARAMS_FILE).data
    for key in STAGE_PARAMS:
        wanted, recorded = getattr(cfg.data, key), getattr(on_disk, key)
        if wanted != recorded:
            raise VersioningError(f"data.{key}={wanted}: the DVC ingest stage reads params.yaml ({recorded}); "
                                  f"change it there (or `dvc exp run -S data.{key}=...`)")


def _stage_environment(cfg: Config) -> dict[str, str]:
    """The stage command (`mixer ingest`) from this environment, on the archive the config resolved
    (a mirror set by environment variable or by an override)."""
    return {**os.environ, "PATH": f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            config.ENV_DATA_URL: cfg.data.url, config.ENV_DATA_MD5: cfg.data.md5}


def _default_remote(root: Path) -> str | None:
    done = subprocess.run([_dvc_executable(), "remote", "default"], cwd=root, capture_output=True, text=True)
    name = done.stdout.strip()
    return name if done.returncode == 0 and name and "No default remote" not in name else None


def _dvc(root: Path, env: dict[str, str], timeout_s: float, *args: str) -> None:
    """`dvc <args>` in `root`; while another dvc process holds the repository lock, retry with backoff.

    A subprocess rather than dvc's Python API: DVC resolves stages and paths against the working
    directory, which a flow run shares with its other threads.
    """
    deadline = time.monotonic() + timeout_s
    delay = 1.0  # seconds; DVC itself already waited ~3 s before failing on the lock
    while True:
        done = subprocess.run([_dvc_executable(), *args], cwd=root, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            log.info("dvc %s: %s", " ".join(args), _one_line(done.stdout)[-500:])
            return
        output = done.stderr + done.stdout
        if _LOCKED not in output:
            lines = [line for line in output.splitlines() if line.strip()]
            last = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "")
            raise DvcCommandError(f"dvc {' '.join(args)} in {root} failed: {_one_line(last)}")
        if time.monotonic() + delay > deadline:
            raise VersioningError(f"{root}: another dvc process held the repository lock for over "
                                  f"{timeout_s:.0f} s; find it (`fuser {root / '.dvc' / 'tmp' / 'lock'}`) and retry")
        log.info("DVC repository %s is locked by another process; retrying in %.0f s", root, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def _dvc_executable() -> str:
    return str(_BIN / "dvc") if (_BIN / "dvc").exists() else "dvc"


def _one_line(text: str) -> str:
    return " ".join(text.split())
