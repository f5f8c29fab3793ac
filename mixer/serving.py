"""The MLflow pyfunc flavor of an exported model; this installed module is its loader.

A logged model holds a copy of the `models/` folder (see export.py) and names `mixer.serving` as its
`loader_module`: to load it, MLflow imports this module and calls `_load_pyfunc(data_path)`. Loading
goes through `export.load` (`torch.load(weights_only=True)`), never pickle or cloudpickle, so it works
with `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`, and the code that serves is the installed package
pinned in the model's requirements, not a serialized copy of it.

Served input: uint8 RGB images (N, 32, 32, 3), HWC, as training saw them before normalization.
Served output: float32 softmax probabilities (N, 100).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec
from PIL import Image, ImageOps

from mixer import export
from mixer.config import IMAGE_SIZE, IN_CHANNELS, NUM_CLASSES
from mixer.evaluation import predict_logits
from mixer.tracking import process_tracking_uri

PROJECT_DIST = "cifar100-mixer"  # the name in pyproject.toml: what a serving environment installs
MODEL_NAME = "model"  # the logged model's name within its run
_PYFUNC = "python_function"  # MLflow's flavor key in the MLmodel file
# pyfunc flavor keys that make MLflow run code shipped inside the model: a cloudpickled python_model,
# a models-from-code script, or folders put on sys.path before the loader module is imported.
_CODE_KEYS = ("python_model", "model_code_path", "code")
_BATCH = 1024  # images per forward pass; bounds memory for large requests, not tuned


class MixerModel:
    """An exported Mixer with its class names; `predict` is what `mlflow models serve` calls."""

    def __init__(self, exported: export.Exported, class_names: Sequence[str]) -> None:
        if len(class_names) != exported.config.num_classes:
            raise ValueError(f"class_names: expected {exported.config.num_classes} names, "
                             f"got {len(class_names)}")
        self.exported = exported
        self.class_names: list[str] = list(class_names)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """uint8 images (N, 32, 32, 3) -> float32 probabilities (N, num_classes), rows summing to 1.

        `params` is part of MLflow's pyfunc interface; the model takes none.
        """
        images = _as_images(model_input, self.exported.config.image_size, self.exported.config.in_channels)
        if images.shape[0] == 0:
            return np.zeros((0, self.exported.config.num_classes), dtype=np.float32)
        # CPU on purpose: a served 32x32 model is latency-bound on small requests, and a CPU result
        # does not depend on which accelerator the serving host happens to have.
        logits = predict_logits(self.exported.model, images, self.exported.mean, self.exported.std,
                                batch_size=_BATCH)  # (N, num_classes)
        return torch.softmax(logits, dim=1).numpy().astype(np.float32, copy=False)


def _load_pyfunc(data_path: str) -> MixerModel:
    """MLflow's `loader_module` entry point; `data_path` is the logged copy of `models/`."""
    return _load(Path(data_path))


def _load(folder: Path, source: str | None = None) -> MixerModel:
    """`source`: what errors call the folder (a model URI) instead of its path."""
    exported = export.load(folder, source)
    return MixerModel(exported, _class_names(exported, folder, source))


def _class_names(exported: export.Exported, folder: Path, source: str | None = None) -> list[str]:
    """`class_names` of train.json when training recorded them, else `class_0` ... `class_99`."""
    names = exported.summary.get("class_names")
    count = exported.config.num_classes
    if names is None:
        return [f"class_{i}" for i in range(count)]
    if not (isinstance(names, list) and len(names) == count and all(isinstance(n, str) for n in names)):
        where = f"{source} ({export.SUMMARY_FILE})" if source else str(folder / export.SUMMARY_FILE)
        raise export.ExportError(f"{where}: class_names must be a list of {count} strings")
    return names


def signature() -> ModelSignature:
    """Input: uint8 (-1, 32, 32, 3) HWC images; output: float32 (-1, 100) probabilities."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )


def pip_requirements() -> list[str]:
    """Exact pins of what the loader imports, from this environment.

    Explicit requirements also skip MLflow's inference of them, which loads the model in a
    subprocess and guesses from the modules it imported.
    """
    return [f"{dist}=={_installed_version(dist)}" for dist in ("torch", "numpy", "mlflow", PROJECT_DIST)]


def _installed_version(dist: str) -> str:
    # A local build tag (torch's `+cu132`) names a wheel index, not a version pip can resolve.
    return importlib.metadata.version(dist).split("+", 1)[0]


def log_model(models_dir: Path, example_images: np.ndarray) -> str:
    """Log `models_dir` as a pyfunc model in the active run; returns the logged model's URI.

    `example_images` (uint8, (N, 32, 32, 3)): the first two become the input example that MLflow
    stores and checks the model against.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("serving.log_model: no active MLflow run; call it inside mlflow.start_run()")
    example = _as_images(np.asarray(example_images)[:2], IMAGE_SIZE, IN_CHANNELS)
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        loader_module=__name__,
        data_path=str(models_dir),
        signature=signature(),
        input_example=example,
        pip_requirements=pip_requirements(),
    )
    return info.model_uri


def load(model_uri: str, tracking_uri: str | None = None) -> MixerModel:
    """A logged model from any MLflow URI (`models:/cifar100-mixer@champion`, `runs:/...`), in this process.

    Reads the same data folder through the same loader that `mlflow.pyfunc.load_model` and
    `mlflow models serve` call, but checks first that the model is ours, so it never imports another
    model's loader module, unpickles a `python_model` or puts code shipped with the model on
    `sys.path`. `tracking_uri` (also used as the registry URI) resolves `models:/` and `runs:/` URIs;
    None = MLflow's process-wide one (MLFLOW_TRACKING_URI). Errors name `model_uri`, not the
    temporary download.
    """
    with tempfile.TemporaryDirectory(prefix="mixer-model-") as tmp:
        # download_artifacts' own tracking_uri argument does not reach the resolution of an alias.
        with process_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        flavor = Model.load(local).flavors.get(_PYFUNC, {})
        if flavor.get("loader_module") != __name__ or "data" not in flavor:
            raise ValueError(f"{model_uri}: not a mixer model (pyfunc loader module "
                             f"{flavor.get('loader_module')!r}, expected {__name__!r})")
        carried = [key for key in _CODE_KEYS if flavor.get(key)]
        if carried:  # ours never ship code: the installed package is the loader
            raise ValueError(f"{model_uri}: refused: its MLmodel names code to run ({carried[0]}: "
                             f"{flavor[carried[0]]!r:.80}), which no mixer model has; do not serve it")
        return _load(local / flavor["data"], source=model_uri)  # everything is read into memory here


def read_image(path: Path) -> np.ndarray:
    """A PNG or JPEG of any size -> RGB uint8 (32, 32, 3).

    The largest centered square is kept (no stretching: CIFAR images are square), then resized with
    Lanczos, which keeps the detail of a large photo without aliasing.
    """
    try:
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")  # camera JPEGs: apply their rotation
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {reason})") from None
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    resized = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)  # (32, 32, 3)


def top_k(model: MixerModel, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    """Per image, the k most probable (class name, probability) pairs, best first."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    probs = model.predict(images)  # (N, num_classes)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k); ties keep class order
    return [[(model.class_names[i], float(row[i])) for i in best] for row, best in zip(probs, order)]


def _as_images(model_input: Any, size: int, channels: int) -> np.ndarray:
    """Check and convert input to uint8 (N, size, size, channels); a one-line ValueError otherwise.

    A numpy array must already be uint8. A nested list (JSON) may hold any integers in [0, 255].
    """
    expected = f"uint8 images of shape (N, {size}, {size}, {channels})"
    if isinstance(model_input, np.ndarray):
        images = model_input
        if images.dtype != np.uint8:
            raise ValueError(f"expected {expected}, got dtype {images.dtype}")
    elif isinstance(model_input, (list, tuple)):
        try:
            images = np.asarray(model_input)
        except ValueError:  # ragged nesting
            raise ValueError(f"expected {expected}, got a ragged nested list") from None
        if images.size and (images.dtype.kind not in "iu" or images.min() < 0 or images.max() > 255):
            raise ValueError(f"expected {expected}, got values that are not integers in [0, 255]")
        images = images.astype(np.uint8)
    else:
        raise ValueError(f"expected {expected} as a numpy array or nested list, "
                         f"got {type(model_input).__name__}")
    if images.ndim != 4 or images.shape[1:] != (size, size, channels):
        raise ValueError(f"expected {expected}, got shape {images.shape}")
    return images
