"""Ingest and load: checksums, hostile and broken archives, atomic outputs, reproducible bytes, splits."""

from __future__ import annotations

import builtins
import contextlib
import codecs
import dataclasses
import gzip
import io
import logging
import os
import pickle
import pickletools
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mixer import atomic, cifar_archive, data
from mixer.cifar_archive import read_archive
from mixer.config import DataConfig
from mixer.data import DataError
from tests.synthetic import (ROOT, array_pickle, cifar_members, code_pickle, entry, global_opcode, make_archive,
                             official_batches, opcodes, reduce_pickle, shift_memo, write_archive)

URL = "https://example.invalid/mirror/cifar-100-python.tar.gz"


def error_of(fn: Callable[..., Any], *args: Any) -> str:
    """The DataError message `fn(*args)` raises; every one must be a single line."""
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def config_for(tmp_path: Path, members: dict[str, bytes],
               extra: list[tuple[tarfile.TarInfo, bytes]] | None = None) -> DataConfig:
    """A config for an archive of these members (md5 right, so the contents are what gets tested)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "archive.tar.gz"
    md5 = write_archive(path, members, extra or [])
    return DataConfig(url=str(path), md5=md5, download_dir=tmp_path / "downloads",
                      out_dir=tmp_path / "data" / "cifar100", val_fraction=0.1, split_seed=0)


def small_members(member: str | None = None, change: Callable[[dict[bytes, Any]], Any] | None = None,
                  ) -> dict[str, bytes]:
    """A 200-image archive's members, with `change` applied to one unpickled batch."""
    batches = official_batches(per_class_train=2, per_class_test=1)
    if member and change:
        changed = change(batches[member])
        if changed is not None:
            batches[member] = changed
    return {f"{ROOT}/{name}": pickle.dumps(obj, protocol=2) for name, obj in batches.items()}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(cfg: DataConfig) -> list[str]:
    """Temporary folders of atomic_dir still next to out_dir."""
    parent = cfg.out_dir.parent
    if not parent.exists():
        return []
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{cfg.out_dir.name}.")]


# --- a good archive --------------------------------------------------------------------------


def test_ingest_writes_three_splits_and_meta(data_config: DataConfig) -> None:
    out = data.ingest(data_config)
    assert out == data_config.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz", "val.npz"]
    meta = data.load_meta(out)
    assert meta["counts"] == {"train": 1800, "val": 200, "test": 500}
    assert set(meta) == {"fine_label_names", "coarse_label_names", "counts", "mean", "std"}
    assert meta["fine_label_names"][:2] == ["fine_00", "fine_01"] and len(meta["fine_label_names"]) == 100
    assert len(meta["coarse_label_names"]) == 20
    train = data.load_split(out, "train")
    pixels = train.images.reshape(-1, 3) / 255.0
    assert meta["mean"] == pytest.approx(pixels.mean(axis=0), abs=1e-6)
    assert meta["std"] == pytest.approx(pixels.std(axis=0), abs=1e-6)
    text = (out / "meta.json").read_text()
    assert text.endswith("}\n") and text.index('"coarse_label_names"') < text.index('"counts"')


def test_load_split_round_trips_the_official_arrays_in_nhwc(data_config: DataConfig,
                                                            synthetic_archive: tuple[Path, str]) -> None:
    data.ingest(data_config)
    official = read_archive(synthetic_archive[0])
    train_idx, val_idx = data.split_indices(official.train["fine_labels"], 0.1, 0)
    expected = {"train": (official.train, train_idx), "val": (official.train, val_idx),
                "test": (official.test, slice(None))}
    for name, (arrays, rows) in expected.items():
        split = data.load_split(data_config.out_dir, name)
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)
        assert split.fine_labels.dtype == np.int64 and split.coarse_labels.dtype == np.int64
        assert len(split) == len(split.fine_labels) == len(split.coarse_labels)
        for key in data.ARRAYS:
            np.testing.assert_array_equal(getattr(split, key), arrays[key][rows])
    # The raw rows are CHW: pixel (y, x) of channel c sits at c * 1024 + y * 32 + x.
    raw = official_batches()["test"]
    test = data.load_split(data_config.out_dir, "test")
    i, y, x, c = 7, 5, 30, 2
    assert test.images[i, y, x, c] == raw[b"data"][i, c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(test.coarse_labels, np.asarray(raw[b"fine_labels"]) // 5)


def test_pickles_written_by_numpy_1_are_read(tmp_path: Path, data_config: DataConfig) -> None:
    # The official files name numpy.core.multiarray._reconstruct; numpy 2 writes numpy._core.
    members = {name: blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
               for name, blob in cifar_members().items()}
    assert all(b"numpy._core" not in blob for blob in members.values())
    old = config_for(tmp_path, members)
    data.ingest(old)
    data.ingest(data_config)
    for name in ("train.npz", "val.npz", "test.npz"):
        assert (old.out_dir / name).read_bytes() == (data_config.out_dir / name).read_bytes()


def test_pickles_numbered_as_python_2_does_are_read(tmp_path: Path) -> None:
    # The official files come from Python 2, whose memo starts at 1.
    members = small_members()
    shifted = {name: shift_memo(blob, 1) for name, blob in members.items()}
    first_put = next(arg for op, arg, _ in pickletools.genops(shifted[f"{ROOT}/meta"]) if "PUT" in op.name)
    assert first_put == 1
    official = read_archive(Path(config_for(tmp_path / "py2", shifted).url))
    expected = read_archive(Path(config_for(tmp_path / "py3", members).url))
    for key in data.ARRAYS:
        np.testing.assert_array_equal(official.train[key], expected.train[key])
    assert official.fine_label_names == expected.fine_label_names


def test_outputs_are_byte_identical_across_runs_and_file_names(tmp_path: Path,
                                                               data_config: DataConfig) -> None:
    first = data.ingest(data_config)
    again = data.ingest(dataclasses.replace(data_config, out_dir=tmp_path / "again"))
    assert snapshot(first) == snapshot(again)
    renamed_path = tmp_path / "renamed.tar.gz"
    renamed_md5 = make_archive(renamed_path, filename_prefix="other")
    assert renamed_md5 != data_config.md5  # the archives differ, in b'filenames' only
    renamed = data.ingest(dataclasses.replace(data_config, url=str(renamed_path), md5=renamed_md5,
                                              out_dir=tmp_path / "renamed"))
    assert snapshot(first) == snapshot(renamed)  # meta.json included: the data version is the data's


def test_val_is_stratified_disjoint_ordered_and_deterministic(data_config: DataConfig) -> None:
    labels = np.repeat(np.arange(100), 20)[np.random.default_rng(1).permutation(2000)]
    train, val = data.split_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[val], minlength=100).tolist() == [2] * 100  # round(20 * 0.1) per class
    assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == 2000
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # the official order is kept
    again = data.split_indices(labels, 0.1, seed=0)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, data.split_indices(labels, 0.1, seed=1)[1])
    uneven = np.array([0] * 7 + [1] * 3)
    assert np.bincount(uneven[data.split_indices(uneven, 0.25, 0)[1]]).tolist() == [2, 1]  # 1.75, 0.75
    data.ingest(data_config)
    val_labels = data.load_split(data_config.out_dir, "val").fine_labels
    train_labels = data.load_split(data_config.out_dir, "train").fine_labels
    assert np.bincount(val_labels, minlength=100).tolist() == [2] * 100
    assert np.bincount(train_labels, minlength=100).tolist() == [18] * 100


# --- fetch: local, file://, download, cache ----------------------------------------------------


def test_file_url_and_local_path_are_used_in_place(data_config: DataConfig,
                                                   synthetic_archive: tuple[Path, str]) -> None:
    path = synthetic_archive[0]
    assert data.fetch(dataclasses.replace(data_config, url=path.as_uri())) == path
    assert data.fetch(data_config) == path
    assert not data_config.download_dir.exists()  # nothing copied


def test_cached_download_is_reused_without_network(data_config: DataConfig,
                                                   synthetic_archive: tuple[Path, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cached = data_config.download_dir / "cifar-100-python.tar.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(synthetic_archive[0].read_bytes())
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert data.fetch(dataclasses.replace(data_config, url=URL)) == cached


def test_download_is_verified_then_cached(data_config: DataConfig, synthetic_archive: tuple[Path, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    blob = synthetic_archive[0].read_bytes()
    dest = data_config.download_dir / "cifar-100-python.tar.gz"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"a stale, wrong download")  # replaced, since its md5 is wrong
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
    cfg = dataclasses.replace(data_config, url=URL)
    assert data.fetch(cfg) == dest and dest.read_bytes() == blob
    assert os.listdir(data_config.download_dir) == ["cifar-100-python.tar.gz"]  # no temporary left
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert data.fetch(cfg) == dest


def test_bad_download_is_deleted(data_config: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"<html>not found</html>"))
    message = error_of(data.fetch, dataclasses.replace(data_config, url=URL))
    assert "does not match data.md5" in message and URL in message
    assert os.listdir(data_config.download_dir) == []


def test_network_failure_is_one_clear_error(data_config: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(url: str, timeout: float) -> Any:
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    message = error_of(data.fetch, dataclasses.replace(data_config, url=URL))
    assert "failed" in message and "Network is unreachable" in message and "MIXER_DATA_URL" in message


def test_missing_file_and_unknown_scheme(data_config: DataConfig, tmp_path: Path) -> None:
    missing = dataclasses.replace(data_config, url=str(tmp_path / "none.tgz"))
    assert "not found" in error_of(data.fetch, missing)
    assert "unsupported scheme" in error_of(data.fetch, dataclasses.replace(data_config, url="ftp://h/a.tgz"))


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the network was used")


# --- refused archives: one line, nothing read, the previous outputs byte-identical ---------------


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(path, md5) of the 200-image archive of `small_members()`."""
    path = tmp_path_factory.mktemp("small") / "archive.tar.gz"
    return path, write_archive(path, small_members())


@pytest.fixture
def prepared(tmp_path: Path, small_archive: tuple[Path, str]) -> DataConfig:
    """A good ingest already in tmp_path/data/cifar100: every refused archive below must leave it as it was."""
    good = DataConfig(url=str(small_archive[0]), md5=small_archive[1], download_dir=tmp_path / "downloads",
                      out_dir=tmp_path / "data" / "cifar100", val_fraction=0.5, split_seed=0)
    data.ingest(good)
    return good


def refused(cfg: DataConfig, prepared: DataConfig) -> str:
    """Ingest `cfg` over the prepared outputs: its one-line DataError; the old files byte-identical, no temporaries."""
    before = snapshot(prepared.out_dir)
    assert sorted(before) == ["meta.json", "test.npz", "train.npz", "val.npz"]
    message = error_of(data.ingest, dataclasses.replace(cfg, out_dir=prepared.out_dir))
    assert snapshot(prepared.out_dir) == before and leftovers(prepared) == []
    return message


def test_checksum_mismatch_reads_nothing(data_config: DataConfig, synthetic_archive: tuple[Path, str],
                                         prepared: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "read_archive", _no_network)  # must not be reached
    message = refused(dataclasses.replace(data_config, md5="0" * 32), prepared)
    assert message == (f"archive {synthetic_archive[0]}: md5 {data_config.md5} does not match data.md5 {'0' * 32}; "
                       f"re-download it or fix data.md5 / MIXER_DATA_MD5")
    assert synthetic_archive[0].exists()  # a local archive is kept


@pytest.mark.parametrize("make, words", [
    (lambda path: None, "not found; fix data.url / MIXER_DATA_URL"),
    (lambda path: path.write_bytes(b""), "empty (0 bytes); re-download it or fix data.url / MIXER_DATA_URL"),
    (lambda path: path.mkdir(), "a folder, not the archive file; fix data.url / MIXER_DATA_URL"),
], ids=["missing", "empty", "folder"])
def test_a_missing_or_empty_archive(tmp_path: Path, prepared: DataConfig, make: Callable[[Path], Any],
                                    words: str) -> None:
    path = tmp_path / "cifar-100-python.tar.gz"
    make(path)
    message = refused(dataclasses.replace(prepared, url=str(path), md5="d41d8cd98f00b204e9800998ecf8427e"), prepared)
    assert message == f"archive {path}: {words}"


@pytest.mark.parametrize("damage", [
    lambda blob: blob[:len(blob) // 2],  # truncated
    lambda blob: blob[:len(blob) // 2] + bytes(64) + blob[len(blob) // 2 + 64:],  # corrupt middle
    lambda blob: blob[:-8] + bytes(8),  # corrupt gzip trailer: caught only by reading to the end
    lambda blob: b"<html>Service unavailable</html>",  # not a gzip file
    lambda blob: gzip.compress(b"not a tar file" * 100),  # a gzip, but not of a tar
], ids=["truncated", "corrupt", "bad-trailer", "not-gzip", "not-tar"])
def test_truncated_or_corrupt_archive(tmp_path: Path, prepared: DataConfig, small_archive: tuple[Path, str],
                                      damage: Callable[[bytes], bytes]) -> None:
    path = tmp_path / "damaged.tgz"
    path.write_bytes(damage(small_archive[0].read_bytes()))
    cfg = dataclasses.replace(prepared, url=str(path), md5=data.file_md5(path))
    message = refused(cfg, prepared)
    assert message.startswith(f"archive {path}: not a readable tar.gz (")
    assert message.endswith("); re-download it (it is truncated or corrupt)")


@pytest.mark.parametrize("bad, words", [
    (entry("../evil.txt", data=b"x"), "escapes the archive root"),
    (entry(f"{ROOT}/../../evil.txt", data=b"x"), "escapes the archive root"),
    (entry("/tmp/evil.txt", data=b"x"), "escapes the archive root"),
    (entry(f"{ROOT}/link", tarfile.SYMTYPE, linkname="/etc/passwd"), "is a symlink"),
    (entry(f"{ROOT}/hard", tarfile.LNKTYPE, linkname=f"{ROOT}/meta"), "is a hard link"),
    (entry(f"{ROOT}/dev", tarfile.CHRTYPE), "is a device"),
    (entry(f"{ROOT}/disk", tarfile.BLKTYPE), "is a device"),
    (entry(f"{ROOT}/fifo", tarfile.FIFOTYPE), "is a fifo"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "char-device", "block-device", "fifo"])
def test_unsafe_members_are_refused(tmp_path: Path, prepared: DataConfig, bad: tuple[tarfile.TarInfo, bytes],
                                    words: str) -> None:
    cfg = config_for(tmp_path, small_members(), extra=[bad])
    message = refused(cfg, prepared)
    assert words in message and repr(bad[0].name) in message
    assert not (tmp_path.parent / "evil.txt").exists()


def test_a_symlink_in_place_of_a_pickle_is_refused(tmp_path: Path, prepared: DataConfig) -> None:
    members = small_members()
    del members[f"{ROOT}/train"]
    link = entry(f"{ROOT}/train", tarfile.SYMTYPE, linkname="/etc/passwd")
    cfg = config_for(tmp_path, members, extra=[link])
    assert refused(cfg, prepared) == (f"archive {cfg.url}: member '{ROOT}/train' is a symlink; "
                                      f"only files and folders are allowed")


def test_missing_member(tmp_path: Path, prepared: DataConfig) -> None:
    members = small_members()
    del members[f"{ROOT}/test"]
    assert "missing member(s) cifar-100-python/test" in refused(config_for(tmp_path, members), prepared)


def test_a_member_twice(tmp_path: Path, prepared: DataConfig) -> None:
    members = small_members()
    cfg = config_for(tmp_path, members, extra=[entry(f"{ROOT}/meta", data=members[f"{ROOT}/meta"])])
    assert f"member {ROOT}/meta: appears twice" in refused(cfg, prepared)


def test_a_huge_member_is_refused_before_it_is_read(tmp_path: Path, prepared: DataConfig,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar_archive, "MAX_MEMBER_BYTES", 1000)  # the train pickle of small_members is 12 kB
    assert "bytes is implausibly large" in refused(config_for(tmp_path, small_members()), prepared)


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path, prepared: DataConfig,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar_archive, "MAX_TAR_BYTES", 2 << 20)  # stands for the real 2 GiB; the members take 1 MB
    zeros = bytes(8 << 20)  # a member nobody reads, 8 kB once compressed
    cfg = config_for(tmp_path, small_members(), extra=[entry(f"{ROOT}/zeros", data=zeros)])
    assert f"decompresses to over {2 << 20} bytes (a gzip bomb?)" in refused(cfg, prepared)


@pytest.mark.parametrize("payload, words", [
    (lambda marker: code_pickle(os.system, f"touch {marker}"), f"refers to {os.system.__module__}.system"),
    # protocol 2 spells builtins.exec as __builtin__.exec
    (lambda marker: code_pickle(builtins.exec, f"open({str(marker)!r}, 'w').close()"), ".exec"),
    (lambda marker: code_pickle(builtins.eval, f"open({str(marker)!r}, 'w')"), ".eval"),
    (lambda marker: code_pickle(codecs.encode, str(marker), "rot13"), "_codecs.encode with encoding 'rot13'"),
    (lambda marker: reduce_pickle("subprocess", "call", ["touch", str(marker)]), "refers to subprocess.call"),
    (lambda marker: reduce_pickle("numpy", "load", str(marker), True), "refers to numpy.load"),  # allow_pickle
    (lambda marker: reduce_pickle("builtins", "bytes", 1 << 40), "calls bytes with arguments"),  # 1 TB
    (lambda marker: reduce_pickle("os\nsystem", "x", f"touch {marker}"), r"refers to os\nsystem.x"),
    (lambda marker: pickle.PROTO + b"\x02" + opcodes("id") + pickle.BINPERSID + pickle.STOP,
     "refers to a persistent id"),
    # 10 bytes that would make CPython's unpickler zero a 32 GB memo
    (lambda marker: pickle.PROTO + b"\x02" + pickle.NONE + pickle.LONG_BINPUT + (1 << 31).to_bytes(4, "little")
     + pickle.STOP, "puts memo slot 2147483648 after 0 puts"),
], ids=["os.system", "exec", "eval", "codecs-rot13", "subprocess", "numpy.load", "bytes-1TB", "line-break-in-name",
        "persistent-id", "memo-bomb"])
def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path: Path, prepared: DataConfig,
                                                           payload: Callable[[Path], bytes], words: str) -> None:
    marker = tmp_path / "pwned"
    members = small_members()
    members[f"{ROOT}/train"] = payload(marker)
    message = refused(config_for(tmp_path, members), prepared)
    assert message.startswith(f"archive {tmp_path / 'archive.tar.gz'}: member {ROOT}/train: pickle ")
    assert words in message and message.endswith("; refusing to load it (CIFAR-100 pickles hold only dicts, lists, "
                                                  "bytes and numeric arrays); check data.url / MIXER_DATA_URL")
    assert not marker.exists()


# numpy's dtype state (version 3) with flags 0: an object dtype that claims to hold no object pointers
FLAGS_OFF = (3, "|", None, None, None, -1, -1, 0)
OBJECT_FLAGS = 63  # what numpy's "O" dtype carries: refcounted items, pickled as a list, ...


@pytest.mark.parametrize("blob, words", [
    # Before the stand-ins, this made an object array whose pointers were 0x4141...: touching it crashed.
    (array_pickle("O8", FLAGS_OFF), "pickle builds a numpy dtype '|O'; refusing to load it"),
    (array_pickle("O8", raw=[b"an", b"object"]), "pickle builds a numpy dtype '|O'"),
    (array_pickle("V16"), "pickle builds a numpy dtype '|V16'"),
    (array_pickle("u8", (3, "|", None, ("x",), {"x": (np.dtype("u1"), 0)}, 8, 1, 0)), "pickle builds a numpy dtype"),
    (array_pickle("u8", (3, "<", None, None, None, -1, -1, OBJECT_FLAGS), raw=[1, 2]), "not a readable pickle"),
    (reduce_pickle("numpy", "ndarray", (2,), "u8", b"A" * 16), "pickle calls numpy.ndarray directly"),
    (reduce_pickle("numpy._core.multiarray", "_reconstruct", "numpy.ndarray", (0,), b"b"),
     "pickle calls numpy _reconstruct on a str"),
], ids=["object-dtype-flags-off", "object-dtype", "void-dtype", "record-fields", "uint-with-object-flags",
        "ndarray-over-a-buffer", "reconstruct-of-a-non-array"])
def test_allowed_numpy_globals_build_only_arrays_of_plain_numbers(tmp_path: Path, prepared: DataConfig,
                                                                  blob: bytes, words: str) -> None:
    members = small_members()
    members[f"{ROOT}/train"] = blob
    message = refused(config_for(tmp_path, members), prepared)
    assert words in message
    assert np.dtype(np.uint8).fields is None and not np.dtype(np.uint64).hasobject  # numpy's own dtypes intact


def test_a_pickle_cannot_alter_numpys_shared_dtypes(tmp_path: Path) -> None:
    # numpy.dtype("u1", False, False) is numpy's one uint8 dtype: the stand-in hands out a copy, so a BUILD
    # that rewrites it (here: fields and flags) changes nothing outside the load.
    rewrite = pickle.PROTO + b"\x02" + global_opcode("numpy", "dtype") + opcodes(("u1", False, False)) \
        + pickle.REDUCE + opcodes((3, "|", None, ("x",), {"x": (np.dtype("u1"), 0)}, 1, 1, OBJECT_FLAGS)) \
        + pickle.BUILD + pickle.STOP
    members = small_members()
    members[f"{ROOT}/meta"] = rewrite
    message = error_of(cifar_archive.read_archive, Path(config_for(tmp_path, members).url))
    assert "member cifar-100-python/meta: expected a dict, got " in message  # a dtype, whatever numpy calls it
    assert np.dtype(np.uint8).fields is None and np.dtype(np.uint8).flags == 0
    assert np.array([1, 2], dtype=np.uint8).sum() == 3


def _set(key: bytes, value: Callable[[Any], Any]) -> Callable[[dict[bytes, Any]], None]:
    return lambda batch: batch.__setitem__(key, value(batch[key]))


@pytest.mark.parametrize("member, change, words", [
    ("train", _set(b"data", lambda d: d[:, :3071]), "uint8 array of shape (N, 3072), got uint8 (200, 3071)"),
    ("train", _set(b"data", lambda d: d.astype(np.float32)), "uint8 array of shape (N, 3072), got float32"),
    ("train", _set(b"data", lambda d: d.reshape(-1)), "uint8 array of shape (N, 3072), got uint8 (614400,)"),
    ("test", _set(b"data", lambda d: d[:0]), "uint8 array of shape (N, 3072), got uint8 (0, 3072)"),
    ("train", _set(b"data", lambda d: d.tolist()), "uint8 array of shape (N, 3072), got list"),
    ("train", _set(b"fine_labels", lambda v: [100] + v[1:]),
     "fine_labels must lie in [0, 100), got [0, 100]"),
    ("test", _set(b"coarse_labels", lambda v: [-1] + v[1:]),
     "coarse_labels must lie in [0, 20), got [-1, 19]"),
    ("train", _set(b"coarse_labels", lambda v: [20] + v[1:]),
     "coarse_labels must lie in [0, 20), got [0, 20]"),
    ("test", _set(b"fine_labels", lambda v: v[:-1]), "fine_labels must be 100 integers (one per image)"),
    ("train", _set(b"coarse_labels", lambda v: v + [0]),
     "coarse_labels must be 200 integers (one per image), got int64 (201,)"),
    ("train", _set(b"fine_labels", lambda v: [str(x) for x in v]), "fine_labels must be 200 integers"),
    ("train", _set(b"fine_labels", lambda v: [float(x) for x in v]),
     "fine_labels must be 200 integers (one per image), got float64"),
    ("train", _set(b"fine_labels", lambda v: [[x] for x in v[:-1]] + [[1, 2]]),  # ragged
     "fine_labels must be 200 integers (one per image), got list"),
    ("train", _set(b"fine_labels", lambda v: [2 ** 70] + v[1:]),
     "fine_labels must be 200 integers (one per image), got object"),
    ("train", lambda batch: batch.__delitem__(b"coarse_labels"), "missing key(s) coarse_labels"),
    ("test", lambda batch: [batch], "expected a dict, got list"),
    ("meta", lambda batch: list(batch.values()), "expected a dict, got list"),
    ("meta", _set(b"fine_label_names", lambda v: v[:99]),
     "fine_label_names must be 100 byte strings, got 99"),
    ("meta", _set(b"coarse_label_names", lambda v: None), "coarse_label_names must be 20 byte strings"),
    ("meta", _set(b"fine_label_names", lambda v: [b"\xff"] + v[1:]), "fine_label_names is not UTF-8 text"),
], ids=["width", "dtype", "flat", "no-rows", "data-list", "fine-high", "coarse-negative", "coarse-high", "count",
        "coarse-count", "str-labels", "float-labels", "ragged-labels", "huge-label", "missing-key", "not-dict",
        "meta-not-dict", "fine-names", "coarse-names", "names-not-utf8"])
def test_wrong_shapes_and_labels_are_refused(tmp_path: Path, prepared: DataConfig, member: str,
                                             change: Callable[[dict[bytes, Any]], Any], words: str) -> None:
    message = refused(config_for(tmp_path, small_members(member, change)), prepared)
    assert words in message and f"{ROOT}/{member}" in message and message.endswith(
        "it is not the CIFAR-100 python format; check data.url / MIXER_DATA_URL")


def test_a_val_fraction_that_rounds_to_no_image(tmp_path: Path, prepared: DataConfig) -> None:
    cfg = dataclasses.replace(config_for(tmp_path, small_members()), val_fraction=0.1)  # 2 per class * 0.1 -> 0
    assert refused(cfg, prepared) == ("data.val_fraction 0.1: rounds to no validation image in any class "
                                      "(200 training images); raise it")


# --- atomic outputs ------------------------------------------------------------------------------


def test_a_failed_ingest_keeps_the_previous_outputs(tmp_path: Path, data_config: DataConfig) -> None:
    data.ingest(data_config)
    before = snapshot(data_config.out_dir)
    broken = small_members("train", _set(b"fine_labels", lambda v: [100] + v[1:]))
    bad = dataclasses.replace(config_for(tmp_path / "bad", broken), out_dir=data_config.out_dir)
    error_of(data.ingest, bad)
    assert snapshot(data_config.out_dir) == before and leftovers(data_config) == []


@pytest.mark.parametrize("previous", [False, True])
def test_a_failure_mid_write_leaves_no_half_set(data_config: DataConfig, monkeypatch: pytest.MonkeyPatch,
                                                previous: bool) -> None:
    if previous:
        data.ingest(data_config)
        (data_config.out_dir / "stale.txt").write_text("from an older layout")
    before = snapshot(data_config.out_dir) if previous else None
    write, calls = data._write_npz, []

    def write_then_fail(path: Path, split: data.Split) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        write(path, split)

    monkeypatch.setattr(data, "_write_npz", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        data.ingest(data_config)
    assert calls == ["train.npz", "val.npz"]
    assert leftovers(data_config) == []
    if previous:
        assert snapshot(data_config.out_dir) == before
        monkeypatch.setattr(data, "_write_npz", write)
        data.ingest(data_config)  # a good ingest replaces the folder as a whole
        assert "stale.txt" not in os.listdir(data_config.out_dir)
    else:
        assert not data_config.out_dir.exists()


def test_atomic_file_replaces_or_keeps(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "model.json"
    atomic.atomic_write_text(path, "v1\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(path) as out:
            out.write(b"half of v2")
            raise RuntimeError("interrupted")
    assert path.read_text() == "v1\n" and os.listdir(path.parent) == ["model.json"]
    atomic.atomic_write_bytes(path, b"v2\n")
    assert path.read_bytes() == b"v2\n"


# --- load errors ---------------------------------------------------------------------------------


def test_load_errors_say_how_to_fix(tmp_path: Path) -> None:
    assert "mixer ingest" in error_of(data.load_split, tmp_path, "train")
    assert "mixer ingest" in error_of(data.load_meta, tmp_path)
    assert "expected one of train, val, test" in error_of(data.load_split, tmp_path, "holdout")
    (tmp_path / "val.npz").write_bytes(b"not a zip")
    assert "unreadable" in error_of(data.load_split, tmp_path, "val")


@pytest.mark.parametrize("damage, words", [
    (lambda path: path.write_bytes(b""), "unreadable (No data left in file)"),
    (lambda path: path.write_bytes(path.read_bytes()[:5000]), "unreadable ("),
    (lambda path: data._write_npz(path, _relabel(data.load_split(path.parent, "val"), fine=100)),
     "fine_labels outside [0, 100) (got [0, 100])"),
    (lambda path: data._write_npz(path, _relabel(data.load_split(path.parent, "val"), coarse=-1)),
     "coarse_labels outside [0, 20) (got [-1, 19])"),
], ids=["empty", "truncated", "fine-label-100", "coarse-label-negative"])
def test_a_damaged_prepared_split_is_one_clear_error(prepared: DataConfig, damage: Callable[[Path], Any],
                                                     words: str) -> None:
    path = prepared.out_dir / "val.npz"
    damage(path)
    message = error_of(data.load_split, prepared.out_dir, "val")
    assert message.startswith(f"{path}: {words}") and message.endswith("; run `mixer ingest` (or `dvc repro ingest`)")


def _relabel(split: data.Split, fine: int | None = None, coarse: int | None = None) -> data.Split:
    fine_labels, coarse_labels = split.fine_labels.copy(), split.coarse_labels.copy()
    fine_labels[-1] = fine if fine is not None else fine_labels[-1]
    coarse_labels[-1] = coarse if coarse is not None else coarse_labels[-1]
    return data.Split(split.images, fine_labels, coarse_labels)


def test_every_member_is_checked_before_any_pickle_is_read(tmp_path: Path, prepared: DataConfig) -> None:
    marker = tmp_path / "pwned"
    members = small_members()
    members[f"{ROOT}/train"] = code_pickle(os.system, f"touch {marker}")
    cfg = config_for(tmp_path, members, extra=[entry(f"{ROOT}/zz-link", tarfile.SYMTYPE, linkname="/")])
    assert "is a symlink" in refused(cfg, prepared)  # the symlink comes last in the archive
    assert not marker.exists()


# --- prepared data vs dvc.lock ---------------------------------------------------------------------

# DVC's own code (dvc/repo/graph.py) warns about its use of a dependency; nothing here to act on.
dvc_warning = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")


@pytest.fixture
def dvc_project(tmp_path: Path, small_archive: tuple[Path, str]) -> DataConfig:
    """A DVC repository (no git) whose `ingest` stage output data/cifar100 is committed to dvc.lock."""
    from dvc.repo import Repo

    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    # site_cache_dir: DVC's hash database stays under tmp_path
    (root / ".dvc" / "config").write_text(f"[core]\n    no_scm = true\n    site_cache_dir = {tmp_path / 'site'}\n")
    (root / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: mixer ingest\n    outs:\n      - data/cifar100\n")
    cfg = DataConfig(url=str(small_archive[0]), md5=small_archive[1], download_dir=tmp_path / "downloads",
                     out_dir=root / "data" / "cifar100", val_fraction=0.5, split_seed=0)
    data.ingest(cfg)
    with quiet_dvc(), Repo(str(root)) as repo:
        repo.commit(f"{root / 'dvc.yaml'}:ingest", force=True)
    return cfg


@contextlib.contextmanager
def quiet_dvc() -> Iterator[None]:
    """DVC's progress lines off: its log handler may hold a stream an earlier test's capture closed."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def restore(cfg: DataConfig) -> None:
    """What the error message tells the user to run: `dvc checkout data/cifar100`."""
    from dvc.repo import Repo

    root = cfg.out_dir.parents[1]
    with quiet_dvc(), Repo(str(root)) as repo:
        repo.checkout(str(cfg.out_dir), force=True)


@dvc_warning
@pytest.mark.parametrize("change", [
    lambda out: (out / "val.npz").write_bytes((out / "val.npz").read_bytes() + b"\0"),  # edited
    lambda out: (out / "test.npz").write_bytes((out / "val.npz").read_bytes()),  # replaced by another split
    lambda out: (out / "notes.txt").write_text("scratch"),  # a file added
    lambda out: (out / "meta.json").unlink(),  # a file removed
], ids=["edited", "replaced", "added", "removed"])
def test_prepared_data_that_no_longer_matches_dvc_lock_is_refused(dvc_project: DataConfig,
                                                                   change: Callable[[Path], Any]) -> None:
    from mixer import versioning

    root, out = dvc_project.out_dir.parents[1], dvc_project.out_dir
    version = versioning.data_version(root, out)
    assert version is not None and versioning.check_data_matches_lock(root, out) == version
    change(out)
    message = error_of(versioning.check_data_matches_lock, root, out)  # a DataError (ModifiedDataError)
    assert message == (f"data/cifar100: modified since dvc.lock recorded it (md5 {version}: a file was edited, "
                       f"replaced, added or removed); run `dvc checkout data/cifar100` to restore that version, "
                       f"or `dvc repro ingest` to rebuild it")
    restore(dvc_project)
    assert versioning.check_data_matches_lock(root, out) == version


@dvc_warning
def test_prepared_data_deleted_since_dvc_lock_is_refused(dvc_project: DataConfig) -> None:
    from mixer import versioning

    root, out = dvc_project.out_dir.parents[1], dvc_project.out_dir
    version = versioning.data_version(root, out)
    shutil.rmtree(out)
    assert error_of(versioning.check_data_matches_lock, root, out) == (
        f"data/cifar100: missing, but dvc.lock records md5 {version}; run `dvc checkout data/cifar100` to restore "
        f"it, or `dvc repro ingest` to rebuild it")


@dvc_warning
def test_data_dvc_lock_does_not_record_is_not_checked(dvc_project: DataConfig, prepared: DataConfig) -> None:
    from mixer import versioning

    root = dvc_project.out_dir.parents[1]
    assert versioning.check_data_matches_lock(root, prepared.out_dir) is None  # an override's out_dir
    (root / "dvc.lock").unlink()
    assert versioning.check_data_matches_lock(root, dvc_project.out_dir) is None  # nothing recorded yet
