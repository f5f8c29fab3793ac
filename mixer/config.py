"""params.yaml -> frozen, validated dataclasses.

The only module that reads params.yaml or environment variables. Every path is resolved to an
absolute one here, because Ray Train workers run in a working directory of their own.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# CIFAR-100 is fixed: 32x32 RGB images, 100 fine classes.
IMAGE_SIZE = 32
IN_CHANNELS = 3
NUM_CLASSES = 100

# `seed` is the tutorial's model (see DESIGN.md); `nano` widens the channel MLP and doubles the depth.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(patch_size=4, hidden_dim=128, num_blocks=4, tokens_mlp_dim=64, channels_mlp_dim=64, dropout=0.2),
    "nano": dict(patch_size=4, hidden_dim=128, num_blocks=8, tokens_mlp_dim=64, channels_mlp_dim=512, dropout=0.0),
}


@dataclass(frozen=True)
class DataConfig:
    url: str  # https://, http://, file:// or a local path
    md5: str = field(metadata=_check(lambda v: len(v) == 32 and all(c in "0123456789abcdef" for c in v),
                                     "must be 32 lowercase hex digits"))
    download_dir: Path  # cache of fetched archives, outside DVC
    out_dir: Path  # the DVC-tracked prepared arrays
    val_fraction: float = field(metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    split_seed: int = field(metadata=_non_negative())


@dataclass(frozen=True)
class ModelConfig:
    preset: str = field(metadata=_one_of(*MODEL_PRESETS))
    patch_size: int = field(metadata=_positive())
    hidden_dim: int = field(metadata=_positive())
    num_blocks: int = field(metadata=_positive())
    tokens_mlp_dim: int = field(metadata=_positive())
    channels_mlp_dim: int = field(metadata=_positive())
    dropout: float = field(metadata=_fraction())
    image_size: int = IMAGE_SIZE
    in_channels: int = IN_CHANNELS
    num_classes: int = NUM_CLASSES

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool  # random horizontal flip, per image
    zoom: float = field(metadata=_fraction())  # random zoom in [1 - zoom, 1 + zoom], per image
    crop_padding: int = field(metadata=_non_negative())  # random shift of up to this many pixels


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(metadata=_positive())
    batch_size: int = field(metadata=_positive())  # global: split evenly over the Ray workers
    lr: float = field(metadata=_positive())  # for the global batch
    weight_decay: float = field(metadata=_non_negative())
    schedule: str = field(metadata=_one_of("plateau", "cosine"))
    warmup_epochs: int = field(metadata=_non_negative())  # cosine only
    plateau_factor: float = field(metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    plateau_patience: int = field(metadata=_non_negative())  # epochs without val-loss gain
    early_stopping_patience: int = field(metadata=_non_negative())  # 0 = never stop early
    label_smoothing: float = field(metadata=_fraction())
    augment: AugmentConfig
    precision: str = field(metadata=_one_of("fp32", "bf16"))  # bf16 = autocast on CPU (AMX) and GPU
    limit_train_batches: int = field(metadata=_non_negative())  # per epoch; 0 = no limit
    limit_eval_batches: int = field(metadata=_non_negative())  # 0 = no limit
    seed: int = field(metadata=_non_negative())
    models_dir: Path  # the exported best model (a DVC out)
    # A name makes `mixer train` resumable: the same name again continues from the latest Ray
    # checkpoint and the same MLflow run. null = a fresh, unique run every time.
    run_name: str | None = field(metadata=_check(
        lambda v: v is None or all(c.isalnum() or c in "-_." for c in v), "must use only letters, digits, - _ ."))


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = field(metadata=_positive())
    metrics_dir: Path
    plots_dir: Path
    # The nightly check fails when the champion's test top-1 is this far (a fraction, 0.02 = two
    # points) below the top-1 recorded when it was registered.
    max_drop: float = field(metadata=_fraction())
    notify_block: str | None  # a Prefect notification block told about failed nightly checks


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
    registered_model: str


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
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    env = {"data.url": os.environ.get(ENV_DATA_URL), "data.md5": os.environ.get(ENV_DATA_MD5),
           "mlflow.tracking_uri": os.environ.get(ENV_TRACKING_URI), "ray.address": os.environ.get(ENV_RAY_ADDRESS)}
    for key, value in {**{k: v for k, v in env.items() if v}, **(overrides or {})}.items():
        _set_dotted(raw, key, value)
    return from_dict(raw, root=path.parent)


def replace(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """`cfg` with `key.sub=value` overrides applied and validated again (sweep trials use it)."""
    raw = cfg.to_dict()
    root = Path(raw.pop("root"))
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    return from_dict(raw, root=root)


def from_dict(raw: Mapping[str, Any], root: Path) -> Config:
    """Validate a params mapping; `root` anchors relative paths."""
    sections = {k: v for k, v in raw.items()}
    model = sections.get("model")
    if isinstance(model, dict):
        # A preset fills every model field the params leave out.
        preset = model.get("preset")
        if preset in MODEL_PRESETS:
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
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
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
            raise ConfigError(f"{key}: {check[1]}, got {typed if isinstance(typed, OverrideText) else repr(typed)}")
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str) and value:
            return value
    elif kind is Path:
        if isinstance(value, str) and value:
            return (root / value).resolve()
    expected = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a non-empty string")
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _cross_check(config: Any, prefix: str) -> None:
    """Rules that involve more than one field."""
    if isinstance(config, ModelConfig) and config.image_size % config.patch_size:
        raise ConfigError(f"{prefix}patch_size: must divide the image size {config.image_size}, "
                          f"got {config.patch_size}")
    if isinstance(config, RayConfig):
        if config.use_gpu and config.gpus_per_worker <= 0:
            raise ConfigError(f"{prefix}gpus_per_worker: must be > 0 when use_gpu is true, "
                              f"got {config.gpus_per_worker}")
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
            numbers = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numbers or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
                raise ConfigError(f"{where}.{key}.{kind}: expected [low, high] with low < high"
                                  f"{' and low > 0' if kind == 'loguniform' else ''}, got {values!r}")


def _flatten_space(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, spec in tree.items():
        spec = _parsed(spec)
        # A mapping of mappings is a level of the key ({train: {lr: {...}}}); anything else is a spec.
        if isinstance(spec, Mapping) and spec and all(isinstance(v, Mapping) for v in spec.values()):
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
