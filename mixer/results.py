"""Reported models: results/<name>/ = the exported model, its learning curves and result.json.

`mixer result NAME --weights DIR --command CMD` copies an exported model folder to results/NAME/,
scores it on the test split exactly as `mixer evaluate --weights results/NAME` does (writing
metrics/eval.json as usual), and records the figures with what produced them: preset, recipe,
epochs, size, wall time, hardware and the command. `mixer results` prints the README's table.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from mixer import export, plots, reports
from mixer.atomic import atomic_dir, atomic_write_text
from mixer.config import Config
from mixer.model import count_parameters, forward_flops

RESULT_FILE = "result.json"
CURVES_FILE = "learning_curves.png"
MODEL_FILES = (export.WEIGHTS_FILE, export.SUMMARY_FILE)
# The recipe: every train.* setting that changes what is learned (not where it is written or how
# much of an epoch a quick run takes).
NOT_RECIPE = ("models_dir", "run_name", "limit_train_batches", "limit_eval_batches")


class ResultError(ValueError):
    """A result that cannot be recorded as asked: one line."""


def record(cfg: Config, name: str, weights: Path, command: str, wall_seconds: float | None, hardware: str,
           results_dir: Path) -> dict[str, Any]:
    """Copy `weights` to results_dir/name, evaluate it on the test split, write result.json; returns it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ResultError(f"result name {name!r}: use letters, digits, - _ . (it names a folder)")
    exported = export.load(weights)  # a broken or unsafe folder is refused before anything is written
    folder = results_dir / name
    if weights.resolve() != folder.resolve():
        with atomic_dir(folder) as staging:  # a crash leaves the previous result, never half of this one
            for file in MODEL_FILES:
                shutil.copy2(weights / file, staging / file)
    metrics = reports.evaluate_models(cfg, folder)  # what `mixer evaluate --weights results/<name>` runs
    summary = exported.summary
    origin = summary.get("init_from")
    history = summary.get("history", [])
    params = summary.get("params", {})
    result = {
        "name": name,
        "preset": exported.config.preset,
        "model": {key: getattr(exported.config, key) for key in
                  ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim", "dropout")},
        "parameters": count_parameters(exported.model),
        "forward_mflops_per_image": round(forward_flops(exported.config) / 1e6, 2),
        "recipe": {k: _within(cfg.root, v) if k == "init_from" else v
                   for k, v in params.get("train", {}).items() if k not in NOT_RECIPE},
        # train.init_from: the run this one continued from (its epochs come on top of epochs_run).
        "init_from": {**origin, "folder": _within(cfg.root, origin["folder"])} if origin else None,
        "epochs_run": len(history),
        "best_epoch": summary.get("best_epoch"),
        "best_val_top1": history[summary["best_epoch"] - 1]["val_top1"] if history and summary.get("best_epoch")
        else None,
        "test_top1": metrics["top1"],
        "test_top5": metrics["top5"],
        "test_loss": metrics["loss"],
        "test_images": metrics["count"],
        "flip_average": metrics["flip_average"],  # `mixer evaluate` reproduces the figures with the same eval.flip_average
        "train_seconds": round(sum(row.get("epoch_seconds", 0.0) for row in history), 1),
        "wall_seconds": wall_seconds,
        "hardware": hardware,
        "precision": summary.get("precision"),
        "num_workers": summary.get("num_workers"),
        "data_version": metrics.get("data_version"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "command": command,
    }
    plots.training_curves_png(history, folder / CURVES_FILE)
    atomic_write_text(folder / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _within(root: Path, path: str | None) -> str | None:
    """`path` relative to the project when it lies inside it: a result names no machine's folders."""
    if path is None or not Path(path).is_relative_to(root):
        return path
    return str(Path(path).relative_to(root))


def load_all(results_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob(f"*/{RESULT_FILE}"))]


def table(results: list[dict[str, Any]]) -> str:
    """The README's results table (Markdown)."""
    rows = ["| result | preset | params | epochs (best) | test top-1 | test top-5 | flip-averaged | wall time | hardware |",
            "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        wall = f"{r['wall_seconds'] / 3600:.1f} h" if r.get("wall_seconds") else "-"
        # Continued from train.init_from: the epochs its starting weights (that run's best) had trained first.
        earlier = (r.get("init_from") or {}).get("best_epoch")
        epochs = f"{earlier} + {r['epochs_run']}" if earlier else f"{r['epochs_run']}"
        rows.append(f"| [{r['name']}](results/{r['name']}/{RESULT_FILE}) | {r['preset']} | {r['parameters']:,} | "
                    f"{epochs} ({r['best_epoch']}) | {r['test_top1']:.2%} | {r['test_top5']:.2%} | "
                    f"{'yes' if r.get('flip_average') else 'no'} | {wall} | {r['hardware']} |")
    return "\n".join(rows)
