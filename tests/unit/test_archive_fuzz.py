"""Property tests of the archive parser: whatever the bytes, a valid parse or one DataError, and never code.

Every example goes through `read_archive` on a real tar.gz whose valid members are tiny (3 train and
3 test images), so random damage lands in tar headers and pickle opcodes as often as in pixels.
"""

from __future__ import annotations

import gzip
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mixer.cifar_archive import NUM_COARSE, NUM_FINE, DataError, read_archive
from tests.synthetic import ROOT, cifar_members, global_opcode, opcodes, write_archive

# database=None: no .hypothesis/ folder in the checkout; deadline=None: a loaded CI machine is no failure.
FAST = settings(max_examples=150, deadline=None, database=None)
MAX_SECONDS = 5.0  # per parse: a hang (or a bomb) fails the example instead of the whole run

MEMBERS = cifar_members(per_class_train=1, per_class_test=1, classes=3)
TRAIN = f"{ROOT}/train"

# What a hostile pickle would call: it records the call instead of doing harm.
CALLS: list[tuple[Any, ...]] = []


def sentinel(*args: Any) -> str:
    CALLS.append(args)
    return "ran"


class Payload:
    """An object whose unpickling calls `sentinel` (through REDUCE)."""

    def __init__(self, args: list[Any]) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return sentinel, tuple(self.args)


class Stateful:
    """An object whose unpickling calls `sentinel` (through BUILD -> __setstate__)."""

    def __setstate__(self, state: Any) -> None:
        sentinel(state)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def parse(path: Path) -> None:
    """read_archive(path): valid data, or a one-line DataError; any other exception fails the example."""
    started = time.monotonic()
    try:
        official = read_archive(path)
    except DataError as err:
        assert "\n" not in str(err) and str(err).startswith(f"archive {path}")
    else:
        for split in (official.train, official.test):
            n = len(split["images"])
            assert n > 0 and split["images"].shape == (n, 32, 32, 3) and split["images"].dtype == np.uint8
            for key, classes in (("fine_labels", NUM_FINE), ("coarse_labels", NUM_COARSE)):
                labels = split[key]
                assert labels.dtype == np.int64 and labels.shape == (n,)
                assert labels.min() >= 0 and labels.max() < classes
        assert len(official.fine_label_names) == NUM_FINE and len(official.coarse_label_names) == NUM_COARSE
    assert time.monotonic() - started < MAX_SECONDS


# --- (1) damaged bytes: at the gzip, tar or pickle layer ----------------------------------------


def damaged(blob: bytes, edits: list[tuple[float, int]], cut: float | None, splice: tuple[float, bytes] | None,
            ) -> bytes:
    """`blob` with bytes overwritten (at relative positions), a chunk inserted, then maybe truncated."""
    out = bytearray(blob)
    for where, value in edits:
        out[min(int(where * len(out)), len(out) - 1)] = value
    if splice is not None:
        at = int(splice[0] * len(out))
        out[at:at] = splice[1]
    if cut is not None:
        del out[int(cut * len(out)):]
    return bytes(out)


@FAST
@given(layer=st.sampled_from(["gzip", "tar", "pickle"]),
       member=st.sampled_from(sorted(MEMBERS)),
       edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.floats(0, 1),
       splice=st.none() | st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64)))
def test_damaged_archives_parse_or_raise_data_error(workdir: Path, layer: str, member: str,
                                                    edits: list[tuple[float, int]], cut: float | None,
                                                    splice: tuple[float, bytes] | None) -> None:
    path = workdir / "damaged.tar.gz"
    if layer == "pickle":
        write_archive(path, {**MEMBERS, member: damaged(MEMBERS[member], edits, cut, splice)})
    else:
        write_archive(path, MEMBERS)
        blob = path.read_bytes()
        if layer == "tar":
            path.write_bytes(gzip.compress(damaged(gzip.decompress(blob), edits, cut, splice), mtime=0))
        else:
            path.write_bytes(damaged(blob, edits, cut, splice))
    parse(path)


# --- (2) hostile pickles: arbitrary objects and opcode streams never run code ----------------------


plain = (st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=16)
         | st.text(max_size=8))
hostile = st.builds(Payload, st.lists(plain, max_size=3)) | st.builds(Stateful)
arrays = hnp.arrays(dtype=st.sampled_from([np.uint8, np.int64, np.float32, np.bool_, np.complex64, "U3", "S3",
                                           "M8[s]", np.dtype([("a", "u1"), ("b", "f4")])]),
                    shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
object_arrays = hnp.arrays(dtype=object, shape=hnp.array_shapes(max_dims=1, max_side=3),
                           elements=plain | hostile)
scalars = st.builds(np.int64, st.integers(-5, 5)) | st.builds(np.float32, st.floats(width=32))
objects = st.recursive(
    plain | hostile | arrays | object_arrays | scalars,
    lambda children: (st.lists(children, max_size=4) | st.tuples(children, children)
                      | st.dictionaries(st.binary(max_size=12) | st.text(max_size=4) | st.integers(), children,
                                        max_size=4)
                      | st.fixed_dictionaries({b"data": children, b"fine_labels": children,
                                               b"coarse_labels": children})),
    max_leaves=12)


def parse_train(workdir: Path, blob: bytes) -> None:
    """Parse an archive whose train member is `blob`; nothing it names may have been called."""
    path = workdir / "hostile.tar.gz"
    write_archive(path, {**MEMBERS, TRAIN: blob})
    CALLS.clear()
    parse(path)
    assert CALLS == []


@FAST
@given(obj=objects, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_pickles_of_arbitrary_objects_never_run_code(workdir: Path, obj: Any, protocol: int) -> None:
    parse_train(workdir, pickle.dumps(obj, protocol=protocol))


GLOBALS = [(__name__, "sentinel"), (__name__, "Payload"), (__name__, "Stateful"), ("builtins", "eval"),
           ("builtins", "getattr"), ("os", "system"), ("copyreg", "_reconstructor"), ("numpy", "load"),
           ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
           # the allow-listed names (stand-ins), fed random arguments and states
           ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy.core.multiarray", "_reconstruct"), ("_codecs", "encode"), ("builtins", "bytes")]
SINGLE = [pickle.REDUCE, pickle.BUILD, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ, pickle.MARK, pickle.TUPLE,
          pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.EMPTY_TUPLE, pickle.EMPTY_DICT, pickle.EMPTY_LIST,
          pickle.SETITEM, pickle.SETITEMS, pickle.APPEND, pickle.APPENDS, pickle.POP, pickle.POP_MARK, pickle.DUP,
          pickle.MEMOIZE, pickle.BINPERSID, pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET,
          pickle.NEXT_BUFFER, pickle.READONLY_BUFFER, pickle.NEWTRUE, pickle.NONE, pickle.STOP]
dtype_specs = st.sampled_from(["u1", "O8", "O", "V8", "i4,i4", "(2,)u1", "S3", "U2", "M8", "f8", ">i4", "b1"])
dtype_states = st.tuples(st.just(3), st.sampled_from(["|", "<", ">", "="]), st.none(),
                         st.none() | st.just(("x",)), st.none(), st.integers(-1, 16), st.integers(-1, 16),
                         st.sampled_from([0, 1, 63]))
pushed = (plain | dtype_specs | dtype_states | st.tuples(plain, plain) | st.lists(plain, max_size=3)
          | st.tuples(st.integers(0, 3), st.tuples(st.integers(0, 4)), st.none(), st.booleans(),
                      st.binary(max_size=32)))
tokens = st.one_of(
    pushed.map(opcodes),
    st.sampled_from(GLOBALS).map(lambda g: global_opcode(*g)),
    st.sampled_from(GLOBALS).map(lambda g: opcodes(g[0]) + opcodes(g[1]) + pickle.STACK_GLOBAL),
    st.sampled_from(GLOBALS).map(lambda g: pickle.INST + f"{g[0]}\n{g[1]}\n".encode()),
    st.sampled_from(SINGLE),
    st.integers(0, 255).map(lambda i: pickle.BINGET + bytes([i])),
    st.integers(0, 255).map(lambda i: pickle.BINPUT + bytes([i])),
    st.integers(0, 255).map(lambda i: pickle.EXT1 + bytes([i])),
    st.binary(min_size=1, max_size=4),
)


@FAST
@given(protocol=st.integers(2, pickle.HIGHEST_PROTOCOL), stream=st.lists(tokens, min_size=1, max_size=24))
def test_random_opcode_streams_never_run_code(workdir: Path, protocol: int, stream: list[bytes]) -> None:
    parse_train(workdir, pickle.PROTO + bytes([protocol]) + b"".join(stream) + pickle.STOP)


def test_the_sentinel_would_notice_code_running() -> None:
    """The properties above are not vacuous: the same pickles, loaded by the plain unpickler, call it."""
    CALLS.clear()
    pickle.loads(pickle.dumps([Payload(["a"]), np.array([Payload(["b"])], dtype=object)], protocol=2))
    state = pickle.dumps(Stateful(), protocol=2)  # pickled without state: add one, so BUILD calls __setstate__
    pickle.loads(state[:-1] + opcodes("c") + pickle.BUILD + pickle.STOP)
    assert CALLS == [("a",), ("b",), ("c",)]
