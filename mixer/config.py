"""params.yaml -> frozen, validated dataclasses.

The only module that reads params.yaml or environment variables. Every path is resolved to an
absolute one here, because Ray Train workers run in a working directory of their own.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

PARAMS_FILE = "params.yaml"

# Air-gapped machines point ingestion at a mirror without editing the versioned params.
ENV_DATA_URL = "MIXER_DATA_URL"
ENV_DATA_MD5 = "MIXER_DATA_MD5"
# MLflow's own variable: a tracking server (http://...) instead of the project's SQLite file.
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
# Ray's own variable: the cluster to run on, instead of ray.address in params.yaml.
ENV_RAY_ADDRESS = "RAY_ADDRESS"


class ConfigError(ValueError):
    """A bad params file, override or value; the message is one line naming the key."""

    def __init__(self, message: str) -> None:
        # Keys and values come from the user: a line break in one is written as its escape.
        super().__init__("".join(c.encode("unicode_escape").decode("ascii") if c in _LINE_BREAKS else c
                                 for c in message))


_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on


def _check(predicate: Callable[[Any], bool], requirement: str) -> dict[str, Any]:
    """Field metadata: a range or choice check with the words used in the error."""
    return {"check": (predicate, requirement)}


def _positive() -> dict[str, Any]:
    return _check(lambda v: v > 0, "must be > 0")


def _non_negative() -> dict[str, Any]:
    return _check(lambda v: v >= 0, "must be >= 0")


def _fraction() -> dict[str, Any]:
    return _check(lambda v: 0 <= v < 1, "must be in [0, 1)")


def _one_of(*choices: str) -> dict[str, Any]:
    return _check(lambda v: v in choices, f"must be one of {', '.join(choices)}")


def _seed() -> dict[str, Any]:
    return _check(lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")  # what every RNG here accepts


def _fixed(value: int, reason: str) -> dict[str, Any]:
    return _check(lambda v: v == value, f"must be {value} ({reason})")


# CIFAR-100 is fixed: 32x32 RGB images, 100 fine classes.
IMAGE_SIZE = 32
IN_CHANNELS = 3
NUM_CLASSES = 100

# `seed` is the tutorial's model (see DESIGN.md); `nano` widens the channel MLP and doubles the depth.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(patch_size=4, hidden_dim=128, num_blocks=4, tokens_mlp_dim=64, channels_mlp_dim=64, dropout=0.2),
    "nano": dict(patch_size=4, hidden_dim=128, num_blocks=8, tokens_mlp_dim=64, channels_mlp_dim=512, dropout=0.0),
}


URL_SCHEMES = ("https", "http", "file", "")  # "": a local path


@dataclass(frozen=True)
class DataConfig:
    url: str = field(metadata=_check(lambda v: urlsplit(v).scheme in URL_SCHEMES,
                                     "must be an https://, http:// or file:// URL or a local path"))
    md5: str = field(metadata=_check(lambda v: len(v) == 32 and all(c in "0123456789abcdef" for c in v),
                                     "must be 32 lowercase hex digits"))
    download_dir: Path  # cache of fetched archives, outside DVC
    out_dir: Path  # the DVC-tracked prepared arrays; each ingest replaces the folder as a whole
    val_fraction: float = field(metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    split_seed: int = field(metadata=_seed())


@dataclass(frozen=True)
class ModelConfig:
    preset: str = field(metadata=_one_of(*MODEL_PRESETS))
    patch_size: int = field(metadata=_positive())
    hidden_dim: int = field(metadata=_positive())
    num_blocks: int = field(metadata=_positive())
    tokens_mlp_dim: int = field(metadata=_positive())
    channels_mlp_dim: int = field(metadata=_positive())
    dropout: float = field(metadata=_fraction())
    image_size: int = field(default=IMAGE_SIZE, metadata=_fixed(IMAGE_SIZE, "CIFAR-100 images are 32x32"))
    in_channels: int = field(default=IN_CHANNELS, metadata=_fixed(IN_CHANNELS, "CIFAR-100 images are RGB"))
    num_classes: int = field(default=NUM_CLASSES, metadata=_fixed(NUM_CLASSES, "CIFAR-100 has 100 fine classes"))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool  # random horizontal flip, per image
    zoom: float = field(metadata=_fraction())  # random zoom in [1 - zoom, 1 + zoom], per image
    crop_padding: int = field(metadata=_check(lambda v: 0 <= v < IMAGE_SIZE, f"must be in [0, {IMAGE_SIZE})"))  # pixels
    # MixUp / CutMix: alpha of Beta(alpha, alpha) for each batch's mixing weight; 0 = off.
    mixup: float = field(default=0.0, metadata=_non_negative())
    cutmix: float = field(default=0.0, metadata=_non_negative())


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(metadata=_positive())
    batch_size: int = field(metadata=_positive())  # global: split evenly over the Ray workers
    lr: float = field(metadata=_positive())  # for the global batch
    weight_decay: float = field(metadata=_non_negative())
    schedule: str = field(metadata=_one_of("plateau", "cosine"))
    warmup_epochs: int = field(metadata=_non_negative())  # cosine only; fewer than epochs
    plateau_factor: float = field(metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    plateau_patience: int = field(metadata=_non_negative())  # epochs without val-loss gain
    early_stopping_patience: int = field(metadata=_non_negative())  # 0 = never stop early
    label_smoothing: float = field(metadata=_fraction())
    augment: AugmentConfig
    precision: str = field(metadata=_one_of("fp32", "bf16"))  # bf16 = autocast on CPU (AMX) and GPU
    compile: bool  # torch.compile the model (eager, with a warning, where it cannot compile)
    ema_decay: float = field(metadata=_fraction())  # EMA of the weights, validated and exported; 0 = off
    limit_train_batches: int = field(metadata=_non_negative())  # per epoch; 0 = no limit
    limit_eval_batches: int = field(metadata=_non_negative())  # 0 = no limit
    seed: int = field(metadata=_seed())
    models_dir: Path  # the exported best model (a DVC out); each export replaces the folder as a whole
    # A name makes `mixer train` resumable: the same name again continues from the latest Ray
    # checkpoint and the same MLflow run. null = a fresh, unique run every time.
    run_name: str | None = field(metadata=_check(
        lambda v: v is None or all(c.isalnum() or c in "-_." for c in v), "must use only letters, digits, - _ ."))
    # An exported models folder (models/, results/<name>/) whose weights start this run instead of
    # random ones: fine-tuning, or a second schedule after a finished one. Optimizer, schedule and
    # epochs start afresh; model.* must describe the same network. null = random initial weights.
    init_from: Path | None = None


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = field(metadata=_positive())
    metrics_dir: Path
    plots_dir: Path
    # Test-time augmentation: score each image as the mean of its logits and its mirror image's.
    flip_average: bool
    # The nightly check fails when the champion's test top-1 is this far (a fraction, 0.02 = two
    # points) below the top-1 recorded when it was registered.
    max_drop: float = field(metadata=_fraction())
    # A Prefect notification block told about failed nightly checks: <block-type>/<name> or <name>.
    notify_block: str | None = field(metadata=_check(
        lambda v: v is None or re.fullmatch(r"([a-z0-9-]+/)?[a-z0-9-]+", v) is not None,
        "must be <block-type>/<name> or <name> in lowercase letters, digits and -"))


@dataclass(frozen=True)
class RayConfig:
    address: str | None  # a Ray cluster (ray://host:10001 or host:6379); null = RAY_ADDRESS or local
    num_workers: int = field(metadata=_positive())
    use_gpu: bool
    cpus_per_worker: float = field(metadata=_positive())
    gpus_per_worker: float = field(metadata=_non_negative())
    storage_path: str  # checkpoints; a local folder (made absolute) or a URI such as s3://...
    max_failures: int = field(metadata=_check(lambda v: v >= -1, "must be >= -1 (-1 = retry forever)"))


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str  # sqlite:///<file> (relative to the project) or http(s)://server
    artifact_root: Path  # where experiments created here keep artifacts (file:// for every client)
    experiment: str  # training runs
    eval_experiment: str  # scheduled evaluations of the champion
    registered_model: str = field(metadata=_check(lambda v: not any(c in v for c in "/:"),
                                                  "must not contain / or : (MLflow model names)"))


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEPABLE = ("model.", "train.")  # what a trial may change; data, storage and tracking stay the sweep's


@dataclass(frozen=True)
class SweepConfig:
    num_samples: int = field(metadata=_positive())  # random draws; every grid combination is run this often
    max_concurrent_trials: int = field(metadata=_positive())  # Train runs in flight at once
    grace_period: int = field(metadata=_positive())  # ASHA: epochs every trial gets before it may be stopped
    reduction_factor: int = field(metadata=_check(lambda v: v >= 2, "must be >= 2"))  # ASHA: keep 1/factor per rung
    # {"train.lr": {"loguniform": [1e-3, 1e-2]}, "model.dropout": {"grid": [0.0, 0.1]}, ...}
    space: dict


@dataclass(frozen=True)
class Config:
    root: Path  # the project folder that holds params.yaml
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    ray: RayConfig
    mlflow: MlflowConfig
    sweep: SweepConfig

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML/JSON-able values (paths as strings)."""
        return _plain(dataclasses.asdict(self))


def load(params: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read params.yaml (default: ./params.yaml), apply `key.sub=value` overrides, validate."""
    path = Path(params or PARAMS_FILE).resolve()
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506  # a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except OSError as err:  # a folder, no permission, ...
        raise ConfigError(f"{path}: unreadable ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: line {err.line}: key {err.key!r} appears twice in one section (YAML would "
                          f"silently keep the last); keep one") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    env = {"data.url": os.environ.get(ENV_DATA_URL), "data.md5": os.environ.get(ENV_DATA_MD5),
           "mlflow.tracking_uri": os.environ.get(ENV_TRACKING_URI), "ray.address": os.environ.get(ENV_RAY_ADDRESS)}
    for key in overrides or {}:
        _check_override_key(key)
    for key, value in {**{k: v for k, v in env.items() if v}, **(overrides or {})}.items():
        _set_dotted(raw, key, value)
    return from_dict(raw, root=path.parent)


def replace(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """`cfg` with `key.sub=value` overrides applied and validated again (sweep trials use it)."""
    raw = cfg.to_dict()
    root = Path(raw.pop("root"))
    for key, value in overrides.items():
        _check_override_key(key)
        _set_dotted(raw, key, value)
    return from_dict(raw, root=root)


def from_dict(raw: Mapping[str, Any], root: Path) -> Config:
    """Validate a params mapping; `root` anchors relative paths."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    if "root" in raw:
        raise ConfigError("root: not a params key (the project root is the folder that holds params.yaml)")
    sections = {k: v for k, v in raw.items()}
    model = sections.get("model")
    if isinstance(model, dict):
        # A preset fills every model field the params leave out.
        preset = model.get("preset")
        if isinstance(preset, str) and preset in MODEL_PRESETS:
            sections["model"] = {**MODEL_PRESETS[preset], **model}
    sweep = sections.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("space"), Mapping):
        # `sweep.space.train.lr={grid: [...]}` on the command line nests by the dots: flatten it back.
        sections["sweep"] = {**sweep, "space": _flatten_space(sweep["space"])}
    config = _build(Config, {**sections, "root": str(root)}, prefix="", root=root.resolve())
    if "://" not in config.data.url:  # a local archive, relative to the project like every path
        local = str((config.root / config.data.url).resolve())
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, url=local))
    if "://" not in config.ray.storage_path:
        local = str((config.root / config.ray.storage_path).resolve())
        config = dataclasses.replace(config, ray=dataclasses.replace(config.ray, storage_path=local))
    uri = config.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: anchor it
        absolute = f"sqlite:///{(config.root / uri.removeprefix('sqlite:///')).resolve()}"
        config = dataclasses.replace(config, mlflow=dataclasses.replace(config.mlflow, tracking_uri=absolute))
    _check_output_folders(config)
    return config


class OverrideText(str):
    """A command-line value: read as the type of the key it sets (so md5 `0123...` stays a string)."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.epochs=5", "model.preset=nano"]` -> {"train.epochs": "5", "model.preset": "nano"}."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        overrides[key] = OverrideText(text)
    return overrides


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, root: Path) -> Any:
    where = prefix.rstrip(".") or "params"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            if close:
                hint = f" (did you mean {prefix}{close[0]}?)"
            else:  # maybe a key of another section (train.dropout -> model.dropout)
                hint = _did_you_mean(f"{prefix}{key}") if prefix.rstrip(".") in ("", *_known_keys()) else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            if f.default is not dataclasses.MISSING:
                continue
            raise ConfigError(f"{key}: missing")
        value = _coerce(hints[name], raw[name], key, root)
        check = f.metadata.get("check")
        if check and not check[0](value):
            typed = raw[name]
            raise ConfigError(f"{key}: {check[1]}, got {typed if isinstance(typed, OverrideText) else _show(typed)}")
        values[name] = value
    config = cls(**values)
    _cross_check(config, prefix)
    return config


def _coerce(kind: Any, value: Any, key: str, root: Path) -> Any:
    optional = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if len(optional) == 1:  # `X | None`: null (or an empty override) means "not set"
        if value is None or value == "":
            return None
        kind = optional[0]
    if isinstance(value, OverrideText):
        value = str(value) if kind in (str, Path) else _yaml_scalar(value)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, f"{key}.", root)
    if kind is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # OverflowError: an integer beyond any float
                number = math.nan
            if math.isfinite(number):
                return number
    elif kind in (str, Path):
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(f"{key}: must not contain a NUL character, got {_show(value)}")
        if isinstance(value, str) and value.strip():
            return value if kind is str else (root / value).resolve()
    expected = {int: "an integer", float: "a finite number", bool: "true or false"}.get(kind, "a non-empty string")
    raise ConfigError(f"{key}: expected {expected}, got {_show(value)}")


def _show(value: Any) -> str:
    """repr(value), cut to 60 characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  # a SafeLoader
    except (yaml.YAMLError, RecursionError):
        return text


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(f"duplicate key {key!r} on line {line}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the last
    silently, so a second `train:` section would quietly replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":  # "<<": a merge
                if key_node.value in seen:
                    raise _DuplicateKey(key_node.value, key_node.start_mark.line + 1)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _cross_check(config: Any, prefix: str) -> None:
    """Rules that involve more than one field."""
    if isinstance(config, ModelConfig) and config.image_size % config.patch_size:
        raise ConfigError(f"{prefix}patch_size: must divide the image size {config.image_size}, "
                          f"got {config.patch_size}")
    if isinstance(config, TrainConfig) and config.schedule == "cosine" and config.warmup_epochs >= config.epochs:
        raise ConfigError(f"{prefix}warmup_epochs: must be less than {prefix}epochs ({config.epochs}) with the "
                          f"cosine schedule, or the learning rate never decays, got {config.warmup_epochs}")
    if isinstance(config, RayConfig):
        if config.use_gpu and config.gpus_per_worker <= 0:
            raise ConfigError(f"{prefix}gpus_per_worker: must be > 0 when use_gpu is true, "
                              f"got {config.gpus_per_worker}")
        if not config.use_gpu and config.gpus_per_worker > 0:
            raise ConfigError(f"{prefix}gpus_per_worker: {config.gpus_per_worker:g} would be ignored: {prefix}use_gpu "
                              f"is false (workers train on CPUs); set {prefix}use_gpu=true, or gpus_per_worker=0")
    if isinstance(config, SweepConfig):
        _check_space(config.space, f"{prefix}space")
    if isinstance(config, Config):
        known = set(_leaf_keys(dataclasses.asdict(config)))
        for key in config.sweep.space:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"sweep.space.{key}: unknown key{hint}")
        workers, batch = config.ray.num_workers, config.train.batch_size
        if batch % workers:
            raise ConfigError(f"train.batch_size: must be a multiple of ray.num_workers ({workers}) so "
                              f"every worker gets the same share, got {batch}")


def _check_space(space: Mapping[str, Any], where: str) -> None:
    """Each entry: a sweepable key -> {kind: values}, e.g. {"loguniform": [1e-3, 1e-2]}."""
    for key, spec in space.items():
        if not str(key).startswith(SWEEPABLE):
            raise ConfigError(f"{where}.{key}: only {' and '.join(p + '*' for p in SWEEPABLE)} keys can be swept")
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise ConfigError(f"{where}.{key}: expected one of {{{', '.join(SEARCH_KINDS)}}}: [values], got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            types = (int,) if kind == "randint" else (int, float)
            numbers = len(values) == 2 and all(isinstance(v, types) and not isinstance(v, bool) and math.isfinite(v)
                                               for v in values)
            if not numbers or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
                raise ConfigError(f"{where}.{key}.{kind}: expected [low, high]"
                                  f"{' (integers)' if kind == 'randint' else ''} with low < high"
                                  f"{' and low > 0' if kind == 'loguniform' else ''}, got {values!r}")


def _check_output_folders(config: Config) -> None:
    """data.out_dir and train.models_dir are replaced as a whole by each ingest and each export: neither may
    hold the project, or anything else the config points at (it would be deleted with the old folder)."""
    whole = {"data.out_dir": config.data.out_dir, "train.models_dir": config.train.models_dir}
    local = {"data.url": config.data.url, "ray.storage_path": config.ray.storage_path,
             "mlflow.tracking_uri": config.mlflow.tracking_uri.removeprefix("sqlite:///")}
    others = {"data.download_dir": config.data.download_dir, "eval.metrics_dir": config.eval.metrics_dir,
              "eval.plots_dir": config.eval.plots_dir, "mlflow.artifact_root": config.mlflow.artifact_root,
              **{key: Path(value) for key, value in local.items() if "://" not in value and Path(value).is_absolute()},
              **whole}
    for key, folder in whole.items():
        if config.root.is_relative_to(folder):
            raise ConfigError(f"{key}: {folder} holds the project ({PARAMS_FILE}); each run replaces that folder "
                              f"as a whole, so give it one of its own (e.g. {_DEFAULT_FOLDERS[key]})")
        for other_key, other in others.items():
            if other_key != key and other.is_relative_to(folder):
                raise ConfigError(f"{other_key}: {other} lies inside {key} ({folder}), which each run replaces "
                                  f"as a whole; move one of them")


_DEFAULT_FOLDERS = {"data.out_dir": "data/cifar100", "train.models_dir": "models"}


@functools.cache
def _known_keys() -> tuple[str, ...]:
    """Every key params.yaml may set, sections included: data, data.url, ..., train.augment.flip, ..."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is not Config or f.name != "root":
                keys.append(prefix + f.name)
                if dataclasses.is_dataclass(hints[f.name]):
                    walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Config, "")
    return tuple(keys)


def _sections() -> set[str]:
    return {key.rpartition(".")[0] for key in _known_keys()} - {""}


def _did_you_mean(key: str) -> str:
    """ " (did you mean train.epochs?)" for an unknown dotted key (here "trian.epochs"), or "".

    Each part is matched among the keys of the section before it; a last part that matches nothing there
    is looked for in every section (train.dropout -> model.dropout).
    """
    known = _known_keys()
    parts, path = key.split("."), ""
    for part in parts:
        children = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == path]
        close = [part] if part in children else difflib.get_close_matches(part, children, n=1)
        if not close:
            elsewhere = [k for k in known if k.rpartition(".")[2] == parts[-1]]
            return f" (did you mean {elsewhere[0]}?)" if elsewhere else ""
        path = f"{path}.{close[0]}" if path else close[0]
    return f" (did you mean {path}?)" if path != key else ""


def _check_override_key(key: str) -> None:
    """An override must name a key of params.yaml (or a sweep.space entry): typos get a suggestion."""
    known = _known_keys()
    if key in known or key == "sweep.space" or key.startswith("sweep.space."):
        return
    parts = key.split(".")
    if any(".".join(parts[:i]) in known for i in range(1, len(parts))):
        return  # under a known key: _set_dotted or the section's own check says what is wrong
    raise ConfigError(f"{key}: unknown key{_did_you_mean(key)}")


def _flatten_space(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, spec in tree.items():
        spec = _parsed(spec)
        # A mapping of mappings, or one under a section name, is a level of the key ({train: {lr: {...}}}):
        # `sweep.space.train.lr=5` is then reported as train.lr's spec, not as a key "train".
        if (isinstance(spec, Mapping) and spec and not any(kind in spec for kind in SEARCH_KINDS)
                and (all(isinstance(v, Mapping) for v in spec.values()) or f"{prefix}{name}" in _sections())):
            flat.update(_flatten_space(spec, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = spec
    return flat


def _parsed(value: Any) -> Any:
    """Command-line text inside a mapping, read as YAML all the way down."""
    if isinstance(value, OverrideText):
        return _yaml_scalar(value)
    if isinstance(value, Mapping):
        return {k: _parsed(v) for k, v in value.items()}
    return value


def _leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        if isinstance(value, Mapping) and name != "space":
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
