"""Fixtures and reporting for the read benchmarks (see benchmarks/README.md).

With ``--benchmark-disable`` (the default in pyproject's addopts) every benchmark runs once on a
small dataset as a correctness test. With ``--benchmark-enable`` the datasets are a few hundred MB
each, page-cached, and each group times shardfeed against ``numpy.memmap`` in the same run; the
ratios to memmap are added to ``extra_info`` (and the JSON) at the end of the session and printed
in a summary table.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES, read_manifest

# ImageNet statistics: x_float = (x_uint8 / 255 - mean) / std = x * scale + offset, per channel.
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)
NORM_SCALE = (1.0 / (255.0 * _STD)).astype(np.float32).reshape(3, 1, 1)
NORM_OFFSET = (-_MEAN / _STD).astype(np.float32).reshape(3, 1, 1)

ENABLED_DATASET_BYTES = 320 << 20  # per profile, when timing
SEED = 20240607


@dataclass(frozen=True)
class Profile:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    batch: int
    normalise: bool  # uint8 -> (x * scale + offset) per channel

    @property
    def record_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def output_bytes(self) -> int:
        """float32 bytes of one output sample."""
        return int(np.prod(self.shape)) * 4

    def kwargs(self) -> dict:
        return {"scale": NORM_SCALE, "offset": NORM_OFFSET} if self.normalise else {}


PROFILES = [
    Profile("f16-128B", "float16", (64,), 256, False),
    Profile("f16-8KiB", "float16", (64, 64), 256, False),
    Profile("u8-147KiB-norm", "uint8", (3, 224, 224), 64, True),
]


def _timing_enabled(config) -> bool:
    return not config.getoption("benchmark_disable") or bool(config.getoption("benchmark_enable"))


def _write(path: str, profile: Profile, count: int, rng: np.random.Generator) -> None:
    step = max(1, (32 << 20) // profile.record_bytes)
    with shardfeed.Writer(path, {"x": (profile.dtype, profile.shape)}, shard_size=1 << 40) as writer:
        for start in range(0, count, step):
            rows = (min(step, count - start),) + profile.shape
            if profile.dtype == "uint8":
                values = rng.integers(0, 256, rows, dtype=np.uint8)
            else:
                values = rng.standard_normal(rows, dtype=np.float32).astype(profile.dtype)
            writer.extend({"x": values})


def pin_in_memory(array: np.ndarray) -> bool:
    """mlock()s the pages under a memory-mapped array: page-cached benchmarks then stay
    page-cached. (Machines with proactive reclaim, such as DAMON pageout in some VMs, evict a
    file's pages seconds after it was read, even with most memory free.) False when not allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.mlock(ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes)) == 0


class BenchData:
    """One profile's dataset: shardfeed handle, a memmap of the same records, and index batches."""

    def __init__(self, root: str, profile: Profile, count: int):
        self.profile = profile
        self.count = count
        self.path = os.path.join(root, profile.name)
        _write(self.path, profile, count, np.random.default_rng(SEED))
        shards = read_manifest(self.path).shards
        assert len(shards) == 1, "the memmap baseline expects a single shard"
        self.record_file = os.path.join(self.path, shards[0].file)
        self.memmap = np.memmap(self.record_file, dtype=profile.dtype, mode="r", offset=HEADER_BYTES,
                                shape=(count,) + profile.shape)
        self.pinned = pin_in_memory(self.memmap)
        self.dataset = shardfeed.open(self.path)
        self.warm()

    def warm(self) -> None:
        """Page cache and page tables: the file was just written (so it is cached, and pinned if
        mlock is allowed); touch one byte per page through each memory map so that neither reader
        pays first-touch faults. Run again before each benchmark in case pages were evicted."""
        flat = self.memmap.reshape(-1).view(np.uint8)
        int(flat[::4096].sum())
        every = max(1, 4096 // self.profile.record_bytes)
        for start in range(0, self.count, every * 4096):
            self.dataset.read(np.arange(start, min(self.count, start + every * 4096), every), "x")

    def batches(self, seed: int = SEED) -> Iterator[np.ndarray]:
        """Consecutive batches of fresh uniformly random permutations (a new one each epoch)."""
        rng = np.random.default_rng(seed)
        batch = self.profile.batch
        while True:
            order = rng.permutation(self.count)
            for start in range(0, self.count - batch + 1, batch):
                yield order[start:start + batch]

    def read_memmap(self, indices: np.ndarray) -> np.ndarray:
        """The baseline: fancy indexing on numpy.memmap, astype(float32), numpy normalisation."""
        x = self.memmap[indices].astype(np.float32)
        if self.profile.normalise:
            x *= NORM_SCALE
            x += NORM_OFFSET
        return x

    def read_shardfeed(self, indices: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        batch = self.dataset.read(indices, "x", dtype="float32", out=None if out is None else {"x": out},
                                  **self.profile.kwargs())
        return batch["x"]

    def close(self) -> None:
        self.dataset.close()
        del self.memmap


@pytest.fixture(scope="session")
def bench_root() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="shardfeed-bench-")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", params=PROFILES, ids=lambda p: p.name)
def bench_data(request, bench_root) -> Iterator[BenchData]:
    """Session-scoped and parametrized, so pytest builds one profile's dataset at a time and
    removes it before building the next."""
    profile: Profile = request.param
    if _timing_enabled(request.config):
        count = ENABLED_DATASET_BYTES // profile.record_bytes
    else:
        count = 2 * profile.batch + 3
    data = BenchData(bench_root, profile, count)
    try:
        yield data
    finally:
        data.close()
        shutil.rmtree(data.path, ignore_errors=True)


@pytest.fixture(scope="session")
def timing_enabled(request) -> bool:
    """False under --benchmark-disable (unless --benchmark-enable): run once, small data."""
    return _timing_enabled(request.config)


# ---- ratios to the same-run baseline ---------------------------------------------------------


def _throughput(bench) -> Dict[str, float]:
    info = bench.extra_info
    batch, out_bytes = info["batch"], info["output_bytes_per_sample"]
    median, best = bench.stats.median, bench.stats.min
    return {
        "samples_per_s": batch / median,
        "output_gb_per_s": batch * out_bytes / median / 1e9,
        "samples_per_s_best": batch / best,
    }


def _add_ratios(config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    benches = [b for b in session.benchmarks if b and "reader" in b.extra_info]
    baseline = {b.group: b for b in benches if b.extra_info.get("baseline")}
    for bench in benches:
        bench.extra_info.update(_throughput(bench))
        base = baseline.get(bench.group)
        if base is not None:
            bench.extra_info["ratio_to_memmap"] = base.stats.median / bench.stats.median
            bench.extra_info["ratio_to_memmap_best"] = base.stats.min / bench.stats.min


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Before pytest-benchmark's own hook saves the JSON, so the ratios are in it.
    _add_ratios(session.config)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    benches = [b for b in session.benchmarks if b and "samples_per_s" in b.extra_info]
    if not benches:
        return
    write = terminalreporter.write_line
    write("")
    write("shardfeed vs numpy.memmap (median round; ratio > 1 means faster than memmap)")
    write(f"{'group':<28} {'reader':<18} {'samples/s':>12} {'out GB/s':>9} {'ratio':>7} {'ratio(min)':>10} "
          f"{'correct':>7}")
    for bench in sorted(benches, key=lambda b: (b.group, b.extra_info["reader"])):
        info = bench.extra_info
        write(f"{bench.group:<28} {info['reader']:<18} {info['samples_per_s']:>12,.0f} "
              f"{info['output_gb_per_s']:>9.2f} {info.get('ratio_to_memmap', float('nan')):>7.2f} "
              f"{info.get('ratio_to_memmap_best', float('nan')):>10.2f} {str(info['correct']):>7}")
