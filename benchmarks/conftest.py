"""Fixtures and reporting for the read benchmarks (see benchmarks/README.md).

With ``--benchmark-disable`` (the default in pyproject's addopts) every benchmark runs one short
pass on a small dataset as a correctness test. With ``--benchmark-enable`` each profile's dataset
is ``--bench-dataset-mb`` MiB (default 1024) and every reader is timed in every regime; at the end
of the session each entry gets ``ratio_to_memmap`` and ``ratio_to_limit`` in its ``extra_info``
(and the JSON), and a summary table is printed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Dict, Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from regimes import LIMITS, PROFILES, REGIMES, BenchData, Profile  # noqa: E402

DEFAULT_DATASET_MB = 1024


def pytest_addoption(parser):
    parser.addoption("--bench-dataset-mb", type=int, default=DEFAULT_DATASET_MB,
                     help="size of each profile's dataset when timing (MiB)")


def _timing_enabled(config) -> bool:
    return not config.getoption("benchmark_disable") or bool(config.getoption("benchmark_enable"))


@pytest.fixture(scope="session")
def bench_root() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="shardfeed-bench-")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", params=PROFILES, ids=lambda p: p.name)
def bench_data(request, bench_root) -> Iterator[BenchData]:
    """Session-scoped and parametrized, so pytest builds one profile's dataset (and the peers'
    copies of it) at a time and removes them before building the next."""
    profile: Profile = request.param
    if _timing_enabled(request.config):
        count = (request.config.getoption("bench_dataset_mb") << 20) // profile.record_bytes
    else:
        count = 4 * profile.batch + 3
    data = BenchData(bench_root, profile, count)
    try:
        yield data
    finally:
        data.close()
        shutil.rmtree(data.path, ignore_errors=True)
        shutil.rmtree(data.peer_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def timing_enabled(request) -> bool:
    """False under --benchmark-disable (unless --benchmark-enable): one short pass, small data."""
    return _timing_enabled(request.config)


# ---- ratios to the same-run baseline and limit ---------------------------------------------------

# The torch peer (peers.py): a DataLoader over a memory map, with 0 and 2 worker processes.
TORCH_PEERS = ("torch-w0", "torch-w2")


# ds.read into a new array per batch: what a loader does for each batch, with nothing around it.
READ_BASELINE = "shardfeed-alloc"


def add_ratios(benches) -> None:
    """ratio_to_memmap, ratio_to_limit, ratio_to_torch_peer (to the faster of TORCH_PEERS) and
    ratio_to_read (to READ_BASELINE; issue 18's target for the loaders is 0.9 or more) (samples/s
    over theirs, same group, same run)."""
    by_group: Dict[str, Dict[str, object]] = {}
    for bench in benches:
        by_group.setdefault(bench.group, {})[bench.extra_info["reader"]] = bench
    for group in by_group.values():
        for bench in group.values():
            info = bench.extra_info
            base = group.get("memmap")
            limit = group.get(LIMITS[info["regime"]])
            if base is not None:
                info["ratio_to_memmap"] = info["samples_per_s"] / base.extra_info["samples_per_s"]
            if limit is not None:
                info["ratio_to_limit"] = info["samples_per_s"] / limit.extra_info["samples_per_s"]
            read = group.get(READ_BASELINE)
            if read is not None:
                info["ratio_to_read"] = info["samples_per_s"] / read.extra_info["samples_per_s"]
            torch_peers = [group[name] for name in TORCH_PEERS if name in group]
            if torch_peers:
                best = max(peer.extra_info["samples_per_s"] for peer in torch_peers)
                info["ratio_to_torch_peer"] = info["samples_per_s"] / best


def _benches(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return []
    return [b for b in session.benchmarks if b and "regime" in b.extra_info]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Before pytest-benchmark's own hook saves the JSON, so the ratios are in it.
    add_ratios(_benches(session.config))
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    benches = _benches(config)
    if not benches:
        return
    write = terminalreporter.write_line
    write("")
    write("samples/s: median of the passes; ratios to numpy.memmap and to the limit (memcpy ceiling "
          "page-cached, best fio cold and out-of-core) in the same run; x fio now: to fio's best "
          "configuration run just before each pass (median over the passes); x torch: to the faster "
          "torch peer (DataLoader over numpy.memmap, 0 or 2 workers); x read: to ds.read into new arrays "
          "(shardfeed-alloc); shuffle: the order a pass "
          "really reads (compare global permutations with each other and fio, the others with "
          "shardfeed-block16)")
    write(f"{'group':<30} {'reader':<17} {'shuffle':<33} {'samples/s':>11} {'out GB/s':>8} {'RSS rise':>9} "
          f"{'anon':>8} {'x memmap':>8} {'x limit':>7} {'x fio now':>9} {'x torch':>7} {'x read':>6}")
    order = {r: k for k, r in enumerate(REGIMES)}
    for bench in sorted(benches, key=lambda b: (b.extra_info["profile"], order[b.extra_info["regime"]],
                                                -b.extra_info["samples_per_s"])):
        info = bench.extra_info
        rss, anon = info.get("peak_rss_growth_bytes"), info.get("anon_growth_bytes")
        write(f"{bench.group:<30} {info['reader']:<17} {info.get('shuffle', ''):<33} "
              f"{info['samples_per_s']:>11,.0f} "
              f"{info.get('output_gb_per_s', float('nan')):>8.2f} "
              f"{'' if rss is None else f'{rss / 2**20:,.0f} MiB':>9} "
              f"{'' if rss is None else f'{anon / 2**20:,.0f} MiB':>8} "
              f"{info.get('ratio_to_memmap', float('nan')):>8.2f} {info.get('ratio_to_limit', float('nan')):>7.2f} "
              f"{info.get('ratio_to_paired_fio', float('nan')):>9.2f} "
              f"{info.get('ratio_to_torch_peer', float('nan')):>7.2f} "
              f"{info.get('ratio_to_read', float('nan')):>6.2f}")


