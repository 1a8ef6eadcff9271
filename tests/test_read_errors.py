"""Every reader error path: exact exception type (also the fitting builtin) and message content,
raised before any I/O where the issue says so."""

import errno
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES

N = 50


@pytest.fixture
def dataset(tools, rng, new_path):
    """50 samples of x: float16[2, 3] (12-byte records, 10 per shard) and y: int64."""
    columns = {"x": tools.random_values(rng, "float16", (N, 2, 3)), "y": np.arange(N, dtype=np.int64)}
    path = tools.write_dataset(new_path(), {"x": ("float16", (2, 3)), "y": "int64"}, columns,
                               shard_size=HEADER_BYTES + 10 * 24)
    return path, columns


def shard(path, number=0, ext=".rec"):
    return os.path.join(path, f"shard-{number:06d}{ext}")


# ---- indices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, position, shown", [(N, 2, N), (-N - 1, 1, -N - 1), (10 ** 12, 0, 10 ** 12)])
def test_out_of_range_index_raises_before_any_io(dataset, mmap_mode, bad, position, shown):
    path, _ = dataset
    ds = shardfeed.open(path, mmap=mmap_mode)
    indices = [3, 4, 5][:position] + [bad] + [1]
    out = {"x": np.full((len(indices), 2, 3), 7, np.float16), "y": np.full(len(indices), 7, np.int64)}
    message = f"index {shown} (position {position}) is out of range for a dataset of {N} samples"
    with pytest.raises(IndexError, match=re.escape(message)):
        ds.read(indices, out=out)
    assert (out["x"] == 7).all() and (out["y"] == 7).all()  # nothing was read
    # ... not even when the shards are broken: the index check comes first
    os.truncate(shard(path, 0), HEADER_BYTES)
    with pytest.raises(IndexError, match=re.escape(message)):
        ds.read(indices, out=out, fields=["y", "x"])


def test_index_error_forms(dataset):
    path, _ = dataset
    ds = shardfeed.open(path)
    with pytest.raises(IndexError, match=f"index {2 ** 64 - 1} is out of range for a dataset of {N} samples"):
        ds.read(np.array([1, 2 ** 64 - 1], dtype=np.uint64))
    with pytest.raises(IndexError, match=f"out of range for a dataset of {N} samples"):
        ds[N]
    with pytest.raises(IndexError, match=f"index {-N - 1} "):
        ds[-N - 1]
    with pytest.raises(TypeError, match="indices must be integers, got float64"):
        ds.read([1.0, 2.0])
    with pytest.raises(ValueError, match=r"indices must be one-dimensional, got shape \(2, 2\)"):
        ds.read([[1, 2], [3, 4]])
    for bad in ("a", 1.0, True, None):
        with pytest.raises(TypeError, match="dataset indices must be integers or slices"):
            ds[bad]


# ---- fields, dtypes, options --------------------------------------------------------------------


def test_unknown_field(dataset):
    path, _ = dataset
    ds = shardfeed.open(path)
    with pytest.raises(KeyError, match=re.escape("no field 'z'; the dataset has ['x', 'y']")):
        ds.read([0], fields=["x", "z"])
    with pytest.raises(KeyError, match="no field 'Y'"):
        ds.read([0], fields="Y")
    with pytest.raises(ValueError, match=re.escape("fields listed twice in ['x', 'x']")):
        ds.read([0], fields=["x", "x"])
    with pytest.raises(KeyError, match=re.escape("out has arrays for fields not being read: ['y']")):
        ds.read([0], fields="x", out={"y": np.zeros(1, np.int64)})


def test_unsupported_output_dtype(dataset):
    path, _ = dataset
    ds = shardfeed.open(path)
    message = "field 'x': cannot read as complex64; output dtypes are bool, int8"
    with pytest.raises(ValueError, match=re.escape(message)):
        ds.read([0], dtype="complex64")
    for dtype in (">f4", "U3", object, "datetime64[s]"):
        with pytest.raises(ValueError, match=re.escape("field 'y': cannot read as ")):
            ds.read([0], fields="y", dtype=dtype)
    with pytest.raises(ValueError, match="field 'x': dtype must be None, 'auto' or a numpy dtype, got 'no-such-dtype'"):
        ds.read([0], dtype="no-such-dtype")


@pytest.mark.parametrize("threads", [0, -1, 257, 2.0, True, "4"])
def test_bad_thread_counts(dataset, threads):
    path, _ = dataset
    with pytest.raises(ValueError, match=r"threads must be 'auto' or an int in \[1, 256\]"):
        shardfeed.open(path, threads=threads)
    with pytest.raises(ValueError, match=r"threads must be 'auto' or an int in \[1, 256\]"):
        shardfeed.open(path).read([0], threads=threads)
    with pytest.raises(ValueError, match=r"threads must be 'auto' or an int in \[1, 256\]"):
        shardfeed.set_num_threads(threads)


def test_thread_count_setting(dataset):
    path, columns = dataset
    default = shardfeed.get_num_threads()
    assert default >= 1
    try:
        shardfeed.set_num_threads(3)
        assert shardfeed.get_num_threads() == 3 and shardfeed.open(path).threads == 3
        assert shardfeed.open(path, threads=5).threads == 5
    finally:
        shardfeed.set_num_threads(None)
    assert shardfeed.get_num_threads() == default


def test_bad_mmap_option(dataset):
    path, _ = dataset
    with pytest.raises(ValueError, match="mmap must be 'auto', True or False"):
        shardfeed.open(path, mmap="yes")


# ---- output buffers -------------------------------------------------------------------------------


def misaligned_float32(shape):
    raw = np.zeros(int(np.prod(shape)) * 4 + 1, np.uint8)
    array = raw[1:].view(np.float32).reshape(shape)
    assert not array.flags.aligned
    return array


def read_only(array):
    array.flags.writeable = False
    return array


@pytest.mark.parametrize("make, problem", [
    (lambda: np.zeros((4, 2, 3), np.float64), "dtype float64 (expected float32)"),
    (lambda: np.zeros((4, 2, 3), np.float16), "dtype float16 (expected float32)"),
    (lambda: np.zeros((4, 3, 2), np.float32), "shape (4, 3, 2) (expected (4, 2, 3))"),
    (lambda: np.zeros((5, 2, 3), np.float32), "shape (5, 2, 3) (expected (4, 2, 3))"),
    (lambda: np.zeros(24, np.float32), "shape (24,) (expected (4, 2, 3))"),
    (lambda: np.zeros((4, 2, 6), np.float32)[:, :, ::2], "not C-contiguous"),
    (lambda: np.zeros((4, 2, 3), np.float32, order="F"), "not C-contiguous"),
    (lambda: read_only(np.zeros((4, 2, 3), np.float32)), "not writable"),
    (lambda: misaligned_float32((4, 2, 3)), "not aligned"),
    (lambda: np.zeros((3, 2, 3), np.int32)[:, ::-1], "dtype int32 (expected float32), shape (3, 2, 3) "
                                                     "(expected (4, 2, 3)), not C-contiguous"),
])
def test_output_buffer_validation(dataset, mmap_mode, make, problem):
    path, _ = dataset
    ds = shardfeed.open(path, mmap=mmap_mode)
    out = {"x": make(), "y": np.full(4, -1, np.float32)}
    with pytest.raises(ValueError, match=re.escape(f"out['x']: {problem}")):
        ds.read([0, 1, 2, 3], dtype="float32", out=out)
    assert (out["y"] == -1).all()  # validated before any I/O


def test_output_buffer_other_errors(dataset):
    path, columns = dataset
    ds = shardfeed.open(path)
    with pytest.raises(TypeError, match="out\\['y'\\] must be a numpy array, got list"):
        ds.read([0, 1], fields="y", out={"y": [0, 0]})
    shared = np.zeros(14, np.float32)
    with pytest.raises(ValueError, match=re.escape("out['x'] and out['y'] share memory")):
        ds.read([0, 1], dtype="float32", out={"x": shared[:12].reshape(2, 2, 3), "y": shared[10:12]})
    ok = ds.read([1, 0], fields="x", out={"x": np.empty((2, 2, 3), np.float16)})
    np.testing.assert_array_equal(ok["x"].view(np.uint16), columns["x"][[1, 0]].view(np.uint16))


# ---- files broken at open -------------------------------------------------------------------------


def test_open_missing_dataset(new_path):
    path = new_path()
    with pytest.raises(shardfeed.ShardReadError) as info:
        shardfeed.open(path)
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOENT and info.value.filename == path
    os.makedirs(path)
    with pytest.raises(shardfeed.ShardReadError, match="no manifest.json: not a shardfeed dataset") as info:
        shardfeed.open(path)
    assert info.value.errno == errno.ENOENT and info.value.filename == os.path.join(path, "manifest.json")
    file_path = os.path.join(path, "file")
    open(file_path, "w").close()
    with pytest.raises(shardfeed.ShardReadError, match="not a dataset directory") as info:
        shardfeed.open(file_path)
    assert info.value.errno == errno.ENOTDIR


def test_missing_shard(dataset):
    path, _ = dataset
    os.remove(shard(path, 3))
    with pytest.raises(shardfeed.ShardReadError, match="cannot open shard: No such file or directory") as info:
        shardfeed.open(path)
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOENT and info.value.filename == shard(path, 3)


@pytest.mark.parametrize("size, word", [
    (HEADER_BYTES + 5 * 24, "truncated"), (HEADER_BYTES + 10 * 24 + 1, "extra data"), (10, "truncated"),
])
def test_shard_of_wrong_size_at_open(dataset, size, word):
    path, _ = dataset
    os.truncate(shard(path, 2), size)
    message = f"{shard(path, 2)}: file is {size} bytes, the manifest says {HEADER_BYTES + 240} ({word})"
    with pytest.raises(shardfeed.ShardFormatError, match=re.escape(message)) as info:
        shardfeed.open(path)
    assert isinstance(info.value, ValueError)


def patch(file, offset, data):
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("offset, data, message", [
    (0, b"NOTSHARD", "not a shardfeed shard (magic b'NOTSHARD', expected b'SHRDFEED')"),
    (8, (2).to_bytes(4, "little"), "shard format version 2, this shardfeed reads 1"),
    (12, (1).to_bytes(4, "little"), "header says file kind 1 / header 64 bytes, expected kind 0 / 64 bytes"),
    (20, (32).to_bytes(8, "little"), "record size 32 bytes does not match the schema's 24 bytes"),
    (28, b"\0" * 16, "shard was written with a different schema than the manifest's"),
])
def test_corrupt_shard_header(dataset, offset, data, message):
    path, _ = dataset
    patch(shard(path, 4), offset, data)
    with pytest.raises(shardfeed.ShardFormatError, match=re.escape(f"{shard(path, 4)}: {message}")):
        shardfeed.open(path)


# ---- files broken after open ----------------------------------------------------------------------


def test_shard_truncated_after_open_preadv(dataset):
    path, columns = dataset
    ds = shardfeed.open(path, mmap=False)
    ds.read(np.arange(N))
    os.truncate(shard(path, 2), HEADER_BYTES + 3 * 24)
    still = ds.read([20, 21, 22, 45])  # what is still there reads fine
    np.testing.assert_array_equal(still["y"], [20, 21, 22, 45])
    with pytest.raises(shardfeed.ShardReadError) as info:
        ds.read([0, 26, 49], fields="y")
    error = info.value
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert error.filename == shard(path, 2)
    offset = HEADER_BYTES + 6 * 24 + 16  # sample 26 is record 6 of shard 2; y sits at byte 16
    assert f"sample 26 at byte offset {offset}" in str(error) and "truncated" in str(error)
    assert shard(path, 2) in str(error)
    np.testing.assert_array_equal(ds.read([1, 2])["y"], [1, 2])  # the dataset keeps working


def test_heap_truncated_after_open(tools, new_path):
    rows = [np.arange(k, dtype=np.int32) for k in (5, 9, 2, 7)]
    path = tools.write_dataset(new_path(), {"t": ("int32", (None,))}, {"t": rows})
    ds = shardfeed.open(path)
    heap = shard(path, 0, ".var")
    os.truncate(heap, HEADER_BYTES + 4 * 10)
    np.testing.assert_array_equal(ds.read([0])["t"][0], rows[0])
    with pytest.raises(shardfeed.ShardReadError) as info:
        ds.read([0, 3])
    assert info.value.errno == errno.EIO and info.value.filename == heap
    assert f"sample 3 at byte offset {HEADER_BYTES + 4 * 16}" in str(info.value)


def test_corrupt_heap_descriptor(tools, new_path):
    rows = [np.arange(k, dtype=np.int16) for k in (5, 9, 2)]
    path = tools.write_dataset(new_path(), {"t": ("int16", (None,))}, {"t": rows})
    patch(shard(path, 0), HEADER_BYTES + 16 + 8, (10 ** 6).to_bytes(8, "little"))  # sample 1: a million rows
    ds = shardfeed.open(path)
    heap = shard(path, 0, ".var")
    message = f"{heap}: sample 1 of field 't' points at 1000000 rows at byte {HEADER_BYTES + 10}, outside the"
    with pytest.raises(shardfeed.ShardFormatError, match=re.escape(message)):
        ds.read([0, 1, 2])
    np.testing.assert_array_equal(ds.read([2])["t"][0], rows[2])


MMAP_TRUNCATION = textwrap.dedent("""
    import os, sys
    import numpy as np
    import shardfeed
    path = sys.argv[1]
    with shardfeed.Writer(path, fields={"x": ("float32", (4,))}) as w:
        w.extend({"x": np.arange(20000.0).reshape(5000, 4)})
    ds = shardfeed.open(path, mmap=True)
    ds.read(np.arange(5000))  # every page cached and mapped
    os.truncate(os.path.join(path, "shard-000000.rec"), 64 + 16 * 100)
    for batch in ([4999], [0, 4999], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4999], list(range(5000))):
        try:
            ds.read(batch)
        except shardfeed.ShardReadError as exc:
            print("ShardReadError", exc.errno, exc.filename, "|", exc.strerror)
        else:
            print("no error for", batch[:3])
    print("still", ds.read([0, 99])["x"][:, 0].tolist())
""")


@pytest.mark.skipif("thread" in shardfeed._core.BUILD_INFO["sanitizers"],
                    reason="ThreadSanitizer wraps signal handlers and does not survive a siglongjmp out of "
                           "the SIGBUS handler; the plain and ASan/UBSan builds run this test")
@pytest.mark.parametrize("faulthandler", [False, True], ids=["plain", "faulthandler"])
def test_shard_truncated_after_open_mmap(new_path, faulthandler):
    """A copy from a mapped shard that shrank after open raises ShardReadError (the reader's SIGBUS
    guard), also when Python's faulthandler had installed its own SIGBUS handler first."""
    flags = ["-X", "faulthandler"] if faulthandler else []
    path = new_path()
    done = subprocess.run([sys.executable, *flags, "-c", MMAP_TRUNCATION, path], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-500:]}"
    lines = done.stdout.splitlines()
    shard_file = os.path.join(path, "shard-000000.rec")
    assert len(lines) == 5, done.stdout
    for line in lines[:4]:
        assert line.startswith(f"ShardReadError {errno.EIO} {shard_file} | "), line
        assert "truncated" in line
    assert f"sample 4999 at byte offset {64 + 16 * 4999}" in lines[0]
    assert lines[4] == "still [0.0, 396.0]"


MMAP_TRUNCATION_IN_PAGE = textwrap.dedent("""
    import os, sys
    import numpy as np
    import shardfeed
    path, cut = sys.argv[1], int(sys.argv[2])
    with shardfeed.Writer(path, fields={"x": ("float32", (4,))}) as w:
        w.extend({"x": np.arange(1, 20001.0).reshape(5000, 4)})
    ds = shardfeed.open(path, mmap=True, threads=2)
    ds.read(np.arange(5000))  # every page cached and mapped
    os.truncate(os.path.join(path, "shard-000000.rec"), cut)
    first_lost = (cut - 64) // 16  # the first record not wholly in the file
    page_end = (cut + 4095) // 4096 * 4096  # the zero-filled rest of the file's last page
    in_page = range(first_lost, (page_end - 64) // 16)
    for batch in [[k] for k in in_page] + [[0, k] for k in in_page] + [list(in_page), list(range(5000))]:
        try:
            got = ds.read(batch)
        except shardfeed.ShardReadError as exc:
            print("ShardReadError", exc.filename, "|", exc.strerror)
        else:
            print("no error for", batch[:3], got["x"][:, 0].tolist()[:3])
    print("still", ds.read([0, first_lost - 1])["x"][:, 0].tolist())
""")


@pytest.mark.skipif("thread" in shardfeed._core.BUILD_INFO["sanitizers"],
                    reason="ThreadSanitizer does not survive the SIGBUS guard's siglongjmp (see above)")
@pytest.mark.parametrize("cut", [64 + 16 * 100 + 8, 64 + 16 * 1000, 5 * 4096 + 3])
def test_mmap_records_in_the_last_page_of_a_truncated_shard_raise(new_path, cut):
    """A mapped shard cut inside a page: the records past the new end that the page still spans
    (zero-filled by the kernel, no SIGBUS) raise ShardReadError like those of later pages, instead
    of reading as zeros."""
    path = new_path()
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", MMAP_TRUNCATION_IN_PAGE, path, str(cut)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-800:]}"
    lines = done.stdout.splitlines()
    first_lost = (cut - 64) // 16
    in_page = (((cut + 4095) // 4096 * 4096) - 64) // 16 - first_lost
    assert in_page > 0 and len(lines) == 2 * in_page + 3, done.stdout[-2000:]
    shard_file = os.path.join(path, "shard-000000.rec")
    for line in lines[:-1]:
        assert line.startswith(f"ShardReadError {shard_file} | "), line
        assert "truncated" in line
    assert f"sample {first_lost} at byte offset {64 + 16 * first_lost}" in lines[0]
    assert lines[-1] == f"still [1.0, {4.0 * first_lost - 3}]"


def test_threads_auto_is_the_automatic_choice(tmp_path):
    path = str(tmp_path / "d")
    with shardfeed.Writer(path, {"x": ("float16", (4,))}) as writer:
        writer.extend({"x": np.arange(40, dtype=np.float16).reshape(10, 4)})
    auto = shardfeed.get_num_threads()
    assert auto >= shardfeed.dataset.AUTO_MIN_THREADS
    with shardfeed.open(path, threads="auto") as ds:
        assert ds.threads == auto
        assert np.array_equal(ds.read([3, 1], "x", threads="auto")["x"], np.arange(40, dtype=np.float16).reshape(10, 4)[[3, 1]])
    try:
        shardfeed.set_num_threads(2)
        assert shardfeed.open(path).threads == 2 and shardfeed.open(path, threads="auto").threads == 2
        shardfeed.set_num_threads("auto")
        assert shardfeed.get_num_threads() == auto
    finally:
        shardfeed.set_num_threads(None)
    for bad in ("many", "AUTO", 0, -1, 2.5, True):
        with pytest.raises(ValueError, match="threads must be 'auto' or an int"):
            shardfeed.open(path, threads=bad)
        with pytest.raises(ValueError, match="threads must be 'auto' or an int"):
            shardfeed.set_num_threads(bad)
