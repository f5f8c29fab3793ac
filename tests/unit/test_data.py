"""Ingest and load: checksums, hostile and broken archives, atomic outputs, reproducible bytes, splits."""

from __future__ import annotations

import builtins
import codecs
import dataclasses
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mixer import atomic, data
from mixer.cifar_archive import read_archive
from mixer.config import DataConfig
from mixer.data import DataError
from tests.synthetic import (ROOT, cifar_members, code_pickle, entry, make_archive, official_batches,
                             write_archive)

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


# --- refused archives: nothing read, nothing written -------------------------------------------


def test_checksum_mismatch_reads_nothing(data_config: DataConfig, synthetic_archive: tuple[Path, str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "read_archive", _no_network)  # must not be reached
    message = error_of(data.ingest, dataclasses.replace(data_config, md5="0" * 32))
    assert f"md5 {data_config.md5} does not match data.md5 {'0' * 32}" in message
    assert "MIXER_DATA_MD5" in message
    assert not data_config.out_dir.exists() and synthetic_archive[0].exists()  # a local archive is kept


@pytest.mark.parametrize("damage", [
    lambda blob: blob[:len(blob) // 2],  # truncated
    lambda blob: blob[:len(blob) // 2] + bytes(64) + blob[len(blob) // 2 + 64:],  # corrupt middle
    lambda blob: blob[:-8] + bytes(8),  # corrupt gzip trailer: caught only by reading to the end
    lambda blob: b"<html>Service unavailable</html>",  # not a gzip file
], ids=["truncated", "corrupt", "bad-trailer", "not-gzip"])
def test_truncated_or_corrupt_archive(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    make_archive(tmp_path / "good.tgz", per_class_train=2, per_class_test=1)
    path = tmp_path / "damaged.tgz"
    path.write_bytes(damage((tmp_path / "good.tgz").read_bytes()))
    cfg = DataConfig(url=str(path), md5=data.file_md5(path), download_dir=tmp_path / "dl",
                     out_dir=tmp_path / "out", val_fraction=0.1, split_seed=0)
    assert "not a readable tar.gz" in error_of(data.ingest, cfg)
    assert not cfg.out_dir.exists()


@pytest.mark.parametrize("bad, words", [
    (entry("../evil.txt", data=b"x"), "escapes the archive root"),
    (entry(f"{ROOT}/../../evil.txt", data=b"x"), "escapes the archive root"),
    (entry("/tmp/evil.txt", data=b"x"), "escapes the archive root"),
    (entry(f"{ROOT}/link", tarfile.SYMTYPE, linkname="/etc/passwd"), "is a symlink"),
    (entry(f"{ROOT}/hard", tarfile.LNKTYPE, linkname=f"{ROOT}/meta"), "is a hard link"),
    (entry(f"{ROOT}/dev", tarfile.CHRTYPE), "is a device"),
    (entry(f"{ROOT}/fifo", tarfile.FIFOTYPE), "is a fifo"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "fifo"])
def test_unsafe_members_are_refused(tmp_path: Path, bad: tuple[tarfile.TarInfo, bytes], words: str) -> None:
    cfg = config_for(tmp_path, small_members(), extra=[bad])
    message = error_of(data.ingest, cfg)
    assert words in message and repr(bad[0].name) in message
    assert not cfg.out_dir.exists() and not (tmp_path.parent / "evil.txt").exists()


def test_a_symlink_in_place_of_a_pickle_is_refused(tmp_path: Path) -> None:
    members = small_members()
    del members[f"{ROOT}/train"]
    link = entry(f"{ROOT}/train", tarfile.SYMTYPE, linkname="/etc/passwd")
    cfg = config_for(tmp_path, members, extra=[link])
    assert "is a symlink" in error_of(data.ingest, cfg)


def test_missing_member(tmp_path: Path) -> None:
    members = small_members()
    del members[f"{ROOT}/test"]
    assert "missing member(s) cifar-100-python/test" in error_of(data.ingest, config_for(tmp_path, members))


@pytest.mark.parametrize("payload, refused", [
    (lambda marker: code_pickle(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
    # protocol 2 spells builtins.exec as __builtin__.exec
    (lambda marker: code_pickle(builtins.exec, f"open({str(marker)!r}, 'w').close()"), ".exec"),
    (lambda marker: code_pickle(codecs.encode, str(marker), "rot13"), "_codecs.encode with encoding 'rot13'"),
], ids=["os.system", "exec", "codecs-rot13"])
def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path: Path, payload: Callable[[Path], bytes],
                                                           refused: str) -> None:
    marker = tmp_path / "pwned"
    members = small_members()
    members[f"{ROOT}/train"] = payload(marker)
    cfg = config_for(tmp_path, members)
    message = error_of(data.ingest, cfg)
    assert refused in message and f"{ROOT}/train" in message
    assert not marker.exists() and not cfg.out_dir.exists()


def _set(key: bytes, value: Callable[[Any], Any]) -> Callable[[dict[bytes, Any]], None]:
    return lambda batch: batch.__setitem__(key, value(batch[key]))


@pytest.mark.parametrize("member, change, words", [
    ("train", _set(b"data", lambda d: d[:, :3071]), "uint8 array of shape (N, 3072), got uint8 (200, 3071)"),
    ("train", _set(b"data", lambda d: d.astype(np.float32)), "uint8 array of shape (N, 3072), got float32"),
    ("train", _set(b"fine_labels", lambda v: [100] + v[1:]),
     "fine_labels must lie in [0, 100), got [0, 100]"),
    ("test", _set(b"coarse_labels", lambda v: [-1] + v[1:]),
     "coarse_labels must lie in [0, 20), got [-1, 19]"),
    ("test", _set(b"fine_labels", lambda v: v[:-1]), "fine_labels must be 100 integers (one per image)"),
    ("train", _set(b"fine_labels", lambda v: [str(x) for x in v]), "fine_labels must be 200 integers"),
    ("train", lambda batch: batch.__delitem__(b"coarse_labels"), "missing key(s) coarse_labels"),
    ("test", lambda batch: [batch], "expected a dict, got list"),
    ("meta", _set(b"fine_label_names", lambda v: v[:99]),
     "fine_label_names must be 100 byte strings, got 99"),
    ("meta", _set(b"coarse_label_names", lambda v: None), "coarse_label_names must be 20 byte strings"),
], ids=["width", "dtype", "fine-high", "coarse-negative", "count", "str-labels", "missing-key", "not-dict",
        "fine-names", "coarse-names"])
def test_wrong_shapes_and_labels_are_refused(tmp_path: Path, member: str,
                                             change: Callable[[dict[bytes, Any]], Any], words: str) -> None:
    cfg = config_for(tmp_path, small_members(member, change))
    message = error_of(data.ingest, cfg)
    assert words in message and f"{ROOT}/{member}" in message
    assert not cfg.out_dir.exists()


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


def test_every_member_is_checked_before_any_pickle_is_read(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    members = small_members()
    members[f"{ROOT}/train"] = code_pickle(os.system, f"touch {marker}")
    cfg = config_for(tmp_path, members, extra=[entry(f"{ROOT}/zz-link", tarfile.SYMTYPE, linkname="/")])
    assert "is a symlink" in error_of(data.ingest, cfg)  # the symlink comes last in the archive
    assert not marker.exists()
