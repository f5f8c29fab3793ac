"""Ray workers run in the installed environment, not in a uv environment Ray builds for them.

Under `uv run`, Ray's default is to start each worker as `uv run ... python` in a copy of the
working folder, which syncs a fresh environment there (on a new machine: PyPI's CUDA torch, several
GB). The package turns that off as it is imported (mixer/__init__.py), since Ray reads the switch
only once, when it is first imported. These run real `uv run` drivers and ask Ray's own hook what
runtime environment it would give a job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Ray's function that ray.init passes the job's runtime environment through (ray/_private/worker.py).
JOB_RUNTIME_ENV = ("from ray._private.worker import _maybe_modify_runtime_env; "
                   "print(json.dumps(_maybe_modify_runtime_env({}, _skip_env_hook=True)))")


def runtime_env_under_uv_run(imports: str, **env: str) -> dict[str, object]:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` names itself in UV
    if uv is None:
        pytest.skip("uv is not on PATH")
    base = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    driver = f"import json; {imports}; {JOB_RUNTIME_ENV}"
    out = subprocess.run([uv, "run", "--frozen", "--no-sync", "python", "-c", driver], cwd=ROOT,
                         env={**base, **env}, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def workers_start_with_uv_run(job: dict[str, object]) -> bool:
    command = str(job.get("py_executable", "")).split()
    return len(command) > 1 and Path(command[0]).name == "uv" and command[1] == "run"


def test_a_driver_that_imports_mixer_gives_workers_the_installed_environment() -> None:
    assert runtime_env_under_uv_run("import mixer.training, ray") == {}


def test_without_mixer_ray_would_build_a_uv_environment_for_the_workers() -> None:
    # The same driver importing Ray first: what the suite did before the package set the switch.
    job = runtime_env_under_uv_run("import ray, mixer.training")
    assert workers_start_with_uv_run(job)
    assert job.get("working_dir") == str(ROOT)


def test_the_users_own_setting_wins() -> None:
    job = runtime_env_under_uv_run("import mixer.training, ray", RAY_ENABLE_UV_RUN_RUNTIME_ENV="1")
    assert workers_start_with_uv_run(job)
