"""Read the official CIFAR-100 python archive safely: checked tar members, restricted unpickling.

The archive (https://www.cs.toronto.edu/~kriz/cifar.html) is a tar.gz of three pickles:
`cifar-100-python/{train,test,meta}`. Nothing is extracted to disk, every member is checked before
any pickle is read, the decompressed stream is capped (a gzip bomb), and the unpickler resolves only
stand-ins for the numpy callables that rebuild an array, which accept nothing but arrays of plain
numbers, so a hostile archive can neither write files, run code, nor build an object array over raw
bytes (memory it could then use as pointers). `mixer.data` re-exports `DataError`.
"""

from __future__ import annotations

import gzip
import io
import pickle
import pickletools
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

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
MAX_TAR_BYTES = 2 << 30  # the whole decompressed tar (the real one is 186 MB), skipped members included
_CHUNK = 1 << 20  # bytes per read
_BIG_CHUNK = 1 << 24  # bytes per read of a member
_NOT_CIFAR = "it is not the CIFAR-100 python format; check data.url / MIXER_DATA_URL"
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on


class DataError(ValueError):
    """Bad or missing CIFAR-100 data; the message is one line: the problem and what to do."""

    def __init__(self, message: str) -> None:
        # Names taken from the archive (a pickle's STACK_GLOBAL strings) may hold line breaks.
        super().__init__(_escape_line_breaks(message))


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
        with gzip.open(path, "rb") as gz, tarfile.open(fileobj=(stream := _Capped(gz, path)), mode="r:") as tar:
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
            while stream.read(_CHUNK):  # to the end of the gzip stream, whose CRC check catches a bad tail
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


class _Capped:
    """The decompressed tar stream, refusing to read or seek past MAX_TAR_BYTES: a small gzip of zeros
    (or a tar header that claims a huge member) must not cost gigabytes of memory or minutes of inflating."""

    def __init__(self, stream: gzip.GzipFile, path: Path) -> None:
        self._stream, self._path = stream, path

    def read(self, size: int | None = -1) -> bytes:
        room = MAX_TAR_BYTES - self._stream.tell()
        wanted = room + 1 if size is None or size < 0 else min(size, room + 1)
        # In chunks: GzipFile.read(n) allocates n bytes up front, and a damaged header can claim a gigabyte.
        chunks = []
        while wanted > 0 and (chunk := self._stream.read(min(wanted, _BIG_CHUNK))):
            chunks.append(chunk)
            wanted -= len(chunk)
        data = b"".join(chunks)
        if len(data) > room:
            self._refuse()
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset + (self._stream.tell() if whence == io.SEEK_CUR else 0)
        if whence == io.SEEK_END or target > MAX_TAR_BYTES:
            self._refuse()
        return self._stream.seek(target)

    def tell(self) -> int:
        return self._stream.tell()

    def _refuse(self) -> NoReturn:
        raise DataError(f"archive {self._path}: decompresses to over {MAX_TAR_BYTES} bytes (a gzip bomb?); "
                        f"{_NOT_CIFAR}")


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
    """What a pickle did that a CIFAR pickle has no business doing; the text follows "pickle ..."."""


def _fresh(function: Callable[..., Any]) -> Callable[[], Callable[..., Any]]:
    """A factory of new function objects that call `function`: a pickle's BUILD opcode can set attributes
    on what it gets, and must not alter anything that outlives the load."""

    def factory() -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            return function(*args)
        return call
    return factory


class _ArrayClass:
    """What a pickle gets for `numpy.ndarray`: the class argument of `_reconstruct`, not a constructor
    (`numpy.ndarray(shape, dtype, buffer)` would wrap raw bytes in any dtype)."""

    __slots__ = ()  # nothing a BUILD could set

    def __call__(self, *args: Any) -> NoReturn:
        raise _Refused("calls numpy.ndarray directly")


class _CheckedArray(np.ndarray):
    """An array being unpickled: BUILD hands it numpy's state tuple, whose dtype must be plain numbers.

    numpy trusts the dtype in that state, flags included, and a pickle can rewrite a dtype's flags with
    BUILD: an "object" dtype that claims to hold no objects turns the raw bytes into pointers.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) in (4, 5)):  # (version,) shape, dtype, fortran, bytes
            raise _Refused(f"sets a numpy array's state from a {type(state).__name__}")
        *head, dtype, fortran, raw = state
        super().__setstate__((*head, _plain_dtype(dtype), fortran, raw))


def _empty_array(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b"b")`: the empty array BUILD then fills."""
    if not isinstance(cls, _ArrayClass):
        raise _Refused(f"calls numpy _reconstruct on a {type(cls).__name__}")
    return _reconstruct(_CheckedArray, (0,), "b")


def _pickled_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """`numpy.dtype("u1", False, True)`: always a copy, since BUILD then sets its state (never numpy's shared
    uint8 dtype). `align` and `copy` are ignored."""
    return np.dtype(_plain_dtype(spec).str, False, True)


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()`: how protocol 2 writes b"" (the data of an empty array)."""
    if args:
        raise _Refused("calls bytes with arguments")
    return b""


_PLAIN_KINDS = "biuf"  # bool, signed and unsigned integers, floats: all a CIFAR pickle's arrays hold


def _plain_dtype(spec: Any) -> np.dtype:
    """numpy's own dtype for `spec`, when it is plain numbers: no objects, records, sub-arrays or text."""
    if isinstance(spec, (str, bytes)):
        try:
            dtype = np.dtype(spec)
        except (TypeError, ValueError, SyntaxError):  # SyntaxError: numpy parses "(2,)u1" shape text
            raise _Refused(f"builds an unknown numpy dtype {spec!r:.40}") from None
    elif isinstance(spec, np.dtype):
        dtype = spec  # maybe rewritten by BUILD: only its type and size are read, into a fresh dtype
    else:
        raise _Refused(f"builds a numpy dtype from a {type(spec).__name__}")
    if dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"builds a numpy dtype {dtype.str!r}")
    return np.dtype(dtype.str)


# The only globals a CIFAR pickle needs, each a factory of a fresh stand-in (pickle never imports a module).
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _fresh(_empty_array),  # pickled with numpy 1.x (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _fresh(_empty_array),  # pickled with numpy 2.x
    ("numpy", "ndarray"): _ArrayClass,
    ("numpy", "dtype"): _fresh(_pickled_dtype),
    ("__builtin__", "bytes"): _fresh(_empty_bytes),  # protocol 2 from Python 3
    ("builtins", "bytes"): _fresh(_empty_bytes),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # protocol 2 writes bytes as encode(str, "latin1")
            return _latin1_encoder()
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise _Refused(f"refers to {module}.{name}")
        return factory()

    def persistent_load(self, pid: Any) -> NoReturn:
        raise _Refused("refers to a persistent id")


def _latin1_encoder() -> Callable[..., bytes]:
    """A stand-in for `_codecs.encode` that only does latin1; a fresh one per lookup (see `_ALLOWED`)."""

    def encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if not (isinstance(text, str) and isinstance(encoding, str) and errors == "strict"):
            raise _Refused("refers to _codecs.encode with arguments other than (text, 'latin1')")
        if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
            raise _Refused(f"refers to _codecs.encode with encoding {encoding!r}")
        return text.encode("latin1")

    return encode


def _unpickle(path: Path, member: str, data: bytes) -> Any:
    where = _where(path, member)
    try:
        _check_memo(data)
        # encoding="bytes": Python 2 str -> bytes, as the format's byte keys expect
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as refused:
        raise DataError(f"{where}: pickle {refused}; refusing to load it (CIFAR-100 pickles hold only dicts, "
                        f"lists, bytes and numeric arrays); check data.url / MIXER_DATA_URL") from None
    except Exception as err:  # a malformed pickle raises nearly anything (EOFError, KeyError, ...)
        raise DataError(f"{where}: not a readable pickle ({type(err).__name__}: {_one_line(err)}); "
                        f"re-download the archive") from None


def _check_memo(data: bytes) -> None:
    """Walk the opcodes (without running any) before unpickling: CPython's unpickler sizes its memo by the
    largest index a put names, so a 10-byte pickle with LONG_BINPUT 2**31 would zero 32 GB. Picklers number
    their puts in order (from 0; Python 2 from 1), so an index far beyond the puts so far is refused.
    Costs ~0.7 s for the real train pickle."""
    puts = 0
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if arg > puts + _MEMO_SLACK:
                raise _Refused(f"puts memo slot {arg} after {puts} puts (picklers number them in order)")
            puts += 1
        elif opcode.name == "MEMOIZE":
            puts += 1


_MEMO_SLACK = 1024  # memo slots a put may skip: 16 kB of memo at most


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
    try:
        labels = np.asarray(values) if isinstance(values, (list, np.ndarray)) else None
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged or deeply nested lists
        labels = None
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


def _escape_line_breaks(text: str) -> str:
    """`text` on one line: each line break (as str.splitlines counts them) written as its escape."""
    return "".join(c.encode("unicode_escape").decode("ascii") if c in _LINE_BREAKS else c for c in text)

