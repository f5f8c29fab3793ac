"""params.yaml -> Config: every path absolute, every bad value a one-line error naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mixer import config

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"


def test_project_params_load_with_absolute_paths() -> None:
    cfg = config.load(PARAMS)
    assert cfg.root == REPO
    assert cfg.model.preset == "seed" and cfg.model.hidden_dim == 128 and cfg.model.dropout == 0.2
    assert cfg.train.lr == 5.0e-3 and cfg.train.batch_size == 128
    for path in (cfg.data.out_dir, cfg.data.download_dir, cfg.train.models_dir, cfg.eval.metrics_dir):
        assert path.is_absolute() and path.is_relative_to(REPO)
    assert Path(cfg.ray.storage_path).is_absolute()


def test_config_is_frozen() -> None:
    cfg = config.load(PARAMS)
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_overrides_parse_yaml_scalars_and_apply() -> None:
    overrides = config.parse_overrides(["train.epochs=5", "model.preset=nano", "train.lr=1e-3",
                                        "ray.use_gpu=false"])
    cfg = config.load(PARAMS, overrides)
    assert cfg.train.epochs == 5 and cfg.train.lr == 1e-3  # "1e-3" (PyYAML's string) is read as the number
    assert cfg.ray.use_gpu is False
    assert cfg.model.channels_mlp_dim == 512 and cfg.model.num_blocks == 8  # the nano preset fills in


def test_an_override_is_read_as_the_type_of_its_key() -> None:
    md5 = "0123456789" * 3 + "01"  # all digits: YAML alone would read it as an integer
    cfg = config.load(PARAMS, config.parse_overrides([f"data.md5={md5}", "data.out_dir=007"]))
    assert cfg.data.md5 == md5 and cfg.data.out_dir.name == "007"
    with pytest.raises(config.ConfigError, match="train.epochs: expected an integer, got 'many'"):
        config.load(PARAMS, config.parse_overrides(["train.epochs=many"]))


def test_a_model_field_overrides_its_preset() -> None:
    cfg = config.load(PARAMS, {"model.preset": "nano", "model.hidden_dim": 256})
    assert cfg.model.hidden_dim == 256 and cfg.model.num_blocks == 8


def test_environment_points_ingestion_at_a_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(config.ENV_DATA_URL, "mirror/cifar.tar.gz")
    monkeypatch.setenv(config.ENV_DATA_MD5, "0" * 32)
    cfg = config.load(PARAMS)
    assert cfg.data.url == str(REPO / "mirror" / "cifar.tar.gz")  # local paths resolve like every path
    assert cfg.data.md5 == "0" * 32


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.lr": 0}, "train.lr: must be > 0, got 0"),
    ({"train.lr": -1.0}, "train.lr: must be > 0, got -1.0"),
    ({"train.batch_size": 0}, "train.batch_size: must be > 0, got 0"),
    ({"train.batch_size": 127, "ray.num_workers": 2}, "train.batch_size: must be a multiple of ray.num_workers"),
    ({"model.patch_size": 5}, "model.patch_size: must divide the image size 32, got 5"),
    ({"model.dropout": 1.0}, "model.dropout: must be in [0, 1), got 1.0"),
    ({"model.dropout": -0.1}, "model.dropout: must be in [0, 1), got -0.1"),
    ({"model.preset": "huge"}, "model.preset: must be one of seed, nano, got 'huge'"),
    ({"train.epochs": "ten"}, "train.epochs: expected an integer, got 'ten'"),
    ({"train.epochs": 2.5}, "train.epochs: expected an integer, got 2.5"),
    ({"train.epochs": True}, "train.epochs: expected an integer, got True"),
    ({"ray.use_gpu": "yes"}, "ray.use_gpu: expected true or false, got 'yes'"),
    ({"train.schedule": "step"}, "train.schedule: must be one of plateau, cosine, got 'step'"),
    ({"train.augment.zoom": 1.5}, "train.augment.zoom: must be in [0, 1), got 1.5"),
    ({"data.md5": "abc"}, "data.md5: must be 32 lowercase hex digits, got 'abc'"),
    ({"data.val_fraction": 0}, "data.val_fraction: must be in (0, 1), got 0"),
    ({"ray.use_gpu": True, "ray.gpus_per_worker": 0}, "ray.gpus_per_worker: must be > 0 when use_gpu is true"),
    ({"train.batch_sise": 64}, "train.batch_sise: unknown key (did you mean train.batch_size?)"),
    ({"trian.epochs": 1}, "trian.epochs: unknown key (did you mean train.epochs?)"),
    ({"train.augment": 3}, "train.augment: expected a section (mapping), got 3"),
])
def test_bad_values_stop_with_one_line_naming_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(PARAMS, overrides)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    params = yaml.safe_load(PARAMS.read_text())
    del params["train"]["epochs"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(config.ConfigError, match=r"^train\.epochs: missing$"):
        config.load(tmp_path / "params.yaml")


@pytest.mark.parametrize("text", ["train: [1, 2", "- a list\n- not sections\n"])
def test_a_broken_params_file_is_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(tmp_path / "params.yaml")
    assert "params.yaml" in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="params file not found"):
        config.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("item", ["train.epochs", "=5", "train..epochs=5"])
def test_malformed_overrides(item: str) -> None:
    with pytest.raises(config.ConfigError, match="expected key.sub=value"):
        config.parse_overrides([item])


def test_to_dict_round_trips_through_yaml() -> None:
    cfg = config.load(PARAMS)
    plain = cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert plain["train"]["augment"]["zoom"] == 0.2 and plain["data"]["out_dir"] == str(cfg.data.out_dir)


@pytest.mark.parametrize(("space", "message"), [
    ({"train.lrr": {"grid": [1e-3]}}, r"sweep.space.train.lrr: unknown key \(did you mean train.lr\?\)"),
    ({"data.url": {"choice": ["x"]}}, r"sweep.space.data.url: only model.\* and train.\* keys can be swept"),
    ({"train.lr": {"loguniform": [0, 1]}}, r"train.lr.loguniform: expected \[low, high\] with low < high and low > 0"),
    ({"train.lr": {"uniform": [2, 1]}}, r"train.lr.uniform: expected \[low, high\] with low < high"),
    ({"train.lr": {"normal": [0, 1]}}, r"train.lr: expected one of \{grid, choice, uniform, loguniform, randint\}"),
    ({"train.lr": {"grid": []}}, r"train.lr.grid: expected a non-empty list"),
])
def test_a_bad_sweep_space_is_one_line(space: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(PARAMS, {"sweep.space": space})


def test_a_sweep_dimension_can_be_set_on_the_command_line() -> None:
    cfg = config.load(PARAMS, config.parse_overrides(["sweep.space.model.hidden_dim={choice: [64, 96]}"]))
    assert cfg.sweep.space["model.hidden_dim"] == {"choice": [64, 96]}
    assert "train.lr" in cfg.sweep.space  # the other dimensions stay


def test_replace_applies_and_validates_overrides() -> None:
    cfg = config.load(PARAMS)
    assert config.replace(cfg, {"train.lr": 0.01}).train.lr == 0.01
    with pytest.raises(config.ConfigError, match="model.dropout: must be in"):
        config.replace(cfg, {"model.dropout": 2.0})


def test_ray_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert config.load(PARAMS).ray.address == "10.0.0.5:6379"
    assert config.load(PARAMS, {"ray.address": "ray://head:10001"}).ray.address == "ray://head:10001"


# --- every field checked at load: type, range, allowed values, conflicts ---------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.lr": float("nan")}, "train.lr: expected a finite number, got nan"),
    ({"train.lr": "inf"}, "train.lr: expected a finite number, got 'inf'"),
    ({"ray.cpus_per_worker": float("inf")}, "ray.cpus_per_worker: expected a finite number, got inf"),
    ({"train.weight_decay": 10 ** 400}, "train.weight_decay: expected a finite number, got 100000000000"),
    ({"model.image_size": 64}, "model.image_size: must be 32 (CIFAR-100 images are 32x32), got 64"),
    ({"model.in_channels": 1}, "model.in_channels: must be 3 (CIFAR-100 images are RGB), got 1"),
    ({"model.num_classes": 20}, "model.num_classes: must be 100 (CIFAR-100 has 100 fine classes), got 20"),
    ({"train.augment.crop_padding": 32}, "train.augment.crop_padding: must be in [0, 32), got 32"),
    ({"train.seed": 2 ** 64}, "train.seed: must be in [0, 2**32), got 18446744073709551616"),
    ({"data.split_seed": -1}, "data.split_seed: must be in [0, 2**32), got -1"),
    ({"data.url": "ftp://mirror/c.tgz"},
     "data.url: must be an https://, http:// or file:// URL or a local path, got 'ftp://mirror/c.tgz'"),
    ({"data.md5": " " * 32}, "data.md5: expected a non-empty string, got '                                '"),
    ({"data.out_dir": "data/\x00"}, r"data.out_dir: must not contain a NUL character, got 'data/\x00'"),
    ({"mlflow.experiment": ""}, "mlflow.experiment: expected a non-empty string, got ''"),
    ({"mlflow.registered_model": "team/mixer"},
     "mlflow.registered_model: must not contain / or : (MLflow model names), got 'team/mixer'"),
    ({"eval.notify_block": "Slack Alerts"}, "eval.notify_block: must be <block-type>/<name> or <name> in "
                                            "lowercase letters, digits and -, got 'Slack Alerts'"),
    ({"model.preset": ["seed"]}, "model.preset: expected a non-empty string, got ['seed']"),
    ({"sweep.space": {"train.lr": {"uniform": [0.001, float("inf")]}}},
     "sweep.space.train.lr.uniform: expected [low, high] with low < high, got [0.001, inf]"),
    ({"sweep.space": {"model.hidden_dim": {"randint": [64.5, 128]}}},
     "sweep.space.model.hidden_dim.randint: expected [low, high] (integers) with low < high, got [64.5, 128]"),
    ({"sweep.space.train.lr": 5},
     "sweep.space.train.lr: expected one of {grid, choice, uniform, loguniform, randint}: [values], got 5"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_every_field_is_checked(overrides: dict, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(PARAMS, overrides)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.schedule": "cosine", "train.warmup_epochs": 100},
     "train.warmup_epochs: must be less than train.epochs (100) with the cosine schedule, or the learning rate "
     "never decays, got 100"),
    ({"ray.use_gpu": False, "ray.gpus_per_worker": 1},
     "ray.gpus_per_worker: 1 would be ignored: ray.use_gpu is false (workers train on CPUs); set "
     "ray.use_gpu=true, or gpus_per_worker=0"),
    ({"train.batch_size": 128, "ray.num_workers": 3},
     "train.batch_size: must be a multiple of ray.num_workers (3) so every worker gets the same share, got 128"),
    ({"data.out_dir": "."}, f"data.out_dir: {REPO} holds the project (params.yaml); each run replaces that "
                            f"folder as a whole, so give it one of its own (e.g. data/cifar100)"),
    ({"train.models_dir": ".."}, f"train.models_dir: {REPO.parent} holds the project (params.yaml)"),
    ({"data.download_dir": "data/cifar100/downloads"},
     f"data.download_dir: {REPO}/data/cifar100/downloads lies inside data.out_dir ({REPO}/data/cifar100), "
     f"which each run replaces as a whole; move one of them"),
    ({"eval.metrics_dir": "models"}, f"eval.metrics_dir: {REPO}/models lies inside train.models_dir"),
    ({"train.models_dir": "data/cifar100/models"}, "train.models_dir: "),
    ({"data.url": "data/cifar100/cifar-100-python.tar.gz"}, "data.url: "),
], ids=["cosine-warmup", "gpus-without-use-gpu", "batch-per-worker", "out-dir-is-the-project",
        "models-dir-holds-the-project", "downloads-in-out-dir", "metrics-in-models-dir", "models-in-out-dir",
        "archive-in-out-dir"])
def test_conflicting_settings_are_caught_at_load(overrides: dict, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(PARAMS, overrides)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_cosine_warmup_shorter_than_training_loads() -> None:
    cfg = config.load(PARAMS, {"train.schedule": "cosine", "train.warmup_epochs": 5, "train.epochs": 6})
    assert cfg.train.warmup_epochs == 5


@pytest.mark.parametrize(("item", "message"), [
    ("trian.epochs=1", "trian.epochs: unknown key (did you mean train.epochs?)"),
    ("train.batch_sise=64", "train.batch_sise: unknown key (did you mean train.batch_size?)"),
    ("train.dropout=0.1", "train.dropout: unknown key (did you mean model.dropout?)"),
    ("eval.lr=0.1", "eval.lr: unknown key (did you mean train.lr?)"),
    ("train.augment.flipp=true", "train.augment.flipp: unknown key (did you mean train.augment.flip?)"),
    ("modle.hiden_dim=64", "modle.hiden_dim: unknown key (did you mean model.hidden_dim?)"),
    ("colour=red", "colour: unknown key"),
    ("root=/tmp", "root: unknown key"),
    ("train.epochs.max=3", "train.epochs.max: epochs is a value, not a section"),
    ("train.schedule=step\nplateau", r"train.schedule: must be one of plateau, cosine, got step\nplateau"),
])
def test_an_unknown_override_gets_a_suggestion(item: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(PARAMS, config.parse_overrides([item]))
    assert str(caught.value) == message


def params_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("edit", "message"), [
    (lambda text: text.replace("  batch_size: 128", "  batch_sise: 128"),
     "train.batch_sise: unknown key (did you mean train.batch_size?)"),
    (lambda text: text.replace("  label_smoothing: 0.0", "  dropout: 0.1"),
     "train.dropout: unknown key (did you mean model.dropout?)"),
    (lambda text: text + "\ntrain:\n  epochs: 5\n", "key 'train' appears twice in one section "
                                                     "(YAML would silently keep the last); keep one"),
    (lambda text: text.replace("  lr: 5.0e-3", "  lr: 5.0e-3\n  lr: 1.0e-3"), "key 'lr' appears twice"),
    (lambda text: "a: 1\nb: 2\na: 3\n", "params.yaml: line 3: key 'a' appears twice"),
    (lambda text: "root: /elsewhere\n" + text, "root: not a params key"),
], ids=["typo", "wrong-section", "duplicate-section", "duplicate-key", "duplicate-line", "root"])
def test_params_file_mistakes_are_named(tmp_path: Path, edit: Any, message: str) -> None:
    path = params_with(tmp_path, edit(PARAMS.read_text()))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_unreadable_params_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_bytes(b"train:\n  epochs: \xff\n")
    with pytest.raises(config.ConfigError, match=r"params.yaml: not UTF-8 text \(byte 17\); save it as UTF-8$"):
        config.load(tmp_path / "params.yaml")
    (tmp_path / "params").mkdir()
    with pytest.raises(config.ConfigError, match=r"params: unreadable \(Is a directory\)$"):
        config.load(tmp_path / "params")
