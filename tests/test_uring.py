"""The io_uring read path of records that go to disk (ext/uring.c): the same batches as the thread
pool of preadv and as numpy, the same errors, many threads at once, signals, and the fallback to
the pool where io_uring_setup is forbidden (a seccomp filter here, as in many containers)."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shardfeed
from shardfeed import _core
from shardfeed.errors import ShardReadError
from shardfeed.format import HEADER_BYTES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import regimes  # noqa: E402

URING = _core.uring_error() == 0
needs_uring = pytest.mark.skipif(not URING, reason=f"io_uring is not usable here: "
                                 f"{os.strerror(_core.uring_error())} (the fallback test covers the pool)")


@pytest.fixture
def read_io():
    """Sets the process-wide read I/O for a test (``read_io("uring")``) and restores it after."""
    before = _core.read_io()
    yield _core.set_read_io
    _core.set_read_io(before)


def test_linux_builds_have_the_io_uring_path():
    """Where the kernel headers declare io_uring, the build has the io_uring path: not silently
    the pool only."""
    if sys.platform.startswith("linux") and os.path.exists("/usr/include/linux/io_uring.h"):
        assert _core.BUILD_INFO["io_uring"] is True
    assert _core.read_io() == (os.environ.get("SHARDFEED_READ_IO") or "direct-uring")


def test_read_io_rejects_unknown_modes(read_io):
    with pytest.raises(ValueError, match="read I/O must be one of"):
        read_io("threads")
    assert _core.read_io() == (os.environ.get("SHARDFEED_READ_IO") or "direct-uring")


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("pool", "pool"), ("", "direct-uring"),
                                             ("bogus", "read I/O must be one of")])
def test_the_environment_variable_sets_the_read_io_at_import(value, expected):
    code = "from shardfeed import _core; print(_core.read_io())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SHARDFEED_READ_IO=value))
    if expected in ("pool", "auto", "direct-uring"):
        assert done.returncode == 0 and done.stdout == expected + "\n", done.stderr[-2000:]
    else:
        assert done.returncode != 0 and expected in done.stderr and "'bogus'" in done.stderr


# Layouts: several fields (gaps between the requested ones when only some are read), records
# small enough that runs of adjacent records are cut by IOV_MAX, large ones cut by the 1 MiB run
# limit, and shards of a few records so that runs end at shard boundaries.
LAYOUTS = {
    "mixed": ({"a": ("uint8", (5,)), "x": ("float16", (3,)), "y": ("int64", ()), "z": ("int16", (2, 2))}, 97),
    "tiny": ({"b": ("uint8", ())}, 3000),
    "large": ({"img": ("uint8", (3, 150, 200)), "label": ("int32", ())}, 3),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def dataset(request, tmp_path_factory):
    fields, per_shard = LAYOUTS[request.param]
    n = 6000 if request.param != "large" else 40
    rng = np.random.default_rng(18)
    columns = {}
    for name, (dtype, shape) in fields.items():
        if dtype == "float16":
            columns[name] = rng.integers(0, 1 << 16, (n,) + shape, dtype=np.uint16).view(np.float16)
        else:
            info = np.iinfo(dtype)
            columns[name] = rng.integers(info.min, info.max, (n,) + shape, dtype=dtype, endpoint=True)
    record = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in fields.values())
    path = str(tmp_path_factory.mktemp("uring") / request.param)
    with shardfeed.Writer(path, fields=fields, shard_size=HEADER_BYTES + per_shard * record) as w:
        w.extend(columns)
    return path, columns, n


def index_lists(rng, n):
    """Random indices with duplicates; every sample in order (runs across every shard boundary);
    runs of neighbours in random order; one sample; the last samples backwards."""
    runs = np.concatenate([np.arange(s, min(n, s + 37)) for s in rng.integers(0, n, 20)])
    return [rng.integers(0, n, min(n, 700)), np.arange(n), runs, np.array([n - 1]), np.arange(n)[::-1][:50]]


def expected(columns, names, idx, dtype=None, scale=None):
    out = {}
    for name in names:
        values = columns[name][idx]
        if dtype == "float32":
            values = values.astype(np.float32)
            if scale is not None:
                values = values * np.float32(scale)
        out[name] = values
    return out


@needs_uring
@pytest.mark.parametrize("fields, dtype, scale", [(None, None, None), ("last", None, None),
                                                   ("first", "float32", 0.5)], ids=["all", "one-field", "cast"])
def test_uring_batches_equal_the_pool_and_numpy(dataset, read_io, rng, fields, dtype, scale):
    path, columns, n = dataset
    names = list(columns)
    if fields == "last":
        names = names[-1:]  # the bytes before it in every record are skipped (discarded)
    elif fields == "first":
        names = names[:1]
    runs_before = _core.uring_runs()
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        for idx in index_lists(rng, n):
            want = expected(columns, names, idx, dtype, scale)
            batches = {}
            for mode in ("uring", "pool"):
                read_io(mode)
                batch = ds.read(idx, fields=names, dtype=dtype, scale=scale)
                batches[mode] = batch
                for name in names:
                    assert batch[name].dtype == want[name].dtype
                    np.testing.assert_array_equal(batch[name].view(np.uint8), want[name].view(np.uint8),
                                                  err_msg=f"{mode} {name}")
            assert batches["uring"].uncached == len(idx)  # every record went through io_uring
    assert _core.uring_runs() > runs_before


@needs_uring
def test_auto_reads_records_missing_from_the_page_cache_through_io_uring(dataset, read_io, rng):
    path, columns, n = dataset
    files = [os.path.join(path, name) for name in os.listdir(path)]
    read_io("auto")
    idx = rng.integers(0, n, min(n, 500))
    runs_before = _core.uring_runs()
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        regimes.evict(files)  # after open, which reads the headers (and small files whole)
        if regimes.resident_fraction(files) > 0:  # a page left (mapped elsewhere) may hold every record read
            pytest.skip("files here cannot be evicted from the page cache")
        batch = ds.read(idx)
    assert batch.uncached > 0
    assert _core.uring_runs() > runs_before
    for name, values in columns.items():
        np.testing.assert_array_equal(batch[name].view(np.uint8), values[idx].view(np.uint8), err_msg=name)


@needs_uring
def test_io_uring_reads_adjacent_records_in_runs(new_path, read_io, rng):
    """4096 sequential 512-byte records: runs of 512 records (IOV_MAX iovecs), 8 requests; in
    random order one request per record (bar the neighbours a permutation puts in a row)."""
    n = 4096
    path = new_path()
    values = np.arange(n * 512, dtype=np.int64).reshape(n, 512).astype(np.uint8)
    with shardfeed.Writer(path, fields={"x": ("uint8", (512,))}) as w:
        w.extend({"x": values})
    read_io("uring")
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        for order, most, least in [(np.arange(n), 8, 8), (rng.permutation(n), n, int(n * 0.95))]:
            before = _core.uring_runs()
            batch = ds.read(order)
            runs = _core.uring_runs() - before
            np.testing.assert_array_equal(batch["x"], values[order])
            assert least <= runs <= most, (runs, least, most)


@needs_uring
def test_a_long_sequential_read_of_large_records(new_path, read_io):
    """150 records of 256 KiB in storage order: runs of 4 (1 MiB), more bytes than are kept in
    flight at once (16 MiB), converted to float32 as they come in."""
    n, shape = 150, (512, 256)
    path = new_path()
    values = np.random.default_rng(7).integers(0, 1 << 16, (n,) + shape, dtype=np.uint16)
    with shardfeed.Writer(path, fields={"x": ("uint16", shape)}) as w:
        w.extend({"x": values})
    read_io("uring")
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        before = _core.uring_runs()
        batch = ds.read(np.arange(n), dtype="float32")
        assert _core.uring_runs() - before == 38
    np.testing.assert_array_equal(batch["x"], values.astype(np.float32))


@pytest.mark.parametrize("mode", ["uring", "pool"])
def test_a_truncated_shard_fails_the_read_naming_the_file(new_path, read_io, mode):
    if mode == "uring" and not URING:
        pytest.skip("io_uring is not usable here")
    read_io(mode)
    path = new_path()
    values = np.arange(400 * 16, dtype=np.uint8).reshape(400, 16)
    with shardfeed.Writer(path, fields={"v": ("uint8", (16,))}, shard_size=HEADER_BYTES + 100 * 16) as w:
        w.extend({"v": values})
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        shard = os.path.join(path, ds._manifest.shards[2].file)
        os.truncate(shard, HEADER_BYTES + 30 * 16 + 5)  # record 30 of shard 2 cut, those after it gone
        ds.read(np.arange(200, 230))  # what is left reads
        with pytest.raises(ShardReadError) as caught:
            ds.read(np.array([5, 210, 241, 399]))
    assert caught.value.filename == shard
    assert caught.value.errno == errno.EIO
    assert "file ended before the data of sample" in str(caught.value)
    assert "truncated" in str(caught.value)


@needs_uring
def test_many_threads_read_through_io_uring_at_once(dataset, read_io, tools):
    path, columns, n = dataset
    read_io("uring")
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        def reader(k):
            rng = np.random.default_rng(k)
            for _ in range(15):
                idx = rng.integers(0, n, 300)
                batch = ds.read(idx)
                for name, values in columns.items():
                    assert np.array_equal(batch[name].view(np.uint8), values[idx].view(np.uint8)), name
        tools.run_threads(12, reader)


@needs_uring
@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_io_uring_reads_stay_exact_under_a_signal_storm(dataset, read_io):
    """io_uring_enter interrupted by a signal while it waits for the disk (EINTR) is entered again;
    nothing is lost. The files are evicted before each read, so that the reads wait."""
    path, columns, n = dataset
    files = [os.path.join(path, name) for name in os.listdir(path)]
    read_io("uring")
    handled = []
    previous = signal.signal(signal.SIGALRM, lambda *_: handled.append(1))
    try:
        with shardfeed.open(path, mmap=False, preload=False) as ds:
            rng = np.random.default_rng(3)
            for _ in range(8):
                regimes.evict(files)
                idx = rng.integers(0, n, 2000 if n > 100 else 100)
                signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
                batch = ds.read(idx, threads=1)
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
                for name, values in columns.items():
                    assert np.array_equal(batch[name].view(np.uint8), values[idx].view(np.uint8)), name
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert handled


# A seccomp filter that makes io_uring_setup fail with EPERM, as container runtimes' default
# policies do (syscall 425 on x86-64 and arm64 alike), then reads that would use io_uring.
FORBIDDEN = textwrap.dedent(r'''
    import ctypes, errno, os, platform, struct, sys
    import numpy as np

    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
    def insn(code, jt, jf, k):
        return struct.pack("HBBI", code, jt, jf, k)
    program = b"".join([
        insn(0x20, 0, 0, 4),                    # load the architecture
        insn(0x15, 0, 3, arch),                 # not ours: allow
        insn(0x20, 0, 0, 0),                    # load the syscall number
        insn(0x15, 0, 1, 425),                  # io_uring_setup:
        insn(0x06, 0, 0, 0x00050000 | errno.EPERM),  # fail with EPERM
        insn(0x06, 0, 0, 0x7FFF0000),           # allow
    ])
    buffer = ctypes.create_string_buffer(program)
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = Prog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
        print("no seccomp:", os.strerror(ctypes.get_errno()), flush=True)
        sys.exit(77)

    import shardfeed
    from shardfeed import _core
    sys.path.insert(0, sys.argv[2])
    import regimes

    path = sys.argv[1]
    values = np.arange(3000 * 40, dtype=np.int64).reshape(3000, 40).astype(np.uint16)
    with shardfeed.Writer(path, fields={"v": ("uint16", (40,))}, shard_size=300 * 80 + 4096) as w:
        w.extend({"v": values})
    files = [os.path.join(path, name) for name in os.listdir(path)]
    idx = np.random.default_rng(0).integers(0, 3000, 1000)
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        regimes.evict(files)
        evicted = regimes.resident_fraction(files) < 0.5
        batch = ds.read(idx)  # auto: the records that miss the page cache go to the pool
        assert np.array_equal(batch["v"], values[idx])
        assert batch.uncached > 0 or not evicted, batch.uncached
    # the seccomp filter's EPERM; ENOSYS from a build without the io_uring path, which never asks
    forbidden = errno.EPERM if _core.BUILD_INFO["io_uring"] else errno.ENOSYS
    assert _core.uring_error() == forbidden, _core.uring_error()
    try:
        _core.set_read_io("uring")
    except OSError as exc:
        assert exc.errno == forbidden and "io_uring cannot be used here" in str(exc), exc
    else:
        raise AssertionError("set_read_io('uring') did not refuse")
    assert _core.read_io() == "auto"
    assert _core.uring_runs() == 0
    print("evicted" if evicted else "cached", flush=True)
''')


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "aarch64"),
                    reason="the seccomp filter is written for Linux on x86-64 and arm64")
def test_reads_fall_back_to_the_pool_where_io_uring_setup_is_forbidden(new_path):
    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    env = dict(os.environ, SHARDFEED_READ_IO="auto")  # io_uring where it can be set up
    done = subprocess.run([sys.executable, "-c", FORBIDDEN, new_path(), benchmarks], capture_output=True,
                          text=True, timeout=120, env=env)
    if done.returncode == 77:
        pytest.skip(f"this process may not install a seccomp filter ({done.stdout.strip()})")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout in ("evicted\n", "cached\n"), done.stdout
