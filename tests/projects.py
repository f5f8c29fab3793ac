"""A fresh copy of the project (git + DVC repository) pointed at the synthetic archive, for flows and deployments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", "prefect.yaml")
PROJECT_DIRS = ("mixer", "flows")


def tiny_params(project: Path, **sections: dict[str, Any]) -> None:
    """Small training in params.yaml (seconds per epoch on the synthetic data), plus `sections` updates."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(epochs=2, batch_size=64)
    params["eval"]["batch_size"] = 250
    params["ray"].update(num_workers=1, cpus_per_worker=1)
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path, archive: Path, md5: str, ray_address: str | None = None) -> tuple[Path, dict[str, str]]:
    """Copy the pipeline files and code into `dest`, `git init` + `dvc init`; returns (root, environment).

    The environment points ingestion at the archive, Ray at `ray_address` and the `mixer`/`dvc`/
    `prefect` commands at this virtual environment; MLflow stays on the project's SQLite file unless
    the caller sets MLFLOW_TRACKING_URI.
    """
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        if (REPO / name).is_file():
            shutil.copy(REPO / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    tiny_params(dest)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "PREFECT_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", MIXER_DATA_URL=str(archive), MIXER_DATA_MD5=md5)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True)
    return dest, env
