"""The deployments of prefect.yaml on a real local stack (`mixer stack up`): a Prefect server and a process
worker on loopback ports, the MLflow server; train-mixer/default and evaluate-mixer/nightly run to Completed,
and the flow run's page in the Prefect UI, opened in headless Chromium, shows the run's state.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.integration.mlflow_server import free_port
from tests.projects import BIN, REPO, make_project

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"  # gitignored: screenshots CI can keep
RUN_TIMEOUT_S = 480


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    ui: str  # the Prefect server, http://127.0.0.1:<port>
    mlflow: str
    train_run_id: str

    def cli(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr


def _run_deployment(stack: Stack, name: str, *params: str) -> str:
    """`prefect deployment run NAME --watch`; returns the flow run id after asserting Completed."""
    out = stack.cli(str(BIN / "prefect"), "deployment", "run", name, *params, "--watch",
                    "--watch-timeout", str(RUN_TIMEOUT_S), timeout=RUN_TIMEOUT_S + 60)
    assert "Completed" in out, out
    return next(line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, synthetic_archive: tuple[Path, str],
          ray_session: str) -> Iterator[Stack]:
    archive, md5 = synthetic_archive
    tmp = tmp_path_factory.mktemp("deployments")
    root, env = make_project(tmp / "project", archive, md5, ray_address=ray_session)
    prefect_port, mlflow_port = free_port(), free_port()
    ui = f"http://127.0.0.1:{prefect_port}"
    env.update(PREFECT_API_URL=f"{ui}/api", PREFECT_HOME=str(tmp / "prefect-cli"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    stack = Stack(root, env, ui, f"http://127.0.0.1:{mlflow_port}", "")
    stack_args = ["--dir", str(tmp / "stack")]
    stack.cli(str(BIN / "mixer"), "stack", "up", *stack_args, "--prefect-port", str(prefect_port),
              "--mlflow-port", str(mlflow_port))
    try:
        stack.cli(str(BIN / "prefect"), "deploy", "--all")
        stack.train_run_id = _run_deployment(stack, "train-mixer/default", "-p", 'overrides={"train.epochs": 1}')
        yield stack
    finally:
        subprocess.run([str(BIN / "mixer"), "stack", "down", *stack_args], cwd=root, env=env, timeout=120)


def test_train_deployment_registers_a_challenger_in_its_own_folder(stack: Stack) -> None:
    client = MlflowClient(stack.mlflow)
    version = client.get_model_version_by_alias("cifar100-mixer", "challenger")
    assert version.version == "1"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert (stack.root / "runs" / stack.train_run_id / "models" / "model.pt").is_file()
    assert not (stack.root / "models").exists()  # the DVC workspace output is left to dvc repro
    assert "type='process'" in stack.cli(str(BIN / "prefect"), "work-pool", "inspect", "mixer-pool")
    assert "worker" in stack.cli(str(BIN / "mixer"), "stack", "status", "--dir", str(stack.root.parent / "stack"))


def test_nightly_deployment_has_its_schedule_and_records_an_mlflow_run(stack: Stack) -> None:
    with temporary_settings(updates={PREFECT_API_URL: f"{stack.ui}/api"}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("evaluate-mixer/nightly")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC" and schedule.active

    _run_deployment(stack, "evaluate-mixer/nightly")

    client = MlflowClient(stack.mlflow)
    experiment = client.get_experiment_by_name("cifar100-mixer-eval")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["nightly_status"] == "passed"
    assert run.data.tags["model_version"] == "1"  # the first train run was promoted to champion
    assert 0 < run.data.metrics["test_top1"] <= 1


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (`apt-get install chromium`)")
def test_the_flow_run_page_shows_its_state_in_chromium(stack: Stack) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "prefect-train-mixer-flow-run.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{stack.ui}/runs/flow-run/{stack.train_run_id}")
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.get_by_text("train-mixer").first.wait_for(timeout=10_000)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
