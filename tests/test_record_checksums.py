"""Per-record CRC32C checksums (docs/format.md, "Record checksums"): the kernel against a pure-Python
reference, what the writer and merge store, `verify` naming exactly the damaged samples (text and
JSON), `open(path, verify=True)` raising on them, and datasets of format version 1 (no checksums)."""

import json
import os
import zlib

import numpy as np
import pytest

import shardfeed
from shardfeed import _core
from shardfeed.cli import main
from shardfeed.format import HEADER_BYTES

N = 60


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bit by bit, from the definition: reflected polynomial 0x82F63B78, initial and final XOR."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ---- the kernel -------------------------------------------------------------------------------


def crc32c_prefixes(data: bytes) -> list:
    """The CRC32C of every prefix of ``data`` (lengths 0..len): the bit-by-bit rule of
    crc32c_reference applied a byte at a time through a 256-entry table, so one pass gives every
    length."""
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (0x82F63B78 if n & 1 else 0)
        table.append(n)
    crc, out = 0xFFFFFFFF, [0]
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
        out.append(crc ^ 0xFFFFFFFF)
    return out


# RFC 3720 (iSCSI), appendix B.4: 32 bytes of zeros, of ones, ascending, descending, and a SCSI
# Read (10) command PDU.
RFC3720_VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (bytes.fromhex("01c00000000000000000000000000000" "14000000000004000000001400000018" "28000000000000000200000000000000"),
     0xD9963A56),
]


@pytest.fixture(params=_core.crc32c_kernels())
def crc_kernel(request):
    """Each CRC32C kernel this CPU can run, selected for the test."""
    before = _core.use_crc32c_kernel(request.param)
    try:
        yield request.param
    finally:
        _core.use_crc32c_kernel(before)


def test_known_vectors(crc_kernel):
    assert crc32c_reference(b"123456789") == 0xE3069283
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(b"") == 0
    for data, expected in RFC3720_VECTORS:
        assert crc32c_reference(data) == expected
        assert _core.crc32c(data) == expected


def test_kernel_is_bit_identical_to_the_reference(rng, crc_kernel):
    """Every length 0..4096 and some long ones (the kernels switch strategy at 384 and 512 bytes
    and interleave blocks of n/3 or n/200 bytes) at 16 alignments, continued from a previous
    result like zlib.crc32; and the fused copy, which must copy exactly the bytes and no more."""
    buffer = rng.integers(0, 256, 20_016 + 64, dtype=np.uint8)
    long_lengths = [4097, 5000, 8191, 8192, 8193, 3 * 8192 // 2 + 9, 20_000]
    scratch = np.zeros(20_016 + 64, np.uint8)
    for start in range(16):
        expected = crc32c_prefixes(buffer[start:start + 20_000].tobytes())
        for n in list(range(4097)) + long_lengths:
            piece = memoryview(buffer)[start:start + n]  # not copied: the kernel sees the unaligned start
            assert _core.crc32c(piece) == expected[n], (crc_kernel, n, start)
            if n % 7 == 0 or n > 4096:
                cut = n // 3
                assert _core.crc32c(piece[cut:], _core.crc32c(piece[:cut])) == expected[n], (n, start)
                at = (start * 5) % 16
                scratch[:] = 0xEE
                assert _core.crc32c_copy(memoryview(scratch)[at:at + n], piece) == expected[n], (n, start)
                assert bytes(scratch[at:at + n]) == piece.tobytes()
                assert (scratch[:at] == 0xEE).all() and (scratch[at + n:] == 0xEE).all()


def test_fastest_kernel_is_used_where_the_cpu_has_it():
    kernels = _core.crc32c_kernels()
    assert kernels[-1] == "table" and _core.BUILD_INFO["crc32c_kernel"] == kernels[0]
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        for line in read_bytes("/proc/cpuinfo").decode().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    machine = os.uname().machine
    if machine == "x86_64" and {"sse4_2", "pclmulqdq"} <= flags:
        assert "sse4.2-pclmul" in kernels
        if {"avx2", "vpclmulqdq"} <= flags:
            assert kernels[0] == "avx2-vpclmulqdq"
    if machine == "aarch64" and "crc32" in flags:
        assert kernels[0] == "armv8-crc"
    if len(kernels) > 1:
        assert _core.BUILD_INFO["crc32c_hardware"] is True
    with pytest.raises(ValueError, match="not available"):
        _core.use_crc32c_kernel("no-such-kernel")


def test_record_checksums_of_a_buffer(rng):
    records = rng.integers(0, 256, (9, 24), dtype=np.uint8)
    np.testing.assert_array_equal(_core.record_checksums(records, 24),
                                  [crc32c_reference(r.tobytes()) for r in records])
    with pytest.raises(ValueError, match="not whole records"):
        _core.record_checksums(records, 25)


# ---- what is stored ---------------------------------------------------------------------------


RECORD = 32  # x at 0, y at 8, t's descriptor at 16


def load_manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def read_bytes(file):
    with open(file, "rb") as f:
        return f.read()


def write(path, shard_size=HEADER_BYTES + 20 * RECORD):
    """60 samples, 20 per shard: x float32[2], y int32, t int16[None] (sample i: i % 4 rows of i)."""
    columns = {"x": np.arange(2 * N, dtype=np.float32).reshape(N, 2), "y": np.arange(N, dtype=np.int32) * 7,
               "t": [np.full(i % 4, i, np.int16) for i in range(N)]}
    with shardfeed.Writer(path, fields={"x": ("float32", (2,)), "y": "int32", "t": ("int16", (None,))},
                          shard_size=shard_size) as w:
        w.extend(columns)
    return columns


def patch(file, offset, data):
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def shard(path, number, ext=".rec"):
    return os.path.join(path, f"shard-{number:06d}{ext}")


def test_the_stored_checksums_are_the_crc32c_of_each_record_and_its_rows(new_path):
    path = new_path()
    columns = write(path)
    manifest = load_manifest(path)
    assert manifest["version"] == 2
    for number, entry in enumerate(manifest["shards"]):
        crc_file = os.path.join(path, entry["checksums"]["file"])
        data = read_bytes(crc_file)
        assert entry["checksums"]["file"] == f"shard-{number:06d}.crc"
        assert len(data) == entry["checksums"]["size"] == HEADER_BYTES + 20 * 8
        assert entry["checksums"]["checksum"] == f"crc32:{zlib.crc32(data):08x}"
        sums = np.frombuffer(data, "<u4", offset=HEADER_BYTES).reshape(20, 2)
        records = read_bytes(shard(path, number))[HEADER_BYTES:]
        for k in range(20):
            i = 20 * number + k
            assert sums[k, 0] == crc32c_reference(records[k * RECORD:(k + 1) * RECORD])
            assert sums[k, 1] == crc32c_reference(columns["t"][i].astype("<i2").tobytes())


def test_direct_writes_store_checksums_too(new_path, rng):
    """A single fixed field filling the record goes to the file without the write buffer."""
    path = new_path()
    x = rng.integers(0, 256, (3000, 64), dtype=np.uint8)
    with shardfeed.Writer(path, fields={"x": ("uint8", (64,))}) as w:
        w.extend({"x": x})
    [entry] = load_manifest(path)["shards"]
    sums = np.fromfile(os.path.join(path, entry["checksums"]["file"]), "<u4", offset=HEADER_BYTES)
    np.testing.assert_array_equal(sums, [crc32c_reference(r.tobytes()) for r in x[:50]] + list(sums[50:]))
    np.testing.assert_array_equal(sums, _core.record_checksums(x, 64))
    assert shardfeed.verify(path).ok


# ---- verify and checked reads -----------------------------------------------------------------


def test_an_intact_dataset_passes_and_checked_reads_equal_the_data(new_path, mmap_mode):
    path = new_path()
    columns = write(path)
    assert shardfeed.verify(path).ok
    with shardfeed.open(path, mmap=mmap_mode, verify=True) as ds:
        indices = np.array([59, 0, 21, 21, 40, 7])
        batch = ds.read(indices)
        np.testing.assert_array_equal(batch["x"], columns["x"][indices])
        np.testing.assert_array_equal(batch["y"], columns["y"][indices])
        for row, i in enumerate(indices):
            np.testing.assert_array_equal(batch["t"][row, :batch.lengths["t"][row]], columns["t"][i])
        scaled = ds.read(indices, fields="y", dtype="float32", scale=0.5, offset=1.0)["y"]
        np.testing.assert_array_equal(scaled, columns["y"][indices].astype(np.float32) * np.float32(0.5) + 1)
        np.testing.assert_array_equal(ds[:]["y"], columns["y"])


def test_a_flipped_byte_is_named_exactly_by_verify_and_checked_reads(new_path, mmap_mode, capfd):
    path = new_path()
    columns = write(path)
    patch(shard(path, 1), HEADER_BYTES + 3 * RECORD + 5, b"\xa5")  # inside x of sample 23
    patch(shard(path, 2), HEADER_BYTES + 10 * RECORD + 9, b"\x7f")  # inside y of sample 50
    patch(shard(path, 2), HEADER_BYTES + 11 * RECORD + 9, b"\x7f")  # and of sample 51
    report = shardfeed.verify(path)
    assert not report.ok and report.bad_shards == [1, 2] and report.bad_ranges == [(23, 24), (50, 52)]
    assert report.num_bad_samples == 3
    [first, second] = report.problems
    assert first.file == shard(path, 1) and first.samples == [(23, 24)]
    assert first.message == ("sample 23: record failed the per-record CRC32C check (the bytes changed after "
                             "they were written)")
    assert second.message.startswith("samples 50-51 (2 samples): record failed")
    np.testing.assert_array_equal(report.good_indices(), np.r_[0:23, 24:50, 52:N])

    assert main(["verify", path]) == 1
    out = capfd.readouterr().out
    assert f"2 problem(s) in shard(s) [1, 2]; 3 of {N} samples bad or suspect" in out
    assert f"{shard(path, 1)}: sample 23: record failed" in out and "samples 50-51 (2 samples)" in out
    assert main(["verify", "--json", path]) == 1
    doc = json.loads(capfd.readouterr().out)
    assert doc["bad_ranges"] == [[23, 24], [50, 52]] and doc["num_bad_samples"] == 3
    assert [p["samples"] for p in doc["problems"]] == [[[23, 24]], [[50, 52]]]

    with shardfeed.open(path, mmap=mmap_mode, verify=True) as ds:
        with pytest.raises(shardfeed.RecordChecksumError) as info:
            ds.read([0, 10, 23, 30], fields="y")  # a field the damage is not in: the record is checked whole
        error = info.value
        assert isinstance(error, shardfeed.ShardfeedError) and isinstance(error, ValueError)
        assert error.sample == 23 and error.path == shard(path, 1)
        assert f"{shard(path, 1)}: the record of sample 23 at byte offset {HEADER_BYTES + 3 * RECORD}" in str(error)
        with pytest.raises(shardfeed.RecordChecksumError, match="sample 51"):
            ds.read([51])
        good = report.good_indices()
        np.testing.assert_array_equal(ds.read(good)["x"], columns["x"][good])  # the rest reads fine
    with shardfeed.open(path, mmap=mmap_mode) as ds:  # unchecked: the damage reads as data
        assert not np.array_equal(ds.read([23])["x"], columns["x"][[23]])


def test_damaged_variable_rows_are_named_by_verify(new_path):
    path = new_path()
    write(path)
    # shard 0's heap: samples 1, 2, 3 have 1, 2, 3 rows of int16 (2 bytes each), in that order
    patch(shard(path, 0, ".var"), HEADER_BYTES + 2 + 2 + 1, b"\x99")  # the second row of sample 2
    report = shardfeed.verify(path)
    [problem] = report.problems
    assert problem.file == shard(path, 0, ".var") and problem.samples == [(2, 3)]
    assert problem.message.startswith("sample 2: variable-length rows failed the per-record CRC32C check")


def test_checked_reads_check_variable_rows_of_every_variable_field(new_path, mmap_mode):
    """The second checksum word covers a sample's rows of all variable fields together, so a read of
    any variable field with verify=True checks them all (and reads of fixed fields only read no
    rows); a damaged row names its sample."""
    path = new_path()
    rng = np.random.default_rng(5)
    t = [rng.integers(-99, 99, i % 5, dtype=np.int16) for i in range(N)]
    u = [rng.standard_normal((i % 3, 3)).astype(np.float32) for i in range(N)]
    y = np.arange(N, dtype=np.int32)
    with shardfeed.Writer(path, fields={"t": ("int16", (None,)), "y": "int32", "u": ("float32", (None, 3))},
                          shard_size=HEADER_BYTES + 25 * 48) as w:
        w.extend({"t": t, "y": y, "u": u})
    indices = np.array([59, 0, 31, 31, 44, 7, 26])
    with shardfeed.open(path, mmap=mmap_mode, verify=True) as ds:
        assert ds.num_shards > 1
        batch = ds.read(indices, maxlen={"t": 3, "u": None}, padding={"t": "pre", "u": "post"}, truncating="pre")
        for row, i in enumerate(indices):
            kept = t[i][-3:] if len(t[i]) > 3 else t[i]
            np.testing.assert_array_equal(batch["t"][row, 3 - len(kept):], kept)
            np.testing.assert_array_equal(batch["u"][row, :len(u[i])], u[i])
        np.testing.assert_array_equal(ds.read(indices, fields="u", dtype="float16")["u"][:, :2],
                                      ds.read(indices, fields="u")["u"][:, :2].astype(np.float16))
    # Damage one byte of u's rows of sample 8 (2 rows of 12 bytes): find them through the record.
    with shardfeed.open(path) as ds:
        field = ds.fields["u"]
        record = np.fromfile(shard(path, 0), np.uint8, ds.schema.record_bytes, "",
                             HEADER_BYTES + 8 * ds.schema.record_bytes)
        offset, rows = np.frombuffer(record[field.offset:field.offset + 16].tobytes(), np.uint64)
        assert rows == 2
    patch(shard(path, 0, ".var"), int(offset) + 13, b"\x5a")
    assert shardfeed.verify(path).bad_ranges == [(8, 9)]
    with shardfeed.open(path, mmap=mmap_mode, verify=True) as ds:
        for fields in ("u", "t", None):  # t's rows are intact, but the check covers both fields
            with pytest.raises(shardfeed.RecordChecksumError, match="variable-length rows of sample 8") as info:
                ds.read([3, 8, 9], fields=fields)
            assert info.value.sample == 8 and info.value.path == shard(path, 0, ".var")
        np.testing.assert_array_equal(ds.read([3, 8, 9], fields="y")["y"], [3, 8, 9])  # no rows read
        good = np.r_[0:8, 9:N]
        batch = ds.read(good, fields=["u", "t"])
        for row, i in enumerate(good):
            np.testing.assert_array_equal(batch["u"][row, :len(u[i])], u[i])
    with shardfeed.open(path, mmap=mmap_mode) as ds:  # unchecked: the damage reads as data
        assert not np.array_equal(ds[8]["u"], u[8])


def test_damaged_checksum_file_blames_no_sample(new_path):
    path = new_path()
    write(path)
    patch(shard(path, 1, ".crc"), HEADER_BYTES + 4, b"\xff\xff")  # the rows checksum of sample 20
    report = shardfeed.verify(path)
    [problem] = report.problems
    assert problem.file == shard(path, 1, ".crc") and problem.samples == [] and report.bad_shards == [1]
    assert "per-record checksums are damaged" in problem.message
    os.truncate(shard(path, 1, ".crc"), HEADER_BYTES + 8)
    [problem] = shardfeed.verify(path).problems
    assert problem.file == shard(path, 1, ".crc") and problem.samples == [] and "truncated" in problem.message


def test_merge_keeps_the_checksums(new_path):
    parts = [new_path(), new_path()]
    for part in parts:
        write(part)
    target = new_path()
    shardfeed.merge(parts, target)
    manifest = load_manifest(target)
    assert [s["checksums"]["file"] for s in manifest["shards"]] == [f"shard-{k:06d}.crc" for k in range(6)]
    assert shardfeed.verify(target).ok
    patch(shard(target, 4), HEADER_BYTES + 2 * RECORD, b"\x01")  # sample 60 + 20 + 2
    assert shardfeed.verify(target).bad_ranges == [(82, 83)]
    with shardfeed.open(target, verify=True) as ds, pytest.raises(shardfeed.RecordChecksumError, match="sample 82"):
        ds.read([81, 82])


# ---- datasets of format version 1 -------------------------------------------------------------


def test_old_datasets_open_read_verify_and_take_appends(new_path, tools):
    path = new_path()
    columns = write(path)
    tools.as_format_v1(path)
    assert not any(name.endswith(".crc") for name in os.listdir(path))
    with shardfeed.open(path) as ds:
        np.testing.assert_array_equal(ds[:]["y"], columns["y"])
    assert shardfeed.verify(path).ok
    with pytest.raises(shardfeed.ShardFormatError, match="no per-record checksums .* verify=True cannot check"):
        shardfeed.open(path, verify=True)
    patch(shard(path, 1), HEADER_BYTES + 3 * RECORD + 5, b"\xa5")
    report = shardfeed.verify(path)  # as before: the whole shard is suspect
    assert report.bad_ranges == [(20, 40)] and "all samples of the shard are suspect" in report.problems[0].message
    patch(shard(path, 1), HEADER_BYTES + 3 * RECORD + 5, bytes(np.float32(2 * 23).tobytes()[1:2]))
    assert shardfeed.verify(path).ok
    with shardfeed.Writer(path, mode="a") as w:  # new shards get checksums, old ones stay as they are
        w.extend({"x": np.zeros((5, 2), np.float32), "y": np.arange(5, dtype=np.int32), "t": [np.zeros(1, np.int16)] * 5})
    manifest = load_manifest(path)
    assert manifest["version"] == 2 and ["checksums" in s for s in manifest["shards"]] == [False] * 3 + [True]
    assert shardfeed.verify(path).ok
    patch(shard(path, 3), HEADER_BYTES + 8, b"\x05")
    assert shardfeed.verify(path).bad_ranges == [(60, 61)]


def test_checked_reads_flag_inexact_conversions_like_unchecked_ones(new_path, mmap_mode):
    path = new_path()
    values = np.array([1, 16777217, 3], dtype=np.int32)  # 2**24 + 1 has no float32
    with shardfeed.Writer(path, fields={"v": "int32"}) as w:
        w.extend({"v": values})
    for verify in (False, True):
        with shardfeed.open(path, mmap=mmap_mode, verify=verify) as ds:
            with pytest.raises(shardfeed.ValueRangeError, match="sample 1"):
                ds.read([0, 1, 2], dtype="float32")
            np.testing.assert_array_equal(ds.read([0, 2], dtype="float32")["v"], [1, 3])
            np.testing.assert_array_equal(ds.read([1], dtype="float32", lossy=True)["v"], [np.float32(16777217)])
