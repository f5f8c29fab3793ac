"""All-or-nothing writes of a file or a whole folder.

Each write goes to a temporary name next to its target (same filesystem, so a rename is atomic),
is fsynced, and is renamed into place only when complete. A crash or an exception leaves the previous
target (or none), never a half-written one. Leftovers of a killed process are hidden names:
`.{name}.tmp-XXXXXXXX` (and `.{name}.old-XXXXXXXX` for a folder being swapped out).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; on a clean exit it replaces `target` as a whole.

    On an exception the folder is deleted and `target` is left as it was (or absent).
    Between the two renames of the swap `target` is briefly absent; it is never half-written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(target.parent, f".{target.name}.tmp-", os.mkdir)
    try:
        yield tmp
        _fsync_tree(tmp)  # the data must be on disk before the rename makes it visible
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on a clean exit it replaces `path`, on an exception it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(path.parent, f".{path.name}.tmp-", _create_file)
    try:
        with open(tmp, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as out:
        out.write(data)


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def _swap_in(tmp: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return
    # The old target moves into a fresh holder folder: a name nobody else can be using.
    holder = _fresh(target.parent, f".{target.name}.old-", os.mkdir)
    old = holder / target.name
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the previous one back
        holder.rmdir()
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(holder, ignore_errors=True)


def _fresh(parent: Path, prefix: str, create: Callable[[Path], None]) -> Path:
    """Create a new entry `parent/prefix<random>` with `create`, retrying on a name clash."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: no free temporary name with prefix {prefix}")


def _create_file(path: Path) -> None:
    # "x": exclusive create, with the usual umask-derived mode (mkstemp would force 0600).
    open(path, "xb").close()


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    """Persist a folder's entries (a rename is durable only once its folder is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the data itself is already synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
