"""What per-record CRC32C checksums cost (docs/format.md, "Record checksums").

- ``checked-read-8KiB``: page-cached random batches of 256 float16[4096] records (8 KiB) read into
  a reused ``out=`` array, through the memory map and by preadv (``mmap=False``), with
  ``open(path, verify=True)`` and without. The two are timed in alternating passes in the same
  test (the machine is shared and its speed drifts within seconds), and the benchmark itself times
  the checked passes. ``extra_info``: ``unchecked_s`` and ``checked_s`` (median pass), ``ratio``
  (checked over unchecked: 1.10 = 10% slower), ``kernel`` (the CRC32C kernel in use),
  ``load_average`` (1 minute, at the end), ``correct`` (both read the numpy data).
- ``write-8KiB``: writing the same records (two ``extend`` calls, fsync per shard); ``extra_info``
  ``checksum_s``: what computing their checksums alone takes (``_core.record_checksums``, median of
  the same rounds), and ``checksum_share``, its part of the write's median time.

With ``--benchmark-disable`` (the test suite's default) each runs once on a small dataset.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time

import numpy as np
import pytest

import shardfeed
from shardfeed import _core

RECORD_ELEMENTS = 4096  # float16: 8 KiB records
BATCH = 256
TIMED_RECORDS = 8192  # 64 MiB
ROUNDS = 7


def _records(count: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, RECORD_ELEMENTS)).astype(np.float16)


@pytest.mark.benchmark(group="checked-read-8KiB")
@pytest.mark.parametrize("mmap", [True, False], ids=["mapped", "preadv"])
def test_checked_reads_page_cached(benchmark, tmp_path, timing_enabled, mmap):
    count = TIMED_RECORDS if timing_enabled else 3 * BATCH + 5
    data = _records(count)
    path = str(tmp_path / "d")
    with shardfeed.Writer(path, fields={"x": ("float16", (RECORD_ELEMENTS,))}, shard_size=16 << 20) as w:
        w.extend({"x": data})
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, count, BATCH) for _ in range(max(4, count // BATCH))]
    out = np.empty((BATCH, RECORD_ELEMENTS), np.float16)
    plain = shardfeed.open(path, mmap=mmap)
    checked = shardfeed.open(path, mmap=mmap, verify=True)

    def one_pass(ds) -> float:
        start = time.perf_counter()
        for batch in batches:
            ds.read(batch, out={"x": out})
        return time.perf_counter() - start

    correct = all(np.array_equal(ds.read(batches[0])["x"], data[batches[0]]) for ds in (plain, checked))
    one_pass(plain)  # every page cached and mapped
    rounds = ROUNDS if timing_enabled else 1
    unchecked_s, checked_s = [], []
    for _ in range(rounds):
        unchecked_s.append(one_pass(plain))
        checked_s.append(one_pass(checked))
    benchmark.pedantic(one_pass, args=(checked,), rounds=rounds, iterations=1)
    benchmark.extra_info.update(
        reader="checked-map" if mmap else "checked-preadv", records=count, kernel=_core.BUILD_INFO["crc32c_kernel"],
        load_average=os.getloadavg()[0], record_bytes=2 * RECORD_ELEMENTS, batch=BATCH, correct=correct,
        unchecked_s=statistics.median(unchecked_s), checked_s=statistics.median(checked_s),
        ratio=statistics.median(checked_s) / statistics.median(unchecked_s),
    )
    plain.close()
    checked.close()
    assert correct


@pytest.mark.benchmark(group="write-8KiB")
def test_write_with_checksums(benchmark, tmp_path, timing_enabled):
    count = TIMED_RECORDS if timing_enabled else 3 * BATCH + 5
    data = _records(count)
    path = str(tmp_path / "w")
    sums_s = []

    def write() -> None:
        shutil.rmtree(path, ignore_errors=True)
        with shardfeed.Writer(path, fields={"x": ("float16", (RECORD_ELEMENTS,))}, shard_size=32 << 20) as w:
            half = count // 2
            w.extend({"x": data[:half]})
            w.extend({"x": data[half:]})
        start = time.perf_counter()
        _core.record_checksums(data, data.strides[0])
        sums_s.append(time.perf_counter() - start)

    benchmark.pedantic(write, rounds=ROUNDS if timing_enabled else 1, iterations=1)
    with shardfeed.open(path) as ds:
        correct = np.array_equal(ds[:]["x"], data) and shardfeed.verify(path).ok
    write_s = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(reader="writer", records=count, correct=correct,
                                checksum_s=statistics.median(sums_s),
                                checksum_share=statistics.median(sums_s) / write_s)
    assert correct and os.path.exists(os.path.join(path, "shard-000000.crc"))
