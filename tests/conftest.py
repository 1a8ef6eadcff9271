"""Shared fixtures and settings of the shardfeed test suite.

* Hypothesis profiles: ``fast`` (default) and ``ci-heavy``, chosen with the environment variable
  ``SHARDFEED_HYPOTHESIS_PROFILE``.
* numpy randomness: every test's ``rng`` is seeded from the session seed (``SHARDFEED_TEST_SEED``,
  random by default, printed in the pytest header) and the test's id, so a failure reproduces with
  ``SHARDFEED_TEST_SEED=<seed> pytest <test id>``.
* Every test fails when its stderr shows "Exception ignored" (an exception Cython or a finaliser
  could only print), as fastavro's suite does.
* This directory is on ``sys.path`` (``--import-mode=importlib`` puts none there), so the Keras
  tests share ``keras_helpers.py`` with a plain ``import``.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import types
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import shardfeed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "fast", max_examples=50, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci-heavy", max_examples=400, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HYPOTHESIS_PROFILE = os.environ.get("SHARDFEED_HYPOTHESIS_PROFILE", "fast")
settings.load_profile(HYPOTHESIS_PROFILE)

SEED = int(os.environ.get("SHARDFEED_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))

ALL_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "float16", "bfloat16", "float32", "float64"]
FLOAT_BITS = {"float16": np.uint16, "float32": np.uint32, "float64": np.uint64}


def pytest_report_header(config):
    import hypothesis
    from shardfeed import _core
    return [
        f"shardfeed {shardfeed.__version__} from {os.path.dirname(shardfeed.__file__)}; "
        f"compiled core: {getattr(_core, 'COMPILED', False)}, build info {_core.BUILD_INFO}",
        f"numpy {np.__version__}; test seed SHARDFEED_TEST_SEED={SEED}",
        f"hypothesis {hypothesis.__version__}, profile {HYPOTHESIS_PROFILE!r} "
        f"(max_examples={settings().max_examples}); seed "
        f"{config.getoption('hypothesis_seed', None) or 'random (see --hypothesis-seed)'}",
    ]


@pytest.fixture(autouse=True)
def _fail_on_exception_ignored(capfd):
    """Fails a test (as an error in its teardown) whose stderr shows "Exception ignored"."""
    yield
    _, err = capfd.readouterr()
    if "Exception ignored" in err:
        pytest.fail(f"stderr shows an exception that was ignored:\n{err}", pytrace=False)


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])


# ---- writing datasets -------------------------------------------------------------------------


def random_values(rng, dtype, shape):
    """Random values exactly representable in ``dtype`` (every bit pattern for float16/32/64,
    NaNs and infinities included). bfloat16 values are float32 arrays holding bfloat16 values
    (no NaN: the writer quiets signalling NaNs)."""
    shape = tuple(shape)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype in FLOAT_BITS:
        bits = FLOAT_BITS[dtype]
        return rng.integers(0, np.iinfo(bits).max, size=shape, dtype=bits, endpoint=True).view(dtype)
    if dtype == "bfloat16":
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32)
        bits[(bits & 0x7FFF) > 0x7F80] &= 0xFF7F  # NaN patterns -> finite
        return (bits << 16).view(np.float32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def write_dataset(path, fields, columns, *, shard_size=1 << 20, metadata=None, mode="w"):
    """Writes ``columns`` (name -> batch array, or list of arrays for a variable field) with one
    ``extend`` call and returns ``path``."""
    with shardfeed.Writer(path, fields=fields, shard_size=shard_size, metadata=metadata, mode=mode) as w:
        w.extend(columns)
    return os.fspath(path)


def indexed_dataset(path, count, sample_shape, *, seed, shard_size):
    """Writes ``count`` samples: ``x`` random float16 of ``sample_shape``, ``label`` the sample's
    index (int32), so a batch says which samples it holds. Returns ``(path, columns)``."""
    rng = np.random.default_rng(seed)
    columns = {"x": rng.standard_normal((count,) + tuple(sample_shape)).astype(np.float16),
               "label": np.arange(count, dtype=np.int32)}
    fields = {"x": ("float16", tuple(sample_shape)), "label": ("int32", ())}
    return write_dataset(path, fields, columns, shard_size=shard_size), columns


def expected_natural(dtype, values):
    """What a read with dtype=None returns for values written to a ``dtype`` field."""
    values = np.asarray(values)
    return values.astype(np.float32 if dtype == "bfloat16" else dtype)


def assert_identical(actual, expected, what=""):
    """Same dtype, shape and bytes (floats compared bit for bit: -0.0 != 0.0, NaN payloads)."""
    expected = np.asarray(expected)
    assert isinstance(actual, np.ndarray), what
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.dtype.kind == "f":
        bits = f"u{actual.dtype.itemsize}"
        np.testing.assert_array_equal(actual.view(bits), expected.view(bits), err_msg=what)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=what)


def as_format_v1(path):
    """Turns a dataset just written into one as a shardfeed before per-record checksums wrote it
    (format version 1: the same shard files, no ``.crc`` files, no "checksums" entries)."""
    import json
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as f:
        doc = json.load(f)
    for shard in doc["shards"]:
        os.unlink(os.path.join(path, shard.pop("checksums")["file"]))
    doc["version"] = 1
    with open(manifest_path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


@pytest.fixture(scope="session")
def new_path(tmp_path_factory):
    """A function returning a fresh, not yet existing directory path (usable in hypothesis tests)."""
    counter = itertools.count()
    root = tmp_path_factory.mktemp("datasets")

    def make(name="ds"):
        return os.fspath(root / f"{name}-{next(counter)}")
    return make


def run_threads(count, target):
    """Runs target(k) on `count` threads started together; re-raises the first failure."""
    errors = []
    barrier = threading.Barrier(count)

    def body(k):
        try:
            barrier.wait()
            target(k)
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=body, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a reader thread hung"
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def tools():
    """The helpers above, for test modules (which --import-mode=importlib keeps from importing
    conftest)."""
    return types.SimpleNamespace(
        ALL_DTYPES=ALL_DTYPES, random_values=random_values, write_dataset=write_dataset, indexed_dataset=indexed_dataset,
        expected_natural=expected_natural, assert_identical=assert_identical, as_format_v1=as_format_v1,
        run_threads=run_threads,
    )


@pytest.fixture(params=[True, False], ids=["mmap", "preadv"])
def mmap_mode(request):
    """Both record read paths: copies from a memory map, and one preadv per record."""
    return request.param


@pytest.fixture(params=["f16c", "portable"])
def f16_path(request):
    """Runs a test of the float16 kernels on the F16C vector path and on the portable code."""
    from shardfeed import _core
    use_f16c = request.param == "f16c"
    try:
        if _core.allow_f16c(use_f16c) != use_f16c:
            pytest.skip("this CPU has no F16C")
        yield request.param
    finally:
        _core.allow_f16c(True)


# ---- output array allocation ------------------------------------------------------------------


def _aligned_empty(shape, dtype=float, order="C"):
    """Like ``np.empty``, but a 64-byte-aligned view of a larger buffer: an array that does not own
    its memory, and one TensorFlow wraps without copying (it copies less aligned arrays)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape, order=order)


@pytest.fixture(params=["owning", "aligned-views", "batch-memory"])
def allocation(request, monkeypatch):
    """How ``Dataset.read`` allocates output arrays: numpy's ``np.empty`` (arrays owning their
    memory; glibc aligns them to 16 bytes, so TensorFlow copies them), 64-byte-aligned views of
    larger buffers (a view of one points at the buffer, not at it; TensorFlow wraps them), or,
    whatever their size, the reusable page-aligned blocks of ``_core.BatchMemory`` that arrays
    of 1 MiB or more get (TensorFlow wraps them; a freed one is handed out again)."""
    from shardfeed import _core, batch_reader
    if request.param == "aligned-views":
        shim = types.SimpleNamespace(**vars(np))
        shim.empty = _aligned_empty
        monkeypatch.setattr(batch_reader, "np", shim)
    elif request.param == "batch-memory":
        monkeypatch.setattr(batch_reader, "BATCH_MEMORY_MIN_BYTES", 0)
    yield request.param
    _core.free_batch_memory()
