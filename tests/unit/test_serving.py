"""The pyfunc loader on a tiny export: predictions, input checks, image reading, top-k; no MLflow store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mixer import export, serving
from mixer.augment import normalize
from mixer.config import MODEL_PRESETS, ModelConfig
from mixer.model import build_model

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
NAMES = [f"fine_{i:02d}" for i in range(100)]


def _random_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="seed", **MODEL_PRESETS["seed"]))
    # The head starts at zero (uniform output); random weights make every class score differ.
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


@pytest.fixture
def exported_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = _random_model()
    folder = tmp_path / "models"
    export.save(folder, model.state_dict(), model.cfg, MEAN, STD, info={"class_names": NAMES})
    return folder, model


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_loader_predicts_the_softmax_of_the_exported_model(
        exported_folder: tuple[Path, torch.nn.Module]) -> None:
    folder, model = exported_folder
    loaded = serving._load_pyfunc(str(folder))
    images = _images(5)
    probs = loaded.predict(images)
    assert probs.shape == (5, 100) and probs.dtype == np.float32
    assert probs.sum(axis=1) == pytest.approx(np.ones(5), abs=1e-5)
    with torch.no_grad():
        expected = torch.softmax(model(normalize(torch.from_numpy(images), MEAN, STD)), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert probs.std(axis=1).min() > 0  # not the uniform output of an untrained head
    assert loaded.class_names == NAMES


def test_nested_lists_give_the_same_predictions(exported_folder: tuple[Path, torch.nn.Module]) -> None:
    loaded = serving._load_pyfunc(str(exported_folder[0]))
    images = _images(2)
    np.testing.assert_array_equal(loaded.predict(images.tolist()), loaded.predict(images))
    assert loaded.predict(images[:0]).shape == (0, 100)


@pytest.mark.parametrize("bad, words", [
    (np.zeros((2, 32, 32, 3), dtype=np.float32), "dtype float32"),
    (np.zeros((2, 3, 32, 32), dtype=np.uint8), "shape (2, 3, 32, 32)"),
    (np.zeros((32, 32, 3), dtype=np.uint8), "shape (32, 32, 3)"),
    ([[[[300, 0, 0]] * 32] * 32], "integers in [0, 255]"),
    ([[[[0.5, 0, 0]] * 32] * 32], "integers in [0, 255]"),
    ("an image", "got str"),
])
def test_bad_input_is_a_one_line_value_error(exported_folder: tuple[Path, torch.nn.Module], bad: object,
                                             words: str) -> None:
    loaded = serving._load_pyfunc(str(exported_folder[0]))
    with pytest.raises(ValueError) as err:
        loaded.predict(bad)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_class_names_default_when_training_recorded_none(tmp_path: Path) -> None:
    model = _random_model()
    export.save(tmp_path / "models", model.state_dict(), model.cfg, MEAN, STD, info={})
    names = serving._load_pyfunc(str(tmp_path / "models")).class_names
    assert names[:2] == ["class_0", "class_1"] and len(names) == 100


def test_top_k_is_sorted_best_first(exported_folder: tuple[Path, torch.nn.Module]) -> None:
    loaded = serving._load_pyfunc(str(exported_folder[0]))
    images = _images(3)
    probs = loaded.predict(images)
    ranked = serving.top_k(loaded, images, k=5)
    assert len(ranked) == 3 and all(len(row) == 5 for row in ranked)
    for row, p in zip(ranked, probs):
        scores = [score for _, score in row]
        assert scores == sorted(scores, reverse=True)
        assert row[0] == (NAMES[int(p.argmax())], pytest.approx(float(p.max())))
    assert len(serving.top_k(loaded, images, k=500)[0]) == 100


def test_read_image_resizes_png_and_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    png, jpeg = tmp_path / "wide.png", tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA").save(png)  # 50 wide, 40 high
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(jpeg, quality=90)
    for path in (png, jpeg):
        image = serving.read_image(path)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_read_image_keeps_a_uniform_colour(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 10, 30)).save(path)
    assert (serving.read_image(path) == np.array([200, 10, 30], dtype=np.uint8)).all()


def test_read_image_names_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    with pytest.raises(ValueError, match="notes.png: not a readable image") as err:
        serving.read_image(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="missing.jpg"):
        serving.read_image(tmp_path / "missing.jpg")


def test_signature_shapes() -> None:
    sig = serving.signature()
    (inp,), (out,) = sig.inputs.inputs, sig.outputs.inputs
    assert inp.shape == (-1, 32, 32, 3) and inp.type == np.dtype(np.uint8)
    assert out.shape == (-1, 100) and out.type == np.dtype(np.float32)


def test_pip_requirements_pin_installed_versions() -> None:
    reqs = serving.pip_requirements()
    assert [r.split("==")[0] for r in reqs] == ["torch", "numpy", "mlflow", "cifar100-mixer"]
    assert all("==" in r and "+" not in r for r in reqs)
    assert f"numpy=={np.__version__}" in reqs


# A damaged or mismatched export: one ExportError line naming the file, the problem and the fix.

def _edit_payload(folder: Path, **changes: object) -> None:
    """Rewrite model.pt with some payload entries changed, as a hand edit or a bad merge would."""
    payload = torch.load(folder / export.WEIGHTS_FILE, weights_only=True)
    torch.save({**payload, **changes}, folder / export.WEIGHTS_FILE)


def _edit_config(folder: Path, **fields: object) -> None:
    payload = torch.load(folder / export.WEIGHTS_FILE, weights_only=True)
    _edit_payload(folder, model_config={**payload["model_config"], **fields})


def _drop_tensors(folder: Path, prefix: str) -> None:
    state = torch.load(folder / export.WEIGHTS_FILE, weights_only=True)["state_dict"]
    _edit_payload(folder, state_dict={k: v for k, v in state.items() if not k.startswith(prefix)})


def _edit_summary(folder: Path, **fields: object) -> None:
    path = folder / export.SUMMARY_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _edit_summary_config(folder: Path, **fields: object) -> None:
    summary = json.loads((folder / export.SUMMARY_FILE).read_text())
    _edit_summary(folder, model_config={**summary["model_config"], **fields})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


WEIGHTS, SUMMARY = export.WEIGHTS_FILE, export.SUMMARY_FILE
MISMATCH = "weights do not match their model config"
DAMAGE = [  # (what breaks, the file named, words of the message)
    (lambda f: _edit_config(f, hidden_dim=192), WEIGHTS, f"{MISMATCH} (hidden_dim=192 but the weights have 128)"),
    (lambda f: _drop_tensors(f, "blocks.3."), WEIGHTS, f"{MISMATCH} (num_blocks=4 but the weights have 3)"),
    (lambda f: _drop_tensors(f, "head.bias"), WEIGHTS, f"{MISMATCH} (no tensor head.bias)"),
    (lambda f: _edit_summary_config(f, hidden_dim=192), SUMMARY,
     "does not match model.pt (hidden_dim=192 in train.json but 128 in model.pt)"),
    (lambda f: _edit_summary(f, std=[1.0, 1.0, 1.0]), SUMMARY, "does not match model.pt (std [1.0, 1.0, 1.0]"),
    (lambda f: _edit_config(f, hidden_dim=0), WEIGHTS,
     "invalid model config (model_config.hidden_dim: must be > 0, got 0)"),
    (lambda f: _edit_payload(f, model_config=None), WEIGHTS,
     "invalid model config (model_config: expected a section (mapping), got None)"),
    (lambda f: _edit_payload(f, std=[0.2, 0.0, 0.2]), WEIGHTS, "invalid normalization stats (std:"),
    (lambda f: (f / WEIGHTS).write_bytes(b""), WEIGHTS, "empty file"),
    (lambda f: _truncate(f / WEIGHTS), WEIGHTS,
     "not a readable model file (RuntimeError: PytorchStreamReader failed reading zip archive"),
    (lambda f: torch.save({"weights": torch.zeros(3)}, f / WEIGHTS), WEIGHTS,
     "not a mixer model export (no state_dict)"),
    (lambda f: (f / SUMMARY).unlink(), SUMMARY, "missing (the export is incomplete)"),
    (lambda f: _truncate(f / SUMMARY), SUMMARY, "not valid JSON ("),
]
DAMAGE_IDS = ["config hidden_dim", "fewer blocks", "missing tensor", "train.json config", "train.json std",
              "invalid config", "no config", "zero std", "empty weights", "truncated weights", "foreign weights",
              "no train.json", "truncated train.json"]


@pytest.mark.parametrize("damage, file, words", DAMAGE, ids=DAMAGE_IDS)
def test_a_damaged_export_is_one_line_naming_the_file(exported_folder: tuple[Path, torch.nn.Module],
                                                      damage: Any, file: str, words: str) -> None:
    folder = exported_folder[0]
    damage(folder)
    for load in (export.load, lambda f: serving._load_pyfunc(str(f))):
        with pytest.raises(export.ExportError) as err:
            load(folder)
        message = str(err.value)
        assert message.startswith(f"{folder / file}: ") and words in message, message
        assert message.endswith(f"; {export.RE_EXPORT}") and "\n" not in message


def test_a_logged_copy_is_named_by_its_uri(exported_folder: tuple[Path, torch.nn.Module]) -> None:
    folder = exported_folder[0]
    _edit_config(folder, hidden_dim=192)
    with pytest.raises(export.ExportError) as err:
        export.load(folder, source="models:/cifar100-mixer@champion")
    assert str(err.value) == (f"models:/cifar100-mixer@champion (model.pt): {MISMATCH} "
                              f"(hidden_dim=192 but the weights have 128); {export.REPLACE_LOGGED}")


def test_a_missing_export_says_to_train(tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match=r"model\.pt: no exported model; run `mixer train`"):
        export.load(tmp_path / "models")
    with pytest.raises(export.ExportError, match=r"train\.json: no exported model; run `mixer train`"):
        export.read_summary(tmp_path / "models")
