"""params.yaml -> Config: every path absolute, every bad value a one-line error naming the key."""

from __future__ import annotations

from pathlib import Path

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
    ({"trian.epochs": 1}, "trian: unknown key (did you mean train?)"),
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
