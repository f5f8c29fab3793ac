"""`mixer <command> [key.sub=value ...]`: parse arguments, load the config, make one call.

These are the commands the dvc.yaml stages run. Expected failures (bad params, bad data, a missing
model) print one line and exit non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mixer import config
from mixer.config import Config


def _ingest(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import data

    out = data.ingest(cfg.data)
    print(f"prepared {out}: {json.dumps(data.load_meta(out)['counts'])}")


def _train(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import training

    result = training.fit(cfg)
    best = result.history[result.best_epoch - 1]
    print(f"best epoch {result.best_epoch}/{len(result.history)}: val top1 {best['val_top1']:.2%} "
          f"top5 {best['val_top5']:.2%} loss {best['val_loss']:.4f} -> {result.models_dir}")


def _evaluate(cfg: Config, args: argparse.Namespace) -> None:
    from mixer import reports

    metrics = reports.evaluate_models(cfg, models_dir=args.weights)
    print(f"test top1 {metrics['top1']:.2%} top5 {metrics['top5']:.2%} loss {metrics['loss']:.4f} "
          f"({metrics['count']} images) -> {cfg.eval.metrics_dir / 'eval.json'}")


def _info(cfg: Config, args: argparse.Namespace) -> None:
    from mixer.model import build_model, count_parameters, forward_flops

    m = cfg.model
    print(f"preset {m.preset}: patch {m.patch_size} ({m.num_patches} patches), hidden {m.hidden_dim}, "
          f"{m.num_blocks} blocks, token MLP {m.tokens_mlp_dim}, channel MLP {m.channels_mlp_dim}, dropout {m.dropout}")
    print(f"parameters {count_parameters(build_model(m)):,}")
    print(f"forward FLOPs per image {forward_flops(m) / 1e6:.1f} M")


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], None], str]] = {
    "ingest": (_ingest, "fetch, verify and convert CIFAR-100 into data.out_dir"),
    "train": (_train, "train with Ray Train; export the best epoch to train.models_dir"),
    "evaluate": (_evaluate, "score the exported model on the test split; write metrics and plots"),
    "info": (_info, "parameters and FLOPs of the configured model"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override params.yaml")
        sub.add_argument("--params", type=Path, default=None, help="params file (default: ./params.yaml)")
        sub.add_argument("--debug", action="store_true", help="show the traceback of an error")
        if name == "evaluate":
            sub.add_argument("--weights", type=Path, default=None,
                             help="an exported model folder (default: train.models_dir)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Under `uv run`, Ray would build a fresh uv environment for its workers from the working
    # folder (tens of seconds per run); workers here use the installed environment instead.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    args = _parser().parse_args(argv)
    command, _ = COMMANDS[args.command]
    try:
        cfg = config.load(args.params, config.parse_overrides(args.overrides))
        command(cfg, args)
    except KeyboardInterrupt:
        print("mixer: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"mixer {args.command}: error: {_one_line(err)}", file=sys.stderr)
        if not isinstance(err, ValueError):  # our own errors are ValueErrors that say what to do
            print("(rerun with --debug for the traceback)", file=sys.stderr)
        return 2 if isinstance(err, config.ConfigError) else 1
    return 0


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
