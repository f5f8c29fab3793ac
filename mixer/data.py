"""CIFAR-100 ingest (fetch, verify, split, write) and load of the prepared arrays.

`ingest` turns the official archive, or a mirror of it, into `out_dir/{train,val,test}.npz` and
`meta.json`; `load_split` and `load_meta` read them back. The outputs depend only on pixels, labels
and the split params, and are byte-identical across runs, so DVC sees an unchanged stage as unchanged.
Archive parsing (checked members, restricted unpickling) lives in `mixer.cifar_archive`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from mixer.atomic import atomic_dir, atomic_file
from mixer.cifar_archive import NUM_COARSE, NUM_FINE, DataError, read_archive
from mixer.config import DataConfig

__all__ = ["ARRAYS", "SPLITS", "DataError", "DownloadError", "Split", "channel_stats", "fetch", "file_md5",
           "ingest", "load_meta", "load_split", "split_indices"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ARRAYS = ("images", "fine_labels", "coarse_labels")  # the members of each .npz, in write order
META_FILE = "meta.json"
DOWNLOAD_TIMEOUT_S = 30  # per socket operation (connect, each read), not for the whole download
_CHUNK = 1 << 20  # bytes per read when hashing or downloading
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: the same arrays always give the same bytes
_RERUN = "run `mixer ingest` (or `dvc repro ingest`)"


class DownloadError(DataError):
    """The network failed while fetching the archive: worth retrying, unlike a bad md5 or URL."""


@dataclass(frozen=True)
class Split:
    """One prepared split, in memory."""

    images: np.ndarray  # (N, 32, 32, 3) uint8, HWC
    fine_labels: np.ndarray  # (N,) int64 in [0, 100)
    coarse_labels: np.ndarray  # (N,) int64 in [0, 20)

    def __len__(self) -> int:
        return len(self.images)


def fetch(cfg: DataConfig) -> Path:
    """A local path to the md5-verified archive at `cfg.url`.

    Local paths and file:// URLs are used in place; http(s) downloads go to `cfg.download_dir`, and a
    cached download with the right md5 is reused without touching the network.
    """
    parts = urlsplit(cfg.url)
    if parts.scheme in ("http", "https"):
        return _download(cfg)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DataError(f"data.url {cfg.url}: file:// URLs on another host are not supported; "
                            f"mount the file and give its local path")
        path = Path(urllib.request.url2pathname(parts.path))
    elif parts.scheme == "":
        path = Path(cfg.url).expanduser()
    else:
        raise DataError(f"data.url {cfg.url}: unsupported scheme {parts.scheme!r}; "
                        f"use https://, http://, file:// or a local path")
    path = path.absolute()
    if path.is_dir():
        raise DataError(f"archive {path}: a folder, not the archive file; fix data.url / MIXER_DATA_URL")
    if not path.is_file():
        raise DataError(f"archive {path}: not found; fix data.url / MIXER_DATA_URL")
    if path.stat().st_size == 0:
        raise DataError(f"archive {path}: empty (0 bytes); re-download it or fix data.url / MIXER_DATA_URL")
    try:
        actual = file_md5(path)
    except OSError as err:  # e.g. no read permission
        raise DataError(f"archive {path}: unreadable ({_one_line(err)}); check the file's permissions") from None
    if actual != cfg.md5:
        raise DataError(f"archive {path}: md5 {actual} does not match data.md5 {cfg.md5}; "
                        f"re-download it or fix data.md5 / MIXER_DATA_MD5")
    return path


def ingest(cfg: DataConfig) -> Path:
    """fetch -> parse -> stratified val hold-out -> `out_dir/{train,val,test}.npz` + meta.json.

    The outputs are swapped in as a whole: a failed ingest leaves the previous outputs (or none).
    """
    official = read_archive(fetch(cfg))
    full_train = Split(**official.train)
    train_idx, val_idx = split_indices(full_train.fine_labels, cfg.val_fraction, cfg.split_seed)
    if len(train_idx) == 0:
        raise DataError(f"data.val_fraction {cfg.val_fraction}: holds out every training image; lower it")
    if len(val_idx) == 0:
        raise DataError(f"data.val_fraction {cfg.val_fraction}: rounds to no validation image in any class "
                        f"({len(full_train)} training images); raise it")
    splits = {"train": _take(full_train, train_idx), "val": _take(full_train, val_idx),
              "test": Split(**official.test)}
    mean, std = channel_stats(splits["train"].images)
    meta = {
        "fine_label_names": official.fine_label_names,
        "coarse_label_names": official.coarse_label_names,
        "counts": {name: len(split) for name, split in splits.items()},
        "mean": mean,  # per channel (R, G, B), pixel/255, of the train split after the hold-out
        "std": std,
        # No archive checksum here: two archives with the same pixels and labels must give the
        # same bytes, hence the same DVC data version. The verified md5 is data.md5 in dvc.lock.
    }
    with atomic_dir(cfg.out_dir) as tmp:
        for name, split in splits.items():
            _write_npz(tmp / f"{name}.npz", split)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("ingested %s (md5 %s) -> %s (%s)", cfg.url, cfg.md5, cfg.out_dir, meta["counts"])
    return cfg.out_dir


def load_split(out_dir: Path, name: str) -> Split:
    """One prepared split (train, val or test) from `out_dir`."""
    if name not in SPLITS:
        raise DataError(f"split {name!r}: expected one of {', '.join(SPLITS)}")
    path = Path(out_dir) / f"{name}.npz"
    if not path.is_file():
        raise DataError(f"{path}: not found; {_RERUN}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            split = Split(**{key: npz[key] for key in ARRAYS})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # EOFError: empty
        raise DataError(f"{path}: unreadable ({_one_line(err)}); {_RERUN}") from None
    images = split.images
    if not (images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3)
            and all(labels.dtype == np.int64 and labels.shape == images.shape[:1]
                    for labels in (split.fine_labels, split.coarse_labels))):
        raise DataError(f"{path}: arrays of the wrong shape or dtype "
                        f"(images {images.dtype} {images.shape}); {_RERUN}")
    for key, num_classes in (("fine_labels", NUM_FINE), ("coarse_labels", NUM_COARSE)):
        labels = getattr(split, key)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{path}: {key} outside [0, {num_classes}) (got [{labels.min()}, {labels.max()}]); "
                            f"{_RERUN}")
    return split


def load_meta(out_dir: Path) -> dict[str, Any]:
    """meta.json: label names, counts, mean/std (pixel/255 units)."""
    path = Path(out_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {_RERUN}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({_one_line(err)}); {_RERUN}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object; {_RERUN}")
    return meta


def split_indices(fine_labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified hold-out: round(count * fraction) images of each fine class go to val.

    Returns sorted (train, val) indices, so both keep the official order.
    """
    rng = np.random.default_rng(seed)
    held = np.zeros(len(fine_labels), dtype=bool)
    for label in np.unique(fine_labels):  # ascending: the same draws in the same order every run
        members = np.flatnonzero(fine_labels == label)
        held[rng.choice(members, size=round(len(members) * fraction), replace=False)] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 NHWC images, in pixel/255 units, 6 decimals.

    Counts pixel values exactly (a 256-bin histogram per channel), so the result does not depend on
    float summation order.
    """
    counts = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), 4096):  # 4096 images = 4 M values per channel at a time
        chunk = images[start:start + 4096].reshape(-1, 3)  # (pixels, C)
        for channel in range(3):
            counts[channel] += np.bincount(chunk[:, channel], minlength=256)
    levels = np.arange(256) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ levels / total
    var = (counts * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / total
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in np.sqrt(var)]


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check, not a security one
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(cfg: DataConfig) -> Path:
    name = PurePosixPath(unquote(urlsplit(cfg.url).path)).name
    if name in ("", ".", ".."):
        raise DataError(f"data.url {cfg.url}: no file name in the URL path; give the archive's URL")
    dest = cfg.download_dir / name
    if dest.is_file():
        if file_md5(dest) == cfg.md5:
            log.info("using the cached download %s", dest)
            return dest
        log.warning("cached %s does not match data.md5; downloading it again", dest)
        dest.unlink()
    log.info("downloading %s -> %s", cfg.url, dest)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with (urllib.request.urlopen(cfg.url, timeout=DOWNLOAD_TIMEOUT_S) as response,
              atomic_file(dest) as out):
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != cfg.md5:  # raising here deletes the partial file
                raise DataError(f"download {cfg.url}: md5 {digest.hexdigest()} does not match data.md5 "
                                f"{cfg.md5} (deleted it); check data.url / MIXER_DATA_URL and data.md5 / "
                                f"MIXER_DATA_MD5")
    except DataError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:  # URLError and timeouts are OSErrors
        raise DownloadError(f"download {cfg.url}: failed ({_one_line(err)}); check the network, or point "
                        f"data.url / MIXER_DATA_URL at a local mirror") from None
    return dest


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _take(split: Split, indices: np.ndarray) -> Split:
    return Split(split.images[indices], split.fine_labels[indices], split.coarse_labels[indices])


def _write_npz(path: Path, split: Split) -> None:
    """What np.savez writes, minus its one source of variation: the zip timestamps (set to 1980)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in ARRAYS:
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            array = np.ascontiguousarray(getattr(split, key))
            with archive.open(info, "w", force_zip64=True) as member:  # force_zip64 as np.savez does
                np.lib.format.write_array(member, array, allow_pickle=False)
