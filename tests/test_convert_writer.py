"""The writer's direct path (one fixed field filling the record, batches of at least a write buffer):
the converters feed it large chunks. It must write exactly what the buffered path writes."""

import os
import sys

import numpy as np
import pytest

import shardfeed
from shardfeed.manifest import read_manifest

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


def test_large_writes_are_checksummed_piece_by_piece_exactly(tmp_path, rng):
    """Large writes go in 1 MiB pieces with the CRC-32 computed on a second thread: the manifest's
    CRC-32 is the whole file's, whatever the sizes of the writes."""
    import zlib

    values = rng.standard_normal((3000, 700)).astype(np.float32)  # 2.8 KB records, writes of 0.3 to 8 MB
    path = write(str(tmp_path / "d"), {"x": ("float32", (700,))},
                 [{"x": values[:100]}, {"x": values[100:2900]}, {"x": values[2900:]}], 64 + 2800 * 2000)
    for shard in read_manifest(path).shards:
        with open(os.path.join(path, shard.file), "rb") as f:
            assert shard.checksum == f"crc32:{zlib.crc32(f.read()):08x}"


@pytest.mark.parametrize("piece", [4096, 5000, 1 << 20])
def test_checksum_thread_with_any_piece_size(tmp_path, rng, monkeypatch, piece):
    import zlib

    from shardfeed import shardfile

    monkeypatch.setattr(shardfile, "_WRITE_PIECE", piece)
    values = rng.integers(0, 255, (300, 999), dtype=np.uint8)
    path = write(str(tmp_path / "d"), {"x": ("uint8", (999,))}, [{"x": values[:1]}, {"x": values[1:]}], 1 << 30)
    (shard,) = read_manifest(path).shards
    with open(os.path.join(path, shard.file), "rb") as f:
        assert shard.checksum == f"crc32:{zlib.crc32(f.read()):08x}"
    np.testing.assert_array_equal(shardfeed.open(path).read(np.arange(300))["x"], values)


def test_a_failed_large_write_stops_the_checksum_thread(tmp_path, rng, monkeypatch):
    import errno
    import threading

    from shardfeed import shardfile

    class Full:
        """A shard file whose third piece finds the disk full."""

        def __init__(self, file):
            self.file, self.pieces = file, 0

        def write(self, data):
            self.pieces += 1
            if self.pieces == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    original = shardfile._OutputFile.__init__

    def init(self, path, header):
        original(self, path, header)
        self.file = Full(self.file)

    monkeypatch.setattr(shardfile._OutputFile, "__init__", init)
    before = set(threading.enumerate())
    w = shardfeed.Writer(tmp_path / "d", fields={"x": ("float32", (1024,))})
    with pytest.raises(shardfeed.ShardWriteError, match="the disk is full"):
        w.extend({"x": rng.standard_normal((4096, 1024)).astype(np.float32)})
    assert not set(threading.enumerate()) - before  # no writer thread left (a count would also see
    # another test's background preload pass end meanwhile)
    assert len(shardfeed.open(tmp_path / "d")) == 0


def test_writes_start_writeback_every_few_megabytes(tmp_path, rng, monkeypatch, tools):
    """Each shard file asks the kernel to start writing its data to disk every 8 MiB (so the fsync
    that commits it waits for the tail only); the ranges are consecutive and the data intact."""
    from shardfeed import shardfile

    calls = []
    monkeypatch.setattr(shardfile, "_writeback", lambda fd, offset, length, flags: calls.append(
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
    from shardfeed import shardfile

    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        shardfile._start_writeback(fd, 0, 4096)  # a hint: no error whatever the file
    finally:
        os.close(fd)
    if sys.platform.startswith("linux"):
        assert callable(shardfile._writeback)
