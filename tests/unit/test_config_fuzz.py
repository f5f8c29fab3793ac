"""Property tests of the config loader: any params file or overrides give a valid Config or one ConfigError line."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer import config

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
BASE = yaml.safe_load(PARAMS.read_text())
KNOWN = list(config._known_keys())

# database=None: no .hypothesis/ folder in the checkout; deadline=None: a loaded CI machine is no failure.
FAST = settings(max_examples=200, deadline=None, database=None)


def lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


FULL = config.load(PARAMS).to_dict()  # every key with its value, presets filled in
LEAVES = [key for key in KNOWN if not isinstance(lookup(FULL, key), dict) and key != "sweep.space"]
OTHER_KEYS = [key for key in KNOWN if key not in LEAVES] + ["sweep.space.train.lr", "sweep.space.model.dropout",
                                                            "sweep.space.data.url", "root", "trian.epochs"]

texts = st.sampled_from(["", " ", "1e-3", "1.0e-3", "-0", "nan", ".inf", "-inf", "0x10", "1_000", "~", "null",
                         "yes", "off", "seed", "nano", "cosine", "bf16", "a\nb", "\x00", "data/x", "../..", ".",
                         "sqlite:///x.db", "https://h/c.tgz", "ftp://h/c.tgz", "0123456789abcdef0123456789abcdef",
                         "{a: 1}", "[1, 2]", "{loguniform: [0.001, 0.01]}", "{grid: []}", "!!python/object:os.system",
                         "&a [*a]", "{", "'"]) | st.text(max_size=12)
numbers = (st.integers() | st.sampled_from([0, 1, -1, 2, 3, 32, 100, 128, 2**31, 2**32, 2**64, -2**63, 10**400])
           | st.floats() | st.sampled_from([0.0, 0.5, 1.0, -0.0, 1e-300, 1e308, math.nan, math.inf, -math.inf]))
scalars = st.none() | st.booleans() | numbers | texts
wild = st.recursive(scalars, lambda children: st.lists(children, max_size=3)
                    | st.dictionaries(texts | st.sampled_from(KNOWN), children, max_size=3), max_leaves=8)
# Values near what a key takes, so that many examples load and the range and cross-field rules get exercised.
near = {bool: st.booleans(),
        int: st.integers(-2, 300) | st.sampled_from([2**32, 2**64]),
        float: st.floats(-0.5, 2.0) | st.sampled_from([1e-3, 0.02, 16.0]),
        str: st.sampled_from(["seed", "nano", "cosine", "plateau", "fp32", "bf16", "models", "data/cifar100",
                              "metrics", "plots", "runs/a", "sqlite:///mlflow.db", "http://127.0.0.1:5000",
                              "ml-alerts", "run-1", "0123456789abcdef0123456789abcdef", "https://h/c.tgz"])}
junk_keys = st.lists(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6), min_size=1, max_size=3)


@st.composite
def edits(draw: st.DrawFn) -> tuple[str, Any]:
    """(key, value): mostly a leaf of params.yaml set near its kind of value; else sections, typos, junk."""
    which = draw(st.integers(0, 9))  # 8 in 10: a leaf
    key = draw(st.sampled_from(LEAVES) if which < 8 else st.sampled_from(OTHER_KEYS) if which == 8
               else junk_keys.map(".".join))
    kind = near.get(type(lookup(FULL, key)))
    return key, draw(kind if kind is not None and draw(st.integers(0, 3)) else wild)  # 3 in 4: a near value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    for part in key.split(".")[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[key.split(".")[-1]] = value


def check(load: Any) -> None:
    """`load()` gives a Config that validates again unchanged, or a one-line ConfigError; nothing else."""
    try:
        cfg = load()
    except config.ConfigError as err:
        assert len(str(err).splitlines()) == 1
        return
    assert config.replace(cfg, {}) == cfg
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("params")


@FAST
@given(changes=st.lists(edits() | st.tuples(st.sampled_from(KNOWN), st.just(KeyError)), max_size=3))
def test_any_params_file_loads_or_is_one_config_error(workdir: Path, changes: list[tuple[str, Any]]) -> None:
    raw = copy.deepcopy(BASE)
    for key, value in changes:
        if value is KeyError:  # delete the key, where params.yaml has it
            parent = lookup(raw, key.rpartition(".")[0]) if "." in key else raw
            if isinstance(parent, dict):
                parent.pop(key.rpartition(".")[2], None)
        else:
            set_dotted(raw, key, value)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    check(lambda: config.load(path))


def as_text(value: Any) -> str:
    """A value as it would be typed on the command line (YAML flow style)."""
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).removesuffix(
        "\n...\n").strip()


@FAST
@given(changes=st.lists(edits() | st.tuples(junk_keys.map(".".join), texts), max_size=3))
def test_any_overrides_load_or_are_one_config_error(changes: list[tuple[str, Any]]) -> None:
    items = [f"{key}={as_text(value)}" for key, value in changes]
    check(lambda: config.load(PARAMS, config.parse_overrides(items)))


@FAST
@given(changes=st.lists(edits(), max_size=3))
def test_any_replace_of_a_loaded_config_is_valid_or_one_config_error(changes: list[tuple[str, Any]]) -> None:
    base = config.load(PARAMS)
    check(lambda: config.replace(base, dict(changes)))
