"""Read the official CIFAR-100 python archive safely: checked tar members, restricted unpickling.

The archive (https://www.cs.toronto.edu/~kriz/cifar.html) is a tar.gz of three pickles:
`cifar-100-python/{train,test,meta}`. Nothing is extracted to disk, every member is checked before
any pickle is read, and the unpickler resolves only the numpy callables that rebuild an array, so a
hostile archive can neither write files nor run code. `mixer.data` re-exports `DataError`.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

try:  # numpy >= 2 keeps the array internals in numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

ROOT = "cifar-100-python"
MEMBERS = ("train", "test", "meta")
NUM_FINE, NUM_COARSE = 100, 20
SIDE, CHANNELS = 32, 3
MAX_MEMBER_BYTES = 1 << 30  # the real train pickle is 155 MB; refuses a decompression bomb
_CHUNK = 1 << 20  # bytes per read
_NOT_CIFAR = "it is not the CIFAR-100 python format; check data.url / MIXER_DATA_URL"


class DataError(ValueError):
    """Bad or missing CIFAR-100 data; the message is one line: the problem and what to do."""


@dataclass(frozen=True)
class Official:
    """The official splits, validated. Each split maps images / fine_labels / coarse_labels to arrays."""

    train: dict[str, np.ndarray]  # images (N, 32, 32, 3) uint8; labels (N,) int64
    test: dict[str, np.ndarray]
    fine_label_names: list[str]  # 100
    coarse_label_names: list[str]  # 20


def read_archive(path: Path) -> Official:
    """Parse a CIFAR-100 python tar.gz (already md5-verified) into validated NHWC arrays."""
    raw = _read_members(path)
    train = _batch(path, "train", _unpickle(path, "train", raw.pop("train")))
    test = _batch(path, "test", _unpickle(path, "test", raw.pop("test")))
    meta = _unpickle(path, "meta", raw.pop("meta"))
    if not isinstance(meta, dict):
        raise DataError(f"{_where(path, 'meta')}: expected a dict, got {type(meta).__name__}; {_NOT_CIFAR}")
    return Official(train=train, test=test,
                    fine_label_names=_names(path, meta, b"fine_label_names", NUM_FINE),
                    coarse_label_names=_names(path, meta, b"coarse_label_names", NUM_COARSE))


def _read_members(path: Path) -> dict[str, bytes]:
    """The bytes of train/test/meta, after checking every member of the archive."""
    wanted = {f"{ROOT}/{name}": name for name in MEMBERS}
    found: dict[str, bytes] = {}
    try:
        with gzip.open(path, "rb") as gz, tarfile.open(fileobj=gz, mode="r:") as tar:
            for member in tar:
                key = wanted.get(_checked_name(path, member))
                if key is None or member.isdir():
                    continue
                if key in found:
                    raise DataError(f"{_where(path, key)}: appears twice; {_NOT_CIFAR}")
                if member.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{_where(path, key)}: {member.size} bytes is implausibly large; "
                                    f"{_NOT_CIFAR}")
                found[key] = tar.extractfile(member).read()  # type: ignore[union-attr]  # a regular file
            while gz.read(_CHUNK):  # to the end of the gzip stream, whose CRC check catches a bad tail
                pass
    except DataError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(f"archive {path}: not a readable tar.gz ({_one_line(err)}); "
                        f"re-download it (it is truncated or corrupt)") from None
    missing = [f"{ROOT}/{name}" for name in MEMBERS if name not in found]
    if missing:
        raise DataError(f"archive {path}: missing member(s) {', '.join(missing)}; {_NOT_CIFAR}")
    return found


def _checked_name(path: Path, member: tarfile.TarInfo) -> str:
    """The member's normalized name; refuses anything that could reach outside the archive."""
    parts = PurePosixPath(member.name).parts
    if member.name.startswith("/") or ".." in parts:
        raise DataError(f"archive {path}: member {member.name!r} escapes the archive root; refusing it")
    if not (member.isfile() or member.isdir()):
        kind = ("symlink" if member.issym() else "hard link" if member.islnk() else "fifo" if member.isfifo()
                else "device" if member.isdev() else f"entry of type {member.type!r}")
        raise DataError(f"archive {path}: member {member.name!r} is a {kind}; "
                        f"only files and folders are allowed")
    return "/".join(parts)


class _Refused(Exception):
    """A global (or an argument to one) that a CIFAR pickle has no business using."""


# The only globals a CIFAR pickle needs, mapped to the real callables (pickle never imports a module).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # pickled with numpy 1.x (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # pickled with numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # protocol 2 writes bytes as encode(str, "latin1")
            return _latin1_encoder()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _latin1_encoder() -> Callable[..., bytes]:
    """A stand-in for `_codecs.encode` that only does latin1; a fresh one per lookup, because a pickle's
    BUILD opcode can set attributes on what it gets and must not alter anything that outlives the load."""

    def encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
            raise _Refused(f"_codecs.encode with encoding {encoding!r}")
        return text.encode("latin1", errors)

    return encode


def _unpickle(path: Path, member: str, data: bytes) -> Any:
    where = _where(path, member)
    try:
        # encoding="bytes": Python 2 str -> bytes, as the format's byte keys expect
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as refused:
        raise DataError(f"{where}: pickle refers to {refused}, which is not allowed (only numpy arrays); "
                        f"refusing to load it: {_NOT_CIFAR}") from None
    except Exception as err:  # a malformed pickle raises nearly anything (EOFError, KeyError, ...)
        raise DataError(f"{where}: not a readable pickle ({type(err).__name__}: {_one_line(err)}); "
                        f"re-download the archive") from None


def _batch(path: Path, member: str, obj: Any) -> dict[str, np.ndarray]:
    """Validate one official batch dict and convert its rows to (N, 32, 32, 3) uint8 images."""
    where = _where(path, member)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, got {type(obj).__name__}; {_NOT_CIFAR}")
    missing = [key.decode() for key in (b"data", b"fine_labels", b"coarse_labels") if key not in obj]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}; {_NOT_CIFAR}")
    data = obj[b"data"]
    pixels = CHANNELS * SIDE * SIDE
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == pixels and len(data) > 0):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: data must be a uint8 array of shape (N, {pixels}), got {got}; "
                        f"{_NOT_CIFAR}")
    n = len(data)
    images = data.reshape(n, CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1)  # rows are CHW -> (N, H, W, C)
    return {"images": np.ascontiguousarray(images),
            "fine_labels": _labels(where, obj[b"fine_labels"], "fine_labels", n, NUM_FINE),
            "coarse_labels": _labels(where, obj[b"coarse_labels"], "coarse_labels", n, NUM_COARSE)}


def _labels(where: str, values: Any, key: str, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(values) if isinstance(values, (list, np.ndarray)) else None
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != n:
        got = f"{labels.dtype} {labels.shape}" if labels is not None else type(values).__name__
        raise DataError(f"{where}: {key} must be {n} integers (one per image), got {got}; {_NOT_CIFAR}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{where}: {key} must lie in [0, {num_classes}), got [{low}, {high}]; {_NOT_CIFAR}")
    return labels.astype(np.int64)


def _names(path: Path, meta: dict[Any, Any], key: bytes, count: int) -> list[str]:
    values = meta.get(key)
    if not (isinstance(values, list) and len(values) == count and all(isinstance(v, bytes) for v in values)):
        got = f"{len(values)} items" if isinstance(values, list) else type(values).__name__
        raise DataError(f"{_where(path, 'meta')}: {key.decode()} must be {count} byte strings, "
                        f"got {got}; {_NOT_CIFAR}")
    try:
        return [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise DataError(f"{_where(path, 'meta')}: {key.decode()} is not UTF-8 text; {_NOT_CIFAR}") from None


def _where(path: Path, member: str) -> str:
    return f"archive {path}: member {ROOT}/{member}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
