"""`mixer <command> [key.sub=value ...]`: parse arguments, load the config, make one call.

These are the commands the dvc.yaml stages run. Expected failures (bad params, bad data, a missing
model) print one line and exit non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mixer import config, stack
from mixer.background import Background
from mixer.config import Config
from mixer.redaction import redact

if TYPE_CHECKING:
    from mixer import training


def _ingest(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import data

    out = data.ingest(cfg.data)
    print(f"prepared {out}: {json.dumps(data.load_meta(out)['counts'])}")


# What `mixer train`'s driver runs: the training code, and the data check and tracking that only the
# driver needs (Ray workers import mixer.training alone).
TRAIN_DRIVER_MODULES = ("mixer.training", "mixer.versioning", "mixer.tracking")


def _import_and_read(cfg: Config) -> training.LocalInputs:
    for module in TRAIN_DRIVER_MODULES:
        importlib.import_module(module)
    from mixer import training

    return training.read_inputs(cfg)


def _train(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import ray_cluster

    # Starting Ray takes ~6 s on 2 cores, mostly waiting on its processes. Meanwhile another thread
    # imports torch, Ray Train, MLflow and DVC (~5 s), checks the data against dvc.lock and reads the
    # splits (0.4-1.9 s): none of it needs Ray. The MLflow run waits for the cluster checks in
    # connect(), which refuse an impossible config before any run is recorded.
    reader = Background(_import_and_read, cfg, name="mixer-read")
    ray_cluster.connect(cfg)
    local_inputs = reader.result()
    from mixer import training

    result = training.fit(cfg, inputs=training.load_inputs(cfg, local_inputs))
    best = result.best
    print(f"best epoch {result.best_epoch}/{len(result.history)}: val top1 {best['val_top1']:.2%} "
          f"top5 {best['val_top5']:.2%} loss {best['val_loss']:.4f} -> {result.models_dir} "
          f"(MLflow run {result.run_id})")


def _train_offline(cfg: Config, args: argparse.Namespace) -> None:
    import torch

    from mixer import offline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = offline.train_offline(cfg, device, args.checkpoints)
    best = result.best
    print(f"best epoch {result.best_epoch}/{len(result.history)}: val top1 {best['val_top1']:.2%} "
          f"top5 {best['val_top5']:.2%} loss {best['val_loss']:.4f} -> {result.models_dir} (no MLflow run: "
          f"`mixer evaluate --weights {result.models_dir}`, then `mixer register --from {result.models_dir}` "
          f"where MLflow is)")


def _sweep(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import sweep

    result = sweep.run(cfg, out_dir=args.out or cfg.root / "runs", name=args.name)
    for trial in result.trials:
        overrides = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial["overrides"].items())
        loss = f"{trial['val_loss']:.4f}" if "val_loss" in trial else "-"
        print(f"{trial['trial']}  {trial['status']:<15} best val loss {loss}  {overrides}")
    v = result.version
    print(f"best trial {result.best_trial} -> {result.models_dir}; registered {cfg.mlflow.registered_model} "
          f"version {v.version} @challenger (test top1 {v.test_top1:.2%}); MLflow parent run {result.parent_run_id}")


def _evaluate(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import reports

    metrics = reports.evaluate_models(cfg, models_dir=args.weights)
    print(f"test top1 {metrics['top1']:.2%} top5 {metrics['top5']:.2%} loss {metrics['loss']:.4f} "
          f"({metrics['count']} images) -> {cfg.eval.metrics_dir / 'eval.json'}")


def _register(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import publish, registry, versioning

    if args.best:
        info = registry.register_best(cfg, versioning.check_data_matches_lock(cfg.root, cfg.data.out_dir))
        if info is None:
            raise registry.RegistryError("no finished training run with a logged model on this data version; "
                                         "run `mixer train` first")
        publish.write_registered(cfg, info)
    else:
        info = publish.register_models(cfg, args.source)
    state = "registered" if info.created else "already registered as"
    print(f"{state} {cfg.mlflow.registered_model} version {info.version} (run {info.run_id}) "
          f"aliases: {', '.join(info.aliases) or '-'}")


def _promote(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import registry

    _show_promotion(registry.promote(cfg, version=args.version, force=args.force))


def _rollback(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import registry

    _show_promotion(registry.rollback(cfg))


def _show_promotion(promotion: object) -> None:
    print(promotion.table())  # type: ignore[attr-defined]
    print(promotion.reason)  # type: ignore[attr-defined]


def _lineage(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import registry

    print(registry.lineage(cfg, args.reference, workspace=cfg))


def _predict(cfg: Config, args: argparse.Namespace) -> None:
    import numpy as np

    from mixer import registry, serving

    images = np.stack([serving.read_image(path) for path in args.images])  # check every file first
    model = serving.load(registry.load_uri(cfg, str(args.version) if args.version else "champion"),
                         cfg.mlflow.tracking_uri)
    for path, top in zip(args.images, serving.top_k(model, images), strict=True):
        print(f"{path}: " + ", ".join(f"{label} {p:.1%}" for label, p in top))


def _server(cfg: Config, args: argparse.Namespace) -> None:
    uri = cfg.mlflow.tracking_uri
    if not uri.startswith("sqlite:"):
        raise config.ConfigError(f"mlflow.tracking_uri: the server serves the project's SQLite store, got {uri}")
    # No artifact proxying: runs record file:// artifact paths that direct SQLite clients read too.
    argv = ["mlflow", "server", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
            "--default-artifact-root", cfg.mlflow.artifact_root.as_uri(), "--no-serve-artifacts"]
    print(" ".join(argv), flush=True)
    os.execv(shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow"), argv)


def _bench(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import bench

    if args.preset:
        cfg = config.replace(cfg, {"model.preset": args.preset})
    if args.profile:
        import torch

        train, _, mean, std = bench.splits(cfg, args.synthetic)
        print(bench.profile(cfg, train, mean, std, torch.device(args.device)))
        return
    out = args.out or cfg.root / "bench" / f"{cfg.model.preset}-{args.device.replace(':', '')}.json"
    print(bench.table(bench.run(cfg, args.device, args.epochs, args.batches, args.synthetic, out)))
    print(f"-> {out}")


def _result(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import bench, results

    results_dir = _results_dir(cfg, args)
    r = results.record(cfg, args.name, args.weights or cfg.train.models_dir, args.train_command, args.wall_seconds,
                       args.hardware or bench.hardware("cpu"), results_dir)
    print(f"{r['name']}: test top1 {r['test_top1']:.2%} top5 {r['test_top5']:.2%} -> {results_dir / r['name']}")


def _results(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import results

    print(results.table(results.load_all(_results_dir(cfg, args))))


def _results_dir(cfg: Config, args: argparse.Namespace) -> Path:
    return args.results_dir or cfg.root / "results"


def _info(cfg: Config, args: argparse.Namespace) -> None:
    from mixer.model import build_model, count_parameters, forward_flops

    m = cfg.model
    print(f"preset {m.preset}: patch {m.patch_size} ({m.num_patches} patches), hidden {m.hidden_dim}, "
          f"{m.num_blocks} blocks, token MLP {m.tokens_mlp_dim}, channel MLP {m.channels_mlp_dim}, dropout {m.dropout}")
    print(f"parameters {count_parameters(build_model(m)):,}")
    print(f"forward FLOPs per image {forward_flops(m) / 1e6:.1f} M")


@dataclass(frozen=True)
class Command:
    run: Callable[[Config, argparse.Namespace], None]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = field(default=lambda parser: None)


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None, help="an exported model folder (default: train.models_dir)")


def _train_offline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is one)")
    parser.add_argument("--checkpoints", type=Path, default=None, metavar="DIR", help="where the checkpoints go; "
                        "the same folder again resumes (default: runs/offline/<train.run_name>)")


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="the best trial's model and metrics go to "
                        "OUT/<name>/ (default: runs/ in the project; never the DVC outputs)")
    parser.add_argument("--name", default=None, help="the sweep's name (default: sweep-<time>)")


def _register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--best", action="store_true",
                        help="register the run with the best val top-1 on this data version instead of models/")
    parser.add_argument("--from", dest="source", type=Path, default=None, metavar="DIR",
                        help="an exported model folder (default: train.models_dir); one trained while MLflow "
                             "was unreachable is logged to MLflow first")


def _promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=int, default=None, help="promote this version (default: the challenger)")
    parser.add_argument("--force", action="store_true", help="skip the test top-1 gate")


def _lineage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", nargs="?", default="champion", help="a version number or an alias")


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files, any size")
    parser.add_argument("--version", type=int, default=None, help="a registered version (default: the champion)")


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("seed", "nano"), default=None, help="model preset (default: model.preset)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (the worker loop without Ray)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per path; the first is warm-up, not counted")
    parser.add_argument("--batches", type=int, default=50, help="training batches per epoch")
    parser.add_argument("--synthetic", action="store_true", help="random images of the CIFAR shapes instead of "
                        "data.out_dir (throughput only)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default: bench/<preset>-<device>.json)")
    parser.add_argument("--profile", action="store_true", help="instead: torch.profiler's top operators over "
                        "20 training steps of the loop's body")


def _result_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the result's folder under --results-dir (e.g. seed, best)")
    parser.add_argument("--weights", type=Path, default=None, help="an exported model folder (default: "
                        "train.models_dir); copied to results/NAME unless it is that folder")
    # Not dest "command": that is the subcommand's own name.
    parser.add_argument("--command", dest="train_command", required=True,
                        help="the command that trained it, as anyone would rerun it")
    parser.add_argument("--wall-seconds", type=float, default=None, help="training wall time, every resumed part summed")
    parser.add_argument("--hardware", default=None, help="where it trained (default: this machine's CPU)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results/ in the project")


def _results_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results/ in the project")


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)


COMMANDS: dict[str, Command] = {
    "ingest": Command(_ingest, "fetch, verify and convert CIFAR-100 into data.out_dir"),
    "train": Command(_train, "train with Ray Train, tracked in MLflow; export the best epoch to train.models_dir"),
    "train-offline": Command(_train_offline, "train on this machine's device with no Ray, MLflow or DVC (a "
                             "machine with torch alone); export like train, for `register --from` later",
                             _train_offline_arguments),
    "sweep": Command(_sweep, "search sweep.space with Ray Tune (ASHA), each trial a Ray Train run; register "
                     "the best trial @challenger", _sweep_arguments),
    "evaluate": Command(_evaluate, "score the exported model on the test split; write metrics and plots",
                        _evaluate_arguments),
    "register": Command(_register, "register the model in models/ as a new version @challenger",
                        _register_arguments),
    "promote": Command(_promote, "move @champion to the challenger if its test top-1 is higher", _promote_arguments),
    "rollback": Command(_rollback, "give @champion back to @previous-champion"),
    "lineage": Command(_lineage, "where a registered version came from and how to reproduce it",
                       _lineage_arguments),
    "predict": Command(_predict, "top-5 labels of images from the champion (or a version)", _predict_arguments),
    "server": Command(_server, "the MLflow server and UI over the project's store, on 127.0.0.1",
                      _server_arguments),
    "result": Command(_result, "record an exported model as results/NAME: test figures, recipe, time, command",
                      _result_arguments),
    "results": Command(_results, "the results table (Markdown) from results/*/result.json", _results_arguments),
    "info": Command(_info, "parameters and FLOPs of the configured model"),
    "bench": Command(_bench, "training and evaluation images/s of the pipeline next to a plain PyTorch loop",
                     _bench_arguments),
    "stack": Command(stack.command, "start, stop or check the local Prefect server, worker and MLflow server",
                     stack.arguments),
}


# `key.sub=value` anywhere on the line is an override; everything else is for argparse.
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help,
                                  epilog="Any key.sub=value argument overrides params.yaml for this run.")
        command.arguments(sub)
        sub.add_argument("--params", type=Path, default=None, help="params file (default: ./params.yaml)")
        sub.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A progress bar per model download would bury the one line `mixer predict` prints per image.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A failing MLflow server costs seconds, not MLflow's default minutes of retries, before
    # training carries on untracked (mixer/tracking.py).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [item for item in argv if OVERRIDE.match(item)]
    args = _parser().parse_args([item for item in argv if not OVERRIDE.match(item)])
    command = COMMANDS[args.command]
    received: list[int] = []
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a scheduler, `kill`, a container stop) ends a run as cleanly as Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda signum, frame: _interrupt(received, signum))
    try:
        cfg = config.load(args.params, config.parse_overrides(overrides))
        command.run(cfg, args)
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        print(f"mixer {args.command}: {' '.join(str(err).split()) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(err, "signum", received[0] if received else signal.SIGINT)
    except Exception as err:
        if args.debug:
            raise
        print(f"mixer {args.command}: error: {_one_line(err)}", file=sys.stderr)
        if not isinstance(err, ValueError):  # our own errors are ValueErrors that say what to do
            print("(rerun with --debug for the traceback)", file=sys.stderr)
        return 2 if isinstance(err, config.ConfigError) else 1
    return 0


def _interrupt(received: list[int], signum: int) -> None:
    received.append(signum)
    raise KeyboardInterrupt


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"
    return redact(text)  # MLflow's errors quote the tracking URI, credentials included


if __name__ == "__main__":
    sys.exit(main())
