"""Random batch reads, page-cached: shardfeed vs numpy.memmap fancy indexing + astype(float32).

One group per profile (see conftest.PROFILES); in each, three readers run on the same records and
the same index batches (consecutive batches of fresh random permutations):

- ``memmap``: ``mm[indices].astype(np.float32)`` (+ ``x *= scale; x += offset`` for images);
- ``shardfeed``: ``ds.read(indices, "x", dtype="float32", out={"x": buffer})`` into a reused
  buffer, the way a training loop reads;
- ``shardfeed-alloc``: the same without ``out=``, so a new array per batch, like memmap's.

Each round times one batch; choosing the indices is not timed. Every run, timed or not, asserts
that the reader returns exactly (bit for bit) what the memmap baseline computes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

BASELINE = "memmap"
READERS = [BASELINE, "shardfeed", "shardfeed-alloc"]
SECONDS_PER_BENCH = 2.0


def _reader(data, name: str):
    if name == BASELINE:
        return data.read_memmap
    if name == "shardfeed":
        buffer = np.empty((data.profile.batch,) + data.profile.shape, np.float32)
        return lambda indices: data.read_shardfeed(indices, buffer)
    return data.read_shardfeed


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and \
        bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def _rounds(read, batches) -> int:
    """Rounds for about SECONDS_PER_BENCH of timed reads (choosing indices is not counted)."""
    work = [next(batches) for _ in range(5)]
    start = time.perf_counter()
    for indices in work:
        read(indices)
    per_round = (time.perf_counter() - start) / len(work)
    return int(min(20000, max(50, SECONDS_PER_BENCH / per_round)))


@pytest.mark.parametrize("reader", READERS)
def test_random_batch(benchmark, bench_data, timing_enabled: bool, reader: str):
    profile = bench_data.profile
    read = _reader(bench_data, reader)
    benchmark.group = f"random-batch-{profile.name}"
    benchmark.extra_info.update(reader=reader, baseline=reader == BASELINE, profile=profile.name, batch=profile.batch,
                                record_bytes=profile.record_bytes,
                                output_bytes_per_sample=profile.output_bytes,
                                dataset_samples=bench_data.count,
                                threads=bench_data.dataset.threads,
                                mmap_path=bool(bench_data.dataset._use_map),
                                pages_pinned=bench_data.pinned)

    # Correctness: the same batches through this reader and through the baseline, bit for bit.
    checks = bench_data.batches(seed=1)
    correct = all(_same_bits(np.array(read(indices)), bench_data.read_memmap(indices))
                  for indices in (next(checks), next(checks)))
    benchmark.extra_info["correct"] = correct

    batches = bench_data.batches()
    if timing_enabled:
        bench_data.warm()
        rounds = _rounds(read, batches)
        warmup = min(200, rounds // 10)
    else:
        rounds, warmup = 1, 0
    result = benchmark.pedantic(read, setup=lambda: ((next(batches),), {}), rounds=rounds,
                                warmup_rounds=warmup, iterations=1)
    assert result.shape == (profile.batch,) + profile.shape and result.dtype == np.float32
    assert correct, f"{reader} differs from numpy.memmap + astype on profile {profile.name}"
