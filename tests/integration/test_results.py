"""results/<name>/: a reported model, whose test figures `mixer evaluate --weights` reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixer import cli, config, data, export, results
from mixer.model import build_model

from .conftest import tiny_config


def export_model(cfg: config.Config, folder: Path, **info: object) -> None:
    """A real, untrained model exported the way training exports its best epoch."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would score every class alike
    meta = data.load_meta(cfg.data.out_dir)
    rows = [{"epoch": e, "train_loss": 4.6 - e / 10, "train_top1": 0.01, "val_loss": 4.6 - e / 20,
             "val_top1": 0.01 * e, "val_top5": 0.05, "lr": 0.005, "epoch_seconds": 2.0} for e in (1, 2)]
    export.save(folder, model.state_dict(), cfg.model, meta["mean"], meta["std"], info={
        "best_epoch": 2, "history": rows, "precision": "bf16", "num_workers": 1,
        "params": cfg.to_dict(), **info})


def test_a_recorded_result_is_what_evaluate_reproduces(tmp_path: Path, prepared_data: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, prepared_data)
    export_model(cfg, cfg.train.models_dir)
    command = "mixer train train.precision=bf16 train.run_name=seed"

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    settings = {k: v for k, v in cfg.to_dict().items() if k != "root"}
    params.write_text(json.dumps(settings, default=str))  # YAML is a superset of JSON

    assert cli.main(["result", "seed", "--params", str(params), "--command", command, "--wall-seconds", "3600",
                     "--hardware", "a test CPU", "--results-dir", str(tmp_path / "results")]) == 0

    folder = tmp_path / "results" / "seed"
    result = json.loads((folder / "result.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["learning_curves.png", "model.pt", "result.json",
                                                         "train.json"]
    assert result["hardware"] == "a test CPU"
    assert result["preset"] == "seed" and result["parameters"] == sum(p.numel() for p in build_model(cfg.model).parameters())
    assert result["epochs_run"] == 2 and result["best_epoch"] == 2 and result["best_val_top1"] == 0.02
    assert result["recipe"]["lr"] == cfg.train.lr and "models_dir" not in result["recipe"]
    assert result["command"] == command and result["wall_seconds"] == 3600.0 and result["train_seconds"] == 4.0

    # `mixer evaluate --weights results/seed`, from the CLI, reproduces the recorded test figures.
    (tmp_path / "metrics" / "eval.json").unlink()
    assert cli.main(["evaluate", "--params", str(params), "--weights", str(folder)]) == 0
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert (metrics["top1"], metrics["top5"]) == (result["test_top1"], result["test_top5"])
    assert result["test_top1"] > 0  # an untrained model with a random head still gets some right

    table = results.table(results.load_all(tmp_path / "results"))
    assert f"| [seed](results/seed/result.json) | seed | {result['parameters']:,} | 2 (2) |" in table


def test_a_result_is_refused_whole_before_anything_is_written(tmp_path: Path, prepared_data: Path) -> None:
    cfg = tiny_config(tmp_path, prepared_data)
    with pytest.raises(export.ExportError):
        results.record(cfg, "seed", tmp_path / "missing", "mixer train", None, "cpu", tmp_path / "results")
    with pytest.raises(results.ResultError, match="names a folder"):
        results.record(cfg, "../seed", tmp_path / "missing", "mixer train", None, "cpu", tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_a_flip_averaged_result_is_recorded_as_such_and_reproduced_with_it(
        tmp_path: Path, prepared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, prepared_data)
    export_model(cfg, cfg.train.models_dir)
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "root"}, default=str))

    assert cli.main(["result", "tta", "--params", str(params), "--command", "mixer train",
                     "--results-dir", str(tmp_path / "results"), "eval.flip_average=true"]) == 0
    result = json.loads((tmp_path / "results" / "tta" / "result.json").read_text())
    assert result["flip_average"] is True

    def evaluate(*overrides: str) -> dict:
        assert cli.main(["evaluate", "--params", str(params), "--weights", str(tmp_path / "results" / "tta"),
                         *overrides]) == 0
        return json.loads((tmp_path / "metrics" / "eval.json").read_text())

    with_flips = evaluate("eval.flip_average=true")
    assert (with_flips["top1"], with_flips["top5"], with_flips["loss"]) == (
        result["test_top1"], result["test_top5"], result["test_loss"])
    assert with_flips["flip_average"] is True
    assert evaluate()["loss"] != result["test_loss"]  # the setting is what reproduces it


def test_a_continued_run_names_its_start_and_counts_both_parts(tmp_path: Path, prepared_data: Path) -> None:
    start = tiny_config(tmp_path, prepared_data).root / "results" / "first"  # inside the project
    cfg = tiny_config(tmp_path, prepared_data, **{"train.init_from": str(start)})
    origin = {"folder": str(start), "mlflow_run_id": "abc", "run_name": "first", "epochs_run": 70, "best_epoch": 59}
    export_model(cfg, cfg.train.models_dir, init_from=origin)

    result = results.record(cfg, "second", cfg.train.models_dir, "mixer train train.init_from=results/first", None,
                            "a test CPU", tmp_path / "results")

    # Paths inside the project are recorded relative to it: a result names no machine's folders.
    assert result["recipe"]["init_from"] == "results/first"
    assert result["init_from"] == {**origin, "folder": "results/first"}
    table = results.table([result])
    assert "| second | seed |" in table.replace("[second](results/second/result.json)", "second")
    assert f"| {result['parameters']:,} | 59 + 2 (2) |" in table  # the start's 59 epochs, then this run's 2
