"""What the Ray Train controller has to import before it asks for workers.

On 2 cores, importing torch or MLflow costs seconds per process. The controller unpickles the epoch
callbacks as it starts, so they must pull in neither.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ray.cloudpickle

from mixer import config, training

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
HEAVY = ("torch", "mlflow", "dvc")


def heavy_imports(python: str) -> list[str]:
    """The heavy packages a fresh interpreter has imported after running `python`."""
    code = f"{python}\nimport sys; print(*sorted(m for m in {HEAVY!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_the_controllers_epoch_callbacks_import_neither_torch_nor_mlflow(tmp_path: Path) -> None:
    callback = training.on_epoch(config.load(PARAMS), run_id="0123456789abcdef")
    blob = tmp_path / "callback.pkl"
    blob.write_bytes(ray.cloudpickle.dumps(callback))  # as Ray ships it to the controller
    assert heavy_imports(f"import ray.cloudpickle; ray.cloudpickle.loads(open({str(blob)!r}, 'rb').read())") == []
