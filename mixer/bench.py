"""`mixer bench`: the pipeline's training throughput next to a minimal plain-PyTorch loop.

Both train the same model on the same batches with the same augmentation and threads, in one
process run. The pipeline is the real thing:
- on CPU, `training.fit` through Ray Train, with MLflow logging (to a scratch SQLite store) and a
  checkpoint every epoch;
- on a GPU, the per-worker loop that Ray runs on a GPU worker, called directly, since a GPU
  machine may have no Ray.

Epoch time is wall time per epoch, validation included, for both, so the difference is what Ray,
logging, checkpointing and the loop's own bookkeeping cost. The first epoch is warm-up and is not
counted.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from mixer import config, data
from mixer.augment import augment_batch, normalize
from mixer.config import Config
from mixer.model import build_model

TRAIN_IMAGES = 45_000  # a full training epoch: the official train split minus the 10% val split


@dataclass(frozen=True)
class Figures:
    epoch_seconds: list[float]  # wall time of each counted epoch (validation included)
    train_images: int  # per epoch
    eval_images_per_s: float

    @property
    def images_per_s(self) -> float:
        # Over all counted epochs at once, not per epoch: the pipeline's epochs are stamped as the Ray
        # Train controller polls its workers (every 2 s), so each epoch's time is off by up to 2 s
        # (10-20% of a 100-batch epoch here), while their sum is off by up to 2 s once.
        return self.train_images * len(self.epoch_seconds) / float(sum(self.epoch_seconds))

    def as_dict(self) -> dict[str, Any]:
        return {"epoch_seconds": self.epoch_seconds, "train_images_per_epoch": self.train_images,
                "train_images_per_s": round(self.images_per_s, 1),
                "seconds_per_45k_epoch": round(TRAIN_IMAGES / self.images_per_s, 2),
                "eval_images_per_s": round(self.eval_images_per_s, 1),
                "seconds_per_10k_test_set": round(10_000 / self.eval_images_per_s, 3)}


def run(cfg: Config, device: str, epochs: int, batches: int, synthetic: bool, out: Path) -> dict[str, Any]:
    """Measure both paths; write the JSON to `out` and return it."""
    cfg = config.replace(cfg, {"train.epochs": epochs, "train.limit_train_batches": batches,
                               "train.early_stopping_patience": 0})
    train, val, mean, std = splits(cfg, synthetic)
    threads = max(1, int(cfg.ray.cpus_per_worker)) if device == "cpu" else torch.get_num_threads()
    plain = plain_loop(cfg, train, val, mean, std, torch.device(device), threads)
    pipeline = pipeline_loop(cfg, train, val, mean, std, device)
    result = {
        "preset": cfg.model.preset, "device": device, "hardware": hardware(device), "threads": threads,
        "batch_size": cfg.train.batch_size, "precision": cfg.train.precision, "synthetic_data": synthetic,
        "epochs_counted": epochs - 1, "pipeline": pipeline.as_dict(), "plain": plain.as_dict(),
        "pipeline_over_plain": round(pipeline.images_per_s / plain.images_per_s, 3),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    rows = [f"{result['preset']} on {result['device']} ({result['hardware']}), batch {result['batch_size']}, "
            f"{result['precision']}, {result['threads']} threads",
            f"{'path':<10} {'train img/s':>12} {'s / 45k epoch':>14} {'eval img/s':>11}"]
    for path in ("pipeline", "plain"):
        f = result[path]
        rows.append(f"{path:<10} {f['train_images_per_s']:>12,.0f} {f['seconds_per_45k_epoch']:>14.1f} "
                    f"{f['eval_images_per_s']:>11,.0f}")
    rows.append(f"pipeline / plain: {result['pipeline_over_plain']:.3f}")
    return "\n".join(rows)


def plain_loop(cfg: Config, train: data.Split, val: data.Split, mean: list[float], std: list[float],
               device: torch.device, threads: int) -> Figures:
    """The reference: the fewest lines that train this model on these batches, nothing else."""
    torch.set_num_threads(threads)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    images = torch.as_tensor(train.images, device=device)
    labels = torch.as_tensor(train.fine_labels, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    seconds = []
    for epoch in range(t.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(images), device=device)
        for step in range(t.limit_train_batches):
            idx = order[step * t.batch_size:(step + 1) * t.batch_size]
            _train_step(model, optimizer, images[idx], labels[idx], mean, std, cfg, autocast)
        eval_seconds = _evaluate(model, val, mean, std, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch > 0:
            seconds.append(time.perf_counter() - started)
    return Figures(seconds, t.limit_train_batches * t.batch_size, len(val) / eval_seconds)


def pipeline_loop(cfg: Config, train: data.Split, val: data.Split, mean: list[float], std: list[float],
                  device: str) -> Figures:
    """The pipeline's own path for this device (see the module docstring)."""
    t = cfg.train
    if device != "cpu":
        from mixer import loop  # no Ray here: a GPU machine may have nothing but torch

        stamps: list[float] = []

        class Clocked(loop.LocalSession):
            def report(self, metrics: dict[str, float], checkpoint: dict[str, Any] | None) -> None:
                stamps.append(time.perf_counter())
                super().report(metrics, checkpoint)

        session = Clocked(device=torch.device(device))
        loop.train_loop(cfg, train, val, mean, std, session)
        model = build_model(cfg.model).to(device)
        model.load_state_dict(session.last_checkpoint["model"])
        return Figures(list(np.diff(stamps)), t.limit_train_batches * t.batch_size,
                       len(val) / _evaluate(model, val, mean, std, cfg, torch.device(device)))

    import ray

    from mixer import export, training

    with tempfile.TemporaryDirectory(prefix="mixer-bench-") as scratch:
        folder = Path(scratch)
        cfg = config.replace(cfg, {"train.models_dir": str(folder / "models"),
                                   "ray.storage_path": str(folder / "ray"),
                                   "mlflow.tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
                                   "mlflow.artifact_root": str(folder / "mlartifacts"),
                                   "mlflow.experiment": "bench"})
        training.connect(cfg)
        names = [f"class_{i}" for i in range(cfg.model.num_classes)]
        inputs = training.TrainingInputs(train=ray.put(train), val=ray.put(val),
                                         meta={"mean": mean, "std": std, "fine_label_names": names},
                                         example_images=val.images[:2].copy(), data_version=None)
        clock = folder / "clock.txt"
        result = training.fit(cfg, callbacks=[training.OnEpoch(StampTo(clock))], inputs=inputs)
        stamps = [float(line) for line in clock.read_text().split()]
        model = export.load(result.models_dir).model
        # Epoch 1 ends at the first stamp: warm-up, not counted.
        return Figures(list(np.diff(stamps)), t.limit_train_batches * t.batch_size,
                       len(val) / _evaluate(model, val, mean, std, cfg, torch.device("cpu")))


def profile(cfg: Config, train: data.Split, mean: list[float], std: list[float], device: torch.device,
            steps: int = 20) -> str:
    """Where a training step's time goes: torch.profiler over `steps` steps of the pipeline's loop
    body (after as many warm-up steps), the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from mixer.loop import adamw

    t = cfg.train
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # as a Ray worker with those CPUs
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    optimizer = adamw(model.parameters(), t.lr, t.weight_decay, device)
    images = torch.as_tensor(train.images[: 2 * steps * t.batch_size], device=device)
    labels = torch.as_tensor(train.fine_labels[: 2 * steps * t.batch_size], device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    batches = len(images) // t.batch_size  # a small split is cycled through
    if batches == 0:
        raise ValueError(f"the train split holds {len(images)} images, less than one batch of {t.batch_size}")

    def step(i: int) -> None:
        idx = slice(i % batches * t.batch_size, (i % batches + 1) * t.batch_size)
        _train_step(model, optimizer, images[idx], labels[idx], mean, std, cfg, autocast)

    model.train()
    for i in range(steps):
        step(i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for i in range(steps, 2 * steps):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=20)


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor, mean: list[float], std: list[float], cfg: Config,
                autocast: torch.autocast) -> None:
    """One plain step on a uint8 batch; the labelled ranges name its parts in a profile (no-ops otherwise)."""
    with record_function("augment"):
        x = augment_batch(normalize(images, mean, std), cfg.train.augment)
    with autocast, record_function("forward"):
        loss = F.cross_entropy(model(x), labels)
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        optimizer.step()


@dataclass(frozen=True)
class StampTo:
    """On the Ray Train controller: appends the time of each epoch's report to a file."""

    path: Path

    def __call__(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(f"{time.perf_counter()}\n")  # CLOCK_MONOTONIC: comparable across processes of a host


@torch.no_grad()
def _evaluate(model: torch.nn.Module, val: data.Split, mean: list[float], std: list[float], cfg: Config,
              device: torch.device) -> float:
    """Seconds to score the whole split (the test split has the same 10,000 images as val here)."""
    model.eval()
    started = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    for start in range(0, len(val), cfg.eval.batch_size):
        x = normalize(torch.as_tensor(val.images[start:start + cfg.eval.batch_size], device=device), mean, std)
        with autocast:
            model(x).float().argmax(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def splits(cfg: Config, synthetic: bool) -> tuple[data.Split, data.Split, list[float], list[float]]:
    """The prepared train/val splits, or random images of the same shapes (throughput only)."""
    if not synthetic:
        meta = data.load_meta(cfg.data.out_dir)
        return (data.load_split(cfg.data.out_dir, "train"), data.load_split(cfg.data.out_dir, "val"),
                meta["mean"], meta["std"])
    rng = np.random.default_rng(0)

    def split(n: int) -> data.Split:
        labels = rng.integers(0, 100, n)
        return data.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels, labels // 5)

    return split(TRAIN_IMAGES), split(5_000), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"
