"""`dvc repro` in a fresh copy of the project, on the synthetic archive, through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tiny_params(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(epochs=2, batch_size=64)
    params["eval"]["batch_size"] = 250
    params["ray"].update(num_workers=1, cpus_per_worker=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tmp_path: Path, synthetic_archive: tuple[Path, str], ray_session: str) -> tuple[Path, dict[str, str]]:
    """A git + DVC repository holding the project's pipeline files, pointed at the synthetic archive."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "mixer", project / "mixer", ignore=shutil.ignore_patterns("__pycache__"))
    _tiny_params(project)
    archive, md5 = synthetic_archive
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}  # the project's SQLite
    env = {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MIXER_DATA_URL": str(archive),
           "MIXER_DATA_MD5": md5, "RAY_ADDRESS": ray_session}
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=project, env=env, check=True)
    return project, env


def _dvc(project: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_repro_runs_the_pipeline_then_skips_unchanged_stages(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project

    first = _dvc(root, env, "repro")
    for stage in ("ingest", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first
    assert json.loads((root / "metrics" / "registered.json").read_text())["version"] == 1

    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert metrics["top1"] > 0.1  # synthetic classes are learnable; chance is 0.01
    assert metrics["count"] == 500
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert metrics["data_version"] == lock["stages"]["ingest"]["outs"][0]["md5"]
    for name in ("training.csv", "per_class_accuracy.csv", "training_curves.png", "confusion_matrix.png"):
        assert (root / "plots" / name).stat().st_size > 0

    second = _dvc(root, env, "repro")
    assert "Running stage" not in second and "up to date" in second

    # Only training params changed: train and evaluate rerun, ingest does not.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # What DVC now considers out of date (without spending a minute retraining): train, by its params.
    status = json.loads(_dvc(root, env, "status", "--json"))
    stages = {name.split(":")[-1]: changes for name, changes in status.items()}
    assert "ingest" not in stages and "train" in stages
    assert {"changed deps": {"params.yaml": {"train": "modified"}}} in stages["train"]  # the train section

    shown = _dvc(root, env, "metrics", "show", "--json")
    assert json.loads(shown)  # the metrics file is found and parsed by DVC
    assert "top1" in shown
    _dvc(root, env, "plots", "show", "-o", "dvc_plots")
    assert (root / "dvc_plots" / "index.html").is_file()


def test_push_stores_the_data_version_and_pull_restores_it(project: tuple[Path, dict[str, str]],
                                                           tmp_path: Path) -> None:
    root, env = project
    _dvc(root, env, "repro", "ingest")
    prepared = {p.name: p.read_bytes() for p in (root / "data" / "cifar100").iterdir()}

    _dvc(root, env, "remote", "add", "-d", "storage", str(tmp_path / "remote"))  # the one set-up step
    _dvc(root, env, "push")
    shutil.rmtree(root / "data" / "cifar100")
    shutil.rmtree(root / ".dvc" / "cache")
    _dvc(root, env, "pull", "ingest")

    assert {p.name: p.read_bytes() for p in (root / "data" / "cifar100").iterdir()} == prepared
