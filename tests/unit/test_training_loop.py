"""The per-worker loop without Ray (LocalSession): it learns, and a resumed run replays the same epochs."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch

from mixer import config, data, loop
from mixer.loop import LocalSession, compiled_or_eager, train_loop
from mixer.model import build_model

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def splits(synthetic_archive: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory):
    archive, md5 = synthetic_archive
    cfg = config.load(PARAMS, {"data.url": str(archive), "data.md5": md5,
                               "data.out_dir": str(tmp_path_factory.mktemp("loop") / "cifar100")})
    out = data.ingest(cfg.data)
    meta = data.load_meta(out)
    return data.load_split(out, "train"), data.load_split(out, "val"), meta["mean"], meta["std"]


def small(epochs: int, **overrides: object) -> config.Config:
    return config.load(PARAMS, {"train.epochs": epochs, "train.batch_size": 64, "train.limit_train_batches": 6,
                                "eval.batch_size": 200,
                                "model.dropout": 0.0,  # dropout's masks are most of a CPU step; not under test here
                                **overrides})


def run(cfg: config.Config, splits, session: LocalSession | None = None) -> LocalSession:
    session = session or LocalSession(device=torch.device("cpu"))
    train_loop(cfg, *splits, session)
    return session


def without_time(reports: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in reports]


def test_loss_falls_and_every_epoch_reports(splits) -> None:
    session = run(small(2, **{"train.limit_train_batches": 0}), splits)
    assert [r["epoch"] for r in session.reports] == [1, 2]
    assert session.reports[-1]["train_loss"] < session.reports[0]["train_loss"]
    assert session.reports[-1]["val_top1"] > 0.05  # chance is 0.01


@pytest.mark.parametrize("recipe", [{}, {"train.ema_decay": 0.9, "train.augment.mixup": 0.4,
                                        "train.augment.cutmix": 1.0}], ids=["plain", "ema-mixup-cutmix"])
def test_a_resumed_run_replays_the_uninterrupted_one(splits, recipe: dict) -> None:
    straight = run(small(3, **recipe), splits)

    interrupted = run(small(1, **recipe), splits)  # "dies" after epoch 1, leaving its checkpoint
    resumed = LocalSession(device=torch.device("cpu"))
    resumed.last_checkpoint = copy.deepcopy(interrupted.last_checkpoint)
    run(small(3, **recipe), splits, resumed)

    assert [r["epoch"] for r in resumed.reports] == [2, 3]
    assert without_time(interrupted.reports + resumed.reports) == without_time(straight.reports)


@pytest.mark.parametrize("overrides", [
    {"train.schedule": "cosine", "train.warmup_epochs": 1, "train.label_smoothing": 0.1},
    {"train.augment.crop_padding": 4, "train.precision": "bf16"},
    {"train.augment.mixup": 0.2, "train.augment.cutmix": 1.0, "train.ema_decay": 0.99},
])
def test_selectable_recipe_parts_train(splits, overrides: dict) -> None:
    session = run(small(2, **overrides), splits)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in session.reports)
    if overrides.get("train.schedule") == "cosine":
        assert session.reports[0]["lr"] < session.reports[1]["lr"]  # still warming up at the start of epoch 1


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(splits) -> None:
    # A learning rate this large makes val loss worse after the first epochs; patience 1 stops it.
    session = run(small(6, **{"train.lr": 0.5, "train.early_stopping_patience": 1, "train.limit_train_batches": 4}),
                  splits)
    val_losses = [r["val_loss"] for r in session.reports]
    assert len(val_losses) < 6 and session.reports[-1]["early_stopped"]
    assert val_losses[-1] > min(val_losses[:-1])  # stopped on an epoch that did not improve
    assert session.last_checkpoint["state"]["best_val_loss"] == min(val_losses)


def test_a_nan_loss_stops_at_once_without_a_checkpoint(splits) -> None:
    # A learning rate no model survives: after one step the weights are ~1e30 and the loss overflows.
    session = run(small(4, **{"train.lr": 1.0e30}), splits)

    assert len(session.reports) == 1  # stopped at the first bad epoch, on every rank alike
    diverged = session.reports[0]
    assert diverged["diverged"] and not math.isfinite(diverged["train_loss"])
    assert session.last_checkpoint is None  # the bad weights never became a checkpoint


def test_the_fast_path_learns_as_well_as_the_plain_path(splits) -> None:
    # Fast: torch.compile + bf16 autocast; plain: eager fp32. Both see the same batches and flips,
    # so they differ only by bf16 rounding: 0.05 apart at most, while the plain path's val top-1
    # after this one epoch spreads 0.50-0.63 over seeds 0-2. Chance is 0.01.
    tiny = {"train.limit_train_batches": 0, "model.num_blocks": 1}  # 1 block: a quarter of the compile time
    plain = run(small(1, **tiny), splits).reports[-1]
    fast_session = run(small(1, **tiny, **{"train.compile": True, "train.precision": "bf16"}), splits)
    fast = fast_session.reports[-1]

    assert plain["val_top1"] > 0.3
    assert abs(fast["val_top1"] - plain["val_top1"]) <= 0.05
    # Checkpoints hold the plain module: no `_orig_mod.` prefix from the compiled wrapper.
    assert set(fast_session.last_checkpoint["model"]) == set(build_model(small(1, **tiny).model).state_dict())


def test_training_goes_on_eagerly_with_a_warning_where_compiling_fails() -> None:
    model = torch.nn.Linear(4, 2)

    def compiler_missing(compiled: torch.nn.Module) -> None:
        model(torch.ones(1, 4)).sum().backward()  # a probe step's gradients, which the fallback must clear
        raise OSError("g++: not found")  # as a failed inductor build would

    with pytest.warns(RuntimeWarning, match=r"torch.compile is not available here \(OSError: g\+\+: not found\)"):
        chosen = compiled_or_eager(model, compiler_missing)
    assert chosen is model and model.weight.grad is None


@pytest.mark.parametrize(("native", "warned"), [(False, True), (True, False), (None, False)])
def test_bf16_on_a_cpu_without_bf16_support_warns_once_before_training(
        monkeypatch: pytest.MonkeyPatch, native: bool | None, warned: bool) -> None:
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)  # what this CPU answers varies by machine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.warn_if_bf16_is_emulated(torch.device("cpu"))
        loop.warn_if_bf16_is_emulated(torch.device("meta"))  # not a CPU: never
    messages = [str(w.message) for w in caught]
    assert messages == (["train.precision=bf16 on a CPU without bf16 support in oneDNN "
                         f"({torch.backends.cpu.get_cpu_capability()}): many times slower than fp32 here; "
                         "use train.precision=fp32"] if warned else [])


def test_this_cpus_bf16_support_is_known() -> None:
    assert loop.cpu_has_native_bf16() in (True, False)  # the PyPI build has oneDNN: it can tell


def test_with_ema_the_average_is_validated_and_exported_and_the_trained_weights_resume(splits) -> None:
    session = run(small(2, **{"train.ema_decay": 0.9}), splits)
    checkpoint = session.last_checkpoint
    assert set(checkpoint["model"]) == set(checkpoint["trained"])  # plain names: what export saves
    assert any(not torch.equal(checkpoint["model"][k], checkpoint["trained"][k]) for k in checkpoint["model"])
    assert checkpoint["ema"]["n_averaged"].item() == 2 * 6  # one update per step: 2 epochs of 6 batches


def test_initial_weights_replace_the_random_ones_and_a_checkpoint_replaces_both(splits) -> None:
    source = run(small(2), splits)
    trained = source.last_checkpoint["model"]
    barely_moving = small(1, **{"train.lr": 1.0e-12, "train.limit_train_batches": 1})

    started = LocalSession(device=torch.device("cpu"))
    train_loop(barely_moving, *splits, started, initial_weights=trained)
    # One step this small leaves them as they were: the source's weights, and its val accuracy.
    assert started.reports[0]["val_top1"] == pytest.approx(source.reports[-1]["val_top1"], abs=0.01)
    assert all(torch.allclose(started.last_checkpoint["model"][k], trained[k], atol=1e-6) for k in trained)

    # A run that resumes from its own checkpoint continues from it, not from the initial weights.
    random_start = run(small(1), splits)
    resumed = LocalSession(device=torch.device("cpu"))
    resumed.last_checkpoint = copy.deepcopy(random_start.last_checkpoint)
    train_loop(small(2), *splits, resumed, initial_weights=trained)
    assert without_time(resumed.reports) == without_time(source.reports[1:])  # `source` ran small(2) uninterrupted
