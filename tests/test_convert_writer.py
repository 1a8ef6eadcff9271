"""The writer's direct path (one fixed field filling the record, batches of at least a write buffer):
the converters feed it large chunks. It must write exactly what the buffered path writes."""

import errno
import os
import sys

import numpy as np
import pytest

import shardfeed
from shardfeed.format import read_manifest

BUFFER_BYTES = 4 << 20  # writer._BUFFER_BYTES


def write(path, fields, batches, shard_size):
    with shardfeed.Writer(path, fields=fields, shard_size=shard_size) as w:
        for batch in batches:
            w.extend(batch)
    return path


def shard_bytes(path):
    contents = []
    for shard in read_manifest(path).shards:
        with open(os.path.join(path, shard.file), "rb") as f:
            contents.append(f.read())
    return contents


@pytest.mark.parametrize("source, stored", [("float32", "float32"), ("float64", "float16"), (">f4", "float32"),
                                            ("float32", "bfloat16"), ("int64", "uint8")])
def test_large_batches_write_what_small_batches_write(tmp_path, rng, tools, source, stored):
    row = 1024  # 4 KiB of float32 per sample: 1024 samples fill a write buffer
    count = BUFFER_BYTES // (row * 4) * 3 + 77
    values = (rng.integers(0, 200, (count, row)) if stored == "uint8"
              else rng.standard_normal((count, row)) * 3).astype(source)
    fields = {"x": (stored, (row,))}
    shard_size = 64 + row * np.dtype(shardfeed.Field("x", stored, ()).stored_dtype).itemsize * 1500
    big = write(str(tmp_path / "big"), fields, [{"x": values[:5]}, {"x": values[5:]}], shard_size)
    small = write(str(tmp_path / "small"), fields,
                  [{"x": values[i:i + 100]} for i in range(0, count, 100)], shard_size)
    assert shard_bytes(big) == shard_bytes(small)
    assert [s.checksum for s in read_manifest(big).shards] == [s.checksum for s in read_manifest(small).shards]
    assert len(read_manifest(big).shards) == -(-count // 1500)


def test_non_contiguous_batch_goes_through_in_bounded_pieces(tmp_path, rng, tools):
    values = np.asfortranarray(rng.standard_normal((3000, 512)).astype(np.float32))
    path = write(str(tmp_path / "f"), {"x": ("float32", (512,))}, [{"x": values}], 1 << 30)
    tools.assert_identical(shardfeed.open(path).read(np.arange(3000))["x"], np.ascontiguousarray(values))


def test_overflow_in_a_later_piece_keeps_the_pieces_before(tmp_path, rng):
    row = 1024
    per_buffer = BUFFER_BYTES // (row * 2)
    values = rng.standard_normal((per_buffer * 3, row))
    values[per_buffer * 2 + 5, 7] = 1e6  # overflows float16, in the third piece
    path = str(tmp_path / "o")
    w = shardfeed.Writer(path, fields={"x": ("float16", (row,))})
    with pytest.raises(shardfeed.ValueRangeError, match=f"sample {per_buffer * 2 + 5}") as info:
        w.extend({"x": values})
    assert (info.value.field, info.value.sample) == ("x", per_buffer * 2 + 5)
    assert len(w) == per_buffer * 2
    w.close()
    np.testing.assert_array_equal(shardfeed.open(path)[len(w) - 1]["x"], values[len(w) - 1].astype(np.float16))


def _npy_records(tmp_path, values):
    """A .npy file of ``values`` and (descriptor, data offset, memory map of the rows)."""
    path = tmp_path / "src.npy"
    np.save(path, values)
    rows = np.load(path, mmap_mode="r")
    fd = os.open(path, os.O_RDONLY)
    return fd, rows.offset, rows


@pytest.mark.parametrize("kernel", ["copy_file_range", "sendfile", "write"])
def test_copy_records_writes_what_extend_writes(tmp_path, rng, monkeypatch, kernel):
    """The kernel's file-to-file copy (used for .npy files already in the record layout) gives the
    same shards and checksums as extend, across shard boundaries and after buffered samples; where
    the kernel cannot copy between the files, the bytes are written instead."""
    values = rng.standard_normal((1000, 64)).astype(np.float32)
    fd, offset, rows = _npy_records(tmp_path, values)
    if kernel != "copy_file_range":
        def no_range(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", no_range, raising=False)
    if kernel == "write":
        def no_sendfile(*args):
            raise OSError(errno.EINVAL, "not supported")
        monkeypatch.setattr(os, "sendfile", no_sendfile, raising=False)
    fields, shard_size = {"x": ("float32", (64,))}, 64 + 256 * 300
    try:
        with shardfeed.Writer(tmp_path / "copied", fields=fields, shard_size=shard_size) as w:
            w.extend({"x": values[:7]})
            w._copy_records(fd, offset + 7 * 256, rows[7:650])
            w._copy_records(fd, offset + 650 * 256, rows[650:])
    finally:
        os.close(fd)
    write(str(tmp_path / "extended"), fields, [{"x": values}], shard_size)
    assert shard_bytes(str(tmp_path / "copied")) == shard_bytes(str(tmp_path / "extended"))
    copied, extended = read_manifest(str(tmp_path / "copied")), read_manifest(str(tmp_path / "extended"))
    assert [s.checksum for s in copied.shards] == [s.checksum for s in extended.shards]
    assert len(copied.shards) == 4


def test_copy_records_refuses_other_layouts(tmp_path, rng):
    fd, offset, rows = _npy_records(tmp_path, rng.standard_normal((10, 4)))
    try:
        for fields in ({"x": ("float32", (4,))}, {"x": ("float64", (5,))}, {"x": ("float64", (4,)), "y": "int8"}):
            with shardfeed.Writer(tmp_path / f"w{len(fields)}{fields['x'][0]}{fields['x'][1][0]}", fields=fields) as w:
                with pytest.raises(ValueError, match="_copy_records needs one fixed field"):
                    w._copy_records(fd, offset, rows)
    finally:
        os.close(fd)


def test_copy_records_from_a_truncated_source_fails_cleanly(tmp_path, rng):
    fd, offset, rows = _npy_records(tmp_path, rng.standard_normal((100, 4)))
    os.truncate(tmp_path / "src.npy", offset + 50 * 32)
    try:
        w = shardfeed.Writer(tmp_path / "t", fields={"x": ("float64", (4,))})
        with pytest.raises(OSError, match="ended .* bytes early"):
            w._copy_records(fd, offset, np.zeros((100, 4)))
    finally:
        os.close(fd)
    assert len(shardfeed.open(tmp_path / "t")) == 0


def test_writes_start_writeback_every_few_megabytes(tmp_path, rng, monkeypatch, tools):
    """Each shard file asks the kernel to start writing its data to disk every 8 MiB (so the fsync
    that commits it waits for the tail only); the ranges are consecutive and the data intact."""
    from shardfeed import writer as writer_module

    calls = []
    monkeypatch.setattr(writer_module, "_writeback", lambda fd, offset, length, flags: calls.append(
        (os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd, offset, length, flags)))
    values = rng.standard_normal((5000, 1024)).astype(np.float32)  # about 20 MiB
    write(str(tmp_path / "d"), {"x": ("float32", (1024,))}, [{"x": values[i:i + 500]} for i in range(0, 5000, 500)],
          1 << 30)
    tools.assert_identical(shardfeed.open(tmp_path / "d").read(np.arange(5000))["x"], values)
    assert len(calls) == 2 and all(flags == 2 for *_, flags in calls)
    assert calls[0][1] == 0 and calls[1][1] == calls[0][1] + calls[0][2]
    assert all(length >= 8 << 20 for _, _, length, _ in calls)
    assert {name for name, *_ in calls} == {str(tmp_path / "d" / "shard-000000.rec")} or not os.path.exists("/proc")


def test_writeback_hint_is_found_on_linux():
    from shardfeed import writer as writer_module

    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        writer_module._start_writeback(fd, 0, 4096)  # a hint: no error whatever the file
    finally:
        os.close(fd)
    if sys.platform.startswith("linux"):
        assert callable(writer_module._writeback)
