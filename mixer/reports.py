"""The evaluate step: the exported model on the test split -> metrics/ and plots/ for DVC.

Files written (all overwritten atomically, one by one):
  metrics/eval.json               top1, top5, loss (+ count, data version, preset)   `dvc metrics show`
  plots/training.csv              per-epoch curves from training                     `dvc plots show`
  plots/per_class_accuracy.csv    test accuracy of each fine class
  plots/training_curves.png, plots/confusion_matrix.png
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mixer import data, export, plots, tracking, versioning
from mixer.atomic import atomic_write_text
from mixer.config import Config
from mixer.evaluation import EvalResult, evaluate

PLOT_FILES = ("training.csv", "per_class_accuracy.csv", "training_curves.png", "confusion_matrix.png")
CURVE_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds")


def evaluate_models(cfg: Config, models_dir: Path | None = None) -> dict[str, Any]:
    """Score the exported model on the test split and write metrics and plots; returns eval.json."""
    exported = export.load(models_dir or cfg.train.models_dir)
    data_version = versioning.check_data_matches_lock(cfg.root, cfg.data.out_dir)  # before the split is read
    test = data.load_split(cfg.data.out_dir, "test")
    meta = data.load_meta(cfg.data.out_dir)
    result = score_test_split(cfg, exported, test)
    metrics = {
        **result.to_metrics(),
        "flip_average": cfg.eval.flip_average,
        "data_version": data_version,
        "preset": exported.config.preset,
        "best_epoch": exported.summary.get("best_epoch"),
    }
    cfg.eval.metrics_dir.mkdir(parents=True, exist_ok=True)
    cfg.eval.plots_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.eval.metrics_dir / "eval.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    history = exported.summary.get("history", [])
    atomic_write_text(cfg.eval.plots_dir / "training.csv", _csv(CURVE_COLUMNS, [
        [row.get(column, "") for column in CURVE_COLUMNS] for row in history]))
    names = meta["fine_label_names"]
    atomic_write_text(cfg.eval.plots_dir / "per_class_accuracy.csv", _csv(("class", "accuracy"), [
        [name, round(float(acc), 6)] for name, acc in zip(names, result.per_class, strict=True)]))
    plots.training_curves_png(history, cfg.eval.plots_dir / "training_curves.png")
    plots.confusion_matrix_png(result.confusion, cfg.eval.plots_dir / "confusion_matrix.png", names)
    run_id = exported.summary.get("mlflow_run_id")
    if run_id:  # the training run of this model: evaluation attaches to it
        tracking.log_evaluation(cfg, run_id, metrics, [
            cfg.eval.metrics_dir / "eval.json", *(cfg.eval.plots_dir / name for name in PLOT_FILES)])
    return metrics


def score_test_split(cfg: Config, exported: export.Exported, test: data.Split) -> EvalResult:
    """The test-split evaluation with the eval settings: the one place registration figures and the
    nightly check get theirs from, so they stay comparable."""
    return evaluate(exported.model, test.images, test.fine_labels, exported.mean, exported.std,
                    batch_size=cfg.eval.batch_size, limit_batches=cfg.train.limit_eval_batches,
                    num_classes=exported.config.num_classes, flip_average=cfg.eval.flip_average)


def _csv(header: tuple[str, ...], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
