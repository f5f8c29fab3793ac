"""A small CIFAR-100 archive in the official pickle layout, and broken variants of it (no network).

Each fine class c is a flat color (one of a 5x5x4 grid of colors, shuffled by `seed`) with a brighter
8x8 square at one of 9 spots (c % 9) and mild noise, so a small MLP-Mixer learns it in a few epochs.
Coarse label = c // 5. The archive bytes are a function of the arguments only (fixed mtimes).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import pickletools
import struct
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = "cifar-100-python"
NUM_FINE, NUM_COARSE = 100, 20


def make_archive(path: Path, per_class_train: int = 20, per_class_test: int = 5, seed: int = 0,
                 filename_prefix: str = "img", classes: int = NUM_FINE) -> str:
    """Write a CIFAR-100-layout tar.gz to `path`; returns its md5."""
    return write_archive(path, cifar_members(per_class_train, per_class_test, seed, filename_prefix, classes))


def cifar_members(per_class_train: int = 20, per_class_test: int = 5, seed: int = 0,
                  filename_prefix: str = "img", classes: int = NUM_FINE) -> dict[str, bytes]:
    """Member name -> protocol 2 pickle bytes, as in the official archive."""
    batches = official_batches(per_class_train, per_class_test, seed, filename_prefix, classes)
    return {f"{ROOT}/{name}": pickle.dumps(obj, protocol=2) for name, obj in batches.items()}


def official_batches(per_class_train: int = 20, per_class_test: int = 5, seed: int = 0,
                     filename_prefix: str = "img", classes: int = NUM_FINE) -> dict[str, dict[bytes, Any]]:
    """The unpickled train/test/meta dicts (byte keys, data (N, 3072) uint8 in CHW row order).

    `classes` < 100 draws images of the first `classes` fine classes only (the label names stay 100):
    still a valid archive, and a tiny one for fuzzing the parser.
    """
    rng = np.random.default_rng(seed)
    levels = [(0, 40, 80, 120, 160), (0, 40, 80, 120, 160), (10, 60, 110, 160)]
    grid = np.stack(np.meshgrid(*levels, indexing="ij"), axis=-1).reshape(-1, 3)  # (100, 3) distinct colors
    palette = grid[rng.permutation(NUM_FINE)]
    batches: dict[str, dict[bytes, Any]] = {}
    for name, per_class, label in (("train", per_class_train, b"training batch 1 of 1"),
                                   ("test", per_class_test, b"testing batch 1 of 1")):
        fine = rng.permutation(np.repeat(np.arange(classes), per_class))  # shuffled, like the official order
        images = _draw(fine, palette, rng)  # (N, 32, 32, 3)
        batches[name] = {
            b"filenames": [f"{filename_prefix}_{name}_{i:05d}.png".encode() for i in range(len(fine))],
            b"batch_label": label,
            b"fine_labels": [int(c) for c in fine],
            b"coarse_labels": [int(c) // 5 for c in fine],
            b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(fine), -1),  # CHW rows
        }
    batches["meta"] = {
        b"fine_label_names": [f"fine_{c:02d}".encode() for c in range(NUM_FINE)],
        b"coarse_label_names": [f"coarse_{c:02d}".encode() for c in range(NUM_COARSE)],
    }
    return batches


def _draw(fine: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    images = np.empty((len(fine), 32, 32, 3), dtype=np.float32)
    images[:] = palette[fine][:, None, None, :]
    for i, c in enumerate(fine):
        top, left = (c % 9) // 3 * 12, (c % 9) % 3 * 12  # spots at 0, 12, 24 px
        images[i, top:top + 8, left:left + 8] += 80
    images += rng.normal(0.0, 6.0, images.shape)  # mild noise, in pixel units
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def write_archive(path: Path, members: Mapping[str, bytes],
                  extra: Sequence[tuple[tarfile.TarInfo, bytes]] = ()) -> str:
    """A tar.gz with the root folder, `members` (name -> bytes) and `extra` entries; returns its md5."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(entry(ROOT, tarfile.DIRTYPE)[0])
        for name, data in members.items():
            tar.addfile(entry(name, data=data)[0], io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    blob = gzip.compress(buffer.getvalue(), compresslevel=1, mtime=0)
    Path(path).write_bytes(blob)
    return hashlib.md5(blob).hexdigest()


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
          linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    """A tar entry of any type (file, symlink, device...) with fixed metadata."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 0
    return info, data


def code_pickle(callable_: Any, *args: Any) -> bytes:
    """A pickle that calls `callable_(*args)` when loaded: what a hostile archive would carry."""

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
            return callable_, args

    return pickle.dumps({b"data": Payload()}, protocol=2)


def reduce_pickle(module: str, name: str, *args: Any) -> bytes:
    """A pickle that calls `module.name(*args)` when loaded (GLOBAL + REDUCE), for any name: unlike
    `code_pickle` the callable need not exist here."""
    return pickle.PROTO + b"\x02" + global_opcode(module, name) + opcodes(args) + pickle.REDUCE + pickle.STOP


def global_opcode(module: str, name: str) -> bytes:
    """GLOBAL for names without line breaks; STACK_GLOBAL (protocol 4) for any strings."""
    if "\n" in module + name:
        return opcodes(module) + opcodes(name) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def opcodes(value: Any) -> bytes:
    """The opcodes that push `value` (a plain object), without PROTO and STOP, to splice into a
    hand-written pickle. Their memo slots may overwrite earlier ones; a splice never reads those."""
    return pickle.dumps(value, protocol=2)[2:-1]


def array_pickle(dtype: str, state: tuple[Any, ...] | None = None, raw: Any = b"A" * 16,
                 shape: tuple[int, ...] = (2,)) -> bytes:
    """A pickle of an array as numpy writes one (`_reconstruct` + BUILD, with `numpy.dtype(dtype, False,
    True)`), where `state` optionally rewrites the dtype with a BUILD first: e.g. dtype "O8" with the
    flags in `state` set to 0 claims to hold no objects, making `raw` (0x41...) its object pointers."""
    build_dtype = opcodes(state) + pickle.BUILD if state is not None else b""
    return (pickle.PROTO + b"\x02"
            + global_opcode("numpy._core.multiarray", "_reconstruct") + global_opcode("numpy", "ndarray")
            + opcodes((0,)) + opcodes(b"b") + pickle.TUPLE3 + pickle.REDUCE
            + pickle.MARK + opcodes(1) + opcodes(shape)
            + global_opcode("numpy", "dtype") + opcodes((dtype, False, True)) + pickle.REDUCE + build_dtype
            + pickle.NEWFALSE + opcodes(raw) + pickle.TUPLE + pickle.BUILD + pickle.STOP)


def shift_memo(blob: bytes, offset: int) -> bytes:
    """`blob` with every memo index moved by `offset`: Python 2's cPickle (the official archive) numbers
    the memo from 1, Python 3 from 0."""
    ops = list(pickletools.genops(blob))
    out = bytearray()
    for (op, arg, pos), (_, _, end) in zip(ops, [*ops[1:], (None, None, len(blob))], strict=True):
        if op.name in ("BINPUT", "LONG_BINPUT"):
            out += pickle.LONG_BINPUT + struct.pack("<I", arg + offset)
        elif op.name in ("BINGET", "LONG_BINGET"):
            out += pickle.LONG_BINGET + struct.pack("<I", arg + offset)
        else:
            out += blob[pos:end]
    return bytes(out)


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()
