"""Random-order epoch reads: shardfeed and its peers, page-cached, cold and out-of-core.

One pytest-benchmark group per regime and profile (``<regime>-<profile>``). In each, every reader
of readers.py and peers.py reads passes of fresh uniformly random permutations of the dataset
into float32 batches (see readers.py for what each reader does), and a limit is measured in the
same run: the same records memcpy'd from a memory map and cast (page-cached), or the best of
fio's random-read configurations at the record size (cold, out-of-core).

- page-cached: the reader's files are evicted, read once front to back (as ``Dataset.preload`` does)
  and mlock()ed; ``PAGE_CACHED_ROUNDS`` passes.
- cold: before each pass every reader is closed and the files are evicted from the page cache
  (``posix_fadvise(POSIX_FADV_DONTNEED)``; the fraction still resident is recorded). shardfeed
  is opened with ``preload=False``: these passes (part of an epoch) time its random reads against
  fio's random-read limit; the default's whole first epoch is bench_first_epoch.py's.
- out-of-core: the files are evicted, then the passes run inside a memory cgroup capped at a
  quarter of the dataset, so the page cache can hold at most a quarter of it and every pass goes
  to the disk for most records. Needs root (cgroup v1); skipped otherwise.

A pass is ``pass_samples()`` samples, cut short after ``PASS_SECONDS`` for slow readers, so
``samples_per_s`` is what was read over how long it took (median over the timed passes:
page-cached, pytest-benchmark's warmup pass is left out; ``pass_rates`` lists every pass, the
warmup first, and ``warmup_passes`` says how many). Every run,
timed or not, first checks each reader's batches against numpy (``data.reference``).

From disk, each profile's fio sweep (``test_disk_limit``) runs first and picks the best
configuration; then before every pass of every reader that configuration runs once more on the
evicted shard file (untimed, ``paired_fio``): this disk's rate drifts by a third within minutes
(fio alone: 12.5 k then 7.5 k reads/s of 147 KiB), so ``ratio_to_paired_fio``, the median over
passes of the pass's rate over the fio run just before it, compares a reader with the disk as it
was at that moment, where ``ratio_to_limit`` compares it with the sweep minutes earlier or later.

The loaders (``readers.LOADERS``: ``ds.batches``, ``ShardSequence``, ``ShardLoader``) are compared
with ``ds.read`` into new arrays (issue 18, item 3) the same way: before each of their passes, in
its setup (untimed by pytest-benchmark), a ``shardfeed-alloc`` pass runs in the same regime (from
disk: after the paired fio run, on evicted files, which are evicted again after it), and
``ratio_to_paired_alloc`` is the median over passes of the loader's rate over that pass's. A
full run's separate ``shardfeed-alloc`` entry ran minutes earlier, when this VM may have been
faster or slower by more than the gap measured.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fio  # noqa: E402
import peers  # noqa: E402
import readers  # noqa: E402
from regimes import (COLD, OUT_OF_CORE, PAGE_CACHED, BenchData, evict,  # noqa: E402
                     Pin, file_pmd_mapped_bytes, memory_cgroup_unavailable, read_in_order,
                     peak_rss_bytes, reset_peak_rss, resident_fraction, rss_bytes, anon_bytes)
from shardfeed.format import HEADER_BYTES  # noqa: E402

READERS = {cls.name: cls for cls in readers.READERS + peers.PEERS}
PAGE_CACHED_ROUNDS, DISK_ROUNDS = 5, 3
PASS_SECONDS = 4.0

# torch forks DataLoader workers from this multi-threaded process (Python >= 3.12 warns).
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")


def _cases() -> List[Tuple[str, str]]:
    cases = []
    for regime in (PAGE_CACHED, COLD, OUT_OF_CORE):
        for name in READERS:
            if name == readers.CopyCeilingReader.name and regime != PAGE_CACHED:
                continue  # a memcpy from memory is the page-cached limit only
            if regime in READERS[name].skip_regimes:
                continue
            cases.append((regime, name))
    return cases


def pass_samples(data: BenchData, regime: str, timing: bool) -> int:
    """Samples per pass: enough to time (64 MiB of records page-cached, 32 Ki samples from disk,
    at least 64 batches), at most the dataset (half of it from disk, so a pass is mostly cold)."""
    batch = data.profile.batch
    if not timing:
        return 2 * batch
    if regime == PAGE_CACHED:
        want, most = max(64 * batch, (64 << 20) // data.profile.record_bytes), data.count
    else:
        want, most = max(64 * batch, 32768), data.count // 2
    return max(batch, min(want, most) // batch * batch)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Passes:
    """The timed function: one pass of a fresh permutation, cut short after PASS_SECONDS; records
    (samples, seconds, peak RSS growth, anonymous memory growth) of every pass: how far the
    process's resident set rose above where it was when the pass began (batches, buffers, and the
    pages of files it maps), and how much more private memory it held at the end; and the CPU
    time (user + system) of this process's threads over the pass (the io_uring kernel workers
    are threads of the process; DataLoader worker processes are not counted)."""

    def __init__(self, reader, data: BenchData, samples: int):
        self.reader, self.samples = reader, samples
        self.orders = data.orders(seed=len(reader.name))
        self.records: List[Tuple[int, float, int, int]] = []
        self.cpu_seconds: List[float] = []

    def next_order(self) -> np.ndarray:
        """The next pass's samples: the start of a fresh permutation (drawn untimed, in setup)."""
        return next(self.orders)[:self.samples]

    def __call__(self, order: np.ndarray) -> None:
        reset_peak_rss()
        rss_before, anon_before = rss_bytes(), anon_bytes()
        read = 0
        cpu_before = _cpu_seconds()
        start = time.perf_counter()
        batches = self.reader.read_pass(order)
        try:
            for ids, _ in batches:
                read += len(ids)
                if time.perf_counter() - start > PASS_SECONDS:
                    break
        finally:
            batches.close()
        seconds = time.perf_counter() - start
        self.cpu_seconds.append(_cpu_seconds() - cpu_before)
        self.records.append((read, seconds, peak_rss_bytes() - rss_before, anon_bytes() - anon_before))

    def rates(self) -> List[float]:
        """Samples per second of every pass."""
        return [n / t for n, t, _, _ in self.records]

    def summary(self, data: BenchData, warmup: int) -> dict:
        """The figures of the timed passes (all but the first ``warmup``); the memory figures are
        the most any pass used, the warmup included."""
        timed = list(zip(self.records, self.cpu_seconds))[warmup:]
        assert timed, f"no timed pass among {len(self.records)}"
        rates = [n / t for (n, t, _, _), _ in timed]
        rate = float(np.median(rates))
        return {"samples_per_s": rate, "samples_per_s_best": max(rates),
                "output_gb_per_s": rate * data.profile.output_bytes / 1e9,
                "peak_rss_growth_bytes": max(r for _, _, r, _ in self.records),
                "anon_growth_bytes": max(a for _, _, _, a in self.records),
                "pass_samples": [n for n, _, _, _ in self.records], "pass_rates": self.rates(),
                "warmup_passes": warmup,
                "cpu_us_per_sample": float(np.median([1e6 * c / max(1, n) for (n, _, _, _), c in timed])),
                "cores_used": float(np.median([c / t for (_, t, _, _), c in timed]))}


@pytest.mark.parametrize("regime", [COLD, OUT_OF_CORE])
def test_disk_limit(benchmark, bench_data: BenchData, timing_enabled: bool, regime: str):
    """The physical limit from disk: fio's best random-read rate at the record size, over the same
    shard file, as many reads as a pass, evicted before each run; the best configuration's median
    over ``DISK_ROUNDS`` runs, as the readers' figures are medians of ``DISK_ROUNDS`` passes."""
    why = fio.unavailable() or (memory_cgroup_unavailable() if regime == OUT_OF_CORE else None)
    if why:
        pytest.skip(why)
    data = bench_data
    samples = pass_samples(data, regime, timing_enabled)
    _describe(benchmark, data, regime, "fio-best", samples, readers.GLOBAL_SHUFFLE)  # each record once, at random
    files = [data.record_file]
    data.release()
    configurations = None if timing_enabled else fio.QUICK_CONFIGURATIONS
    limit = data.memory_limit() if regime == OUT_OF_CORE else None
    try:
        result = benchmark.pedantic(fio.best_fio, args=(files, data.profile.record_bytes, HEADER_BYTES, samples),
                                    kwargs=dict(evict=lambda: evict(files), configurations=configurations,
                                                cgroup_procs=None if limit is None else limit.procs,
                                                repeats=DISK_ROUNDS if timing_enabled else 2),
                                    rounds=1, iterations=1)
    finally:
        if limit is not None:
            limit.remove()
    assert result["iops"] > 0
    data.fio_best[regime] = result["best_configuration"]
    benchmark.extra_info.update(samples_per_s=result["iops"],
                                output_gb_per_s=result["iops"] * data.profile.output_bytes / 1e9,
                                fio_best=result["best"], fio_iops=result["by_configuration"],
                                fio_best_runs=result["best_runs"])


def paired_fio(data: BenchData, regime: str, samples: int) -> Optional[float]:
    """One run of the profile's best fio configuration (found by ``test_disk_limit``) reading
    ``samples`` records of the shard file, evicted before and after: the disk's rate just before a
    pass. None when the sweep did not run (no fio, or a ``-k`` selection without it)."""
    configuration = data.fio_best.get(regime)
    if configuration is None:
        return None
    files = [data.record_file]
    result = fio.best_fio(files, data.profile.record_bytes, HEADER_BYTES, samples, evict=lambda: evict(files),
                          configurations=[configuration])
    evict(files)
    return result["iops"]


class PairedBaseline:
    """Item 3's baseline for a loader (``readers.LOADERS``): a ``readers.LOADERS_BASELINE`` pass
    (``ds.read`` into new arrays, opened as the loader is) run just before each of its passes."""

    def __init__(self, data: BenchData, loader, samples: int):
        self.reader = data.reader(READERS[readers.LOADERS_BASELINE])
        self.reader.open_options = loader.open_options
        self.passes = Passes(self.reader, data, samples)
        self.opened = False

    def run(self, reopen: bool = True) -> None:
        """One baseline pass. With ``reopen`` the dataset is opened for the pass and closed after
        it (from disk, as the loader is), else opened once and kept open (page-cached, as the
        loader is: a dataset opened anew maps its files anew, and its first reads fault the
        mappings' page tables in)."""
        if not self.opened:
            self.reader.open()
            self.opened = True
        try:
            self.passes(self.passes.next_order())
        finally:
            if reopen:
                self.close()  # its maps would keep pages cached

    def close(self) -> None:
        if self.opened:
            self.reader.close()
            self.opened = False


    def report(self, benchmark, passes: Passes, warmup: int) -> None:
        """``ratio_to_paired_alloc``: the median over the timed pairs (not the first ``warmup``,
        pytest-benchmark's warmup rounds, in which the baseline's first reads of its new maps
        fault their page tables in) of the loader's pass rate over the baseline's."""
        base, rates = self.passes.rates(), passes.rates()
        assert len(base) == len(rates) > warmup and all(rate > 0 for rate in base), (base, rates)
        ratios = [r / b for r, b in zip(rates[warmup:], base[warmup:])]
        benchmark.extra_info.update(paired_alloc_runs=base, ratio_to_paired_alloc=float(np.median(ratios)))


def _describe(benchmark, data: BenchData, regime: str, reader_name: str, samples: int, shuffle: str) -> None:
    profile = data.profile
    benchmark.group = f"{regime}-{profile.name}"
    benchmark.extra_info.update(regime=regime, reader=reader_name, shuffle=shuffle, profile=profile.name,
                                batch=profile.batch,
                                record_bytes=profile.record_bytes, output_bytes_per_sample=profile.output_bytes,
                                dataset_samples=data.count, dataset_bytes=data.dataset_bytes,
                                samples_per_pass=samples)


@pytest.mark.parametrize("regime,reader_name", _cases(), ids=[f"{r}-{n}" for r, n in _cases()])
def test_epoch_pass(benchmark, bench_data: BenchData, timing_enabled: bool, regime: str, reader_name: str):
    cls = READERS[reader_name]
    why = cls.unavailable() or (memory_cgroup_unavailable() if regime == OUT_OF_CORE else None)
    if why:
        pytest.skip(why)
    data = bench_data
    reader = data.reader(cls)
    if isinstance(reader, readers.ShardfeedReader):  # cold: the random reads (bench_first_epoch.py: the default)
        reader.open_options = {**type(reader).open_options, **({"preload": False} if regime == COLD else {})}
    samples = pass_samples(data, regime, timing_enabled)
    _describe(benchmark, data, regime, reader_name, samples, reader.shuffle)
    files = reader.files()

    # Correctness, every run: one short pass checked against numpy.
    reader.open()
    try:
        readers.check_pass(reader, data, next(data.orders(seed=1))[:2 * data.profile.batch])
    finally:
        reader.close()

    passes = Passes(reader, data, samples)
    paired: List[Optional[float]] = []  # fio's rate before each pass from disk (paired_fio)
    baseline = PairedBaseline(data, reader, samples) if reader.name in readers.LOADERS else None
    rounds = (PAGE_CACHED_ROUNDS if regime == PAGE_CACHED else DISK_ROUNDS) if timing_enabled else 1
    warmup = 1 if timing_enabled and regime == PAGE_CACHED else 0
    if regime == PAGE_CACHED:
        data.release()
        # "Read once", the same way for every reader's files: evicted, then read in order (as
        # Dataset.preload does), not left as their writer cached them.
        evict(files)
        read_in_order(files)
        data.pin = Pin(files)
        benchmark.extra_info["pages_pinned"] = data.pin.locked
        reader.open()

        def page_cached_start():
            if baseline is not None:
                baseline.run(reopen=False)
            return (passes.next_order(),), {}

        try:
            benchmark.pedantic(passes, setup=page_cached_start, rounds=rounds, warmup_rounds=warmup, iterations=1)
            benchmark.extra_info["file_pmd_mapped_bytes"] = file_pmd_mapped_bytes()
        finally:
            reader.close()
            if baseline is not None:
                baseline.close()
            data.release()
    elif regime == COLD:
        resident = []

        def cold_start():
            data.release()
            paired.append(paired_fio(data, regime, samples))
            evict(files)
            if baseline is not None:
                baseline.run()
                evict(files)
            resident.append(resident_fraction(files))
            reader.open()
            return (passes.next_order(),), {}

        try:
            benchmark.pedantic(passes, setup=cold_start, rounds=rounds, iterations=1)
        finally:
            reader.close()
        benchmark.extra_info["resident_before_pass"] = max(resident)
    else:
        data.release()
        evict(files)
        limit = data.memory_limit()
        try:
            with limit:
                def out_of_core_start():
                    reader.close()  # its maps would keep pages cached for fio
                    paired.append(paired_fio(data, regime, samples))  # inside the cgroup, as a child
                    if baseline is not None:
                        baseline.run()  # in the cgroup too: this process is
                    reader.open()
                    return (passes.next_order(),), {}

                try:
                    benchmark.pedantic(passes, setup=out_of_core_start, rounds=rounds, iterations=1)
                finally:
                    reader.close()
            benchmark.extra_info.update(memory_limit_bytes=limit.limit_bytes, limit_hits=limit.failcnt())
        finally:
            limit.remove()
    benchmark.extra_info.update(passes.summary(data, warmup))
    if regime in data.fio_best:  # from disk, after the sweep: a fio run before every pass
        assert len(paired) == rounds and all(rate > 0 for rate in paired), paired
        benchmark.extra_info.update(paired_fio_runs=paired, ratio_to_paired_fio=float(
            np.median([r / f for r, f in zip(passes.rates(), paired)])))
    if baseline is not None:
        baseline.report(benchmark, passes, warmup)
    assert sum(n for n, _, _, _ in passes.records) > 0
