"""benchmarks/compare (the regression gate) and benchmarks/plot.py, on synthetic results; the
loaders sweep of benchmarks/sweep.py on a small dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


SHUFFLES = {"tf.data": "sequential files, window of 10,000", "shardfeed-block16": "blocks of 16 neighbours"}


def results(rates: dict, shuffles: bool = True) -> dict:
    """A pytest-benchmark JSON as bench_read.py writes it: {(regime, profile, reader): samples/s};
    without ``shuffles``, as runs from before the field did."""
    benches = []
    for (regime, profile, reader), rate in rates.items():
        base = rates[(regime, profile, "memmap")]
        info = {"regime": regime, "profile": profile, "reader": reader, "samples_per_s": rate,
                "ratio_to_memmap": rate / base}
        if shuffles:
            info["shuffle"] = SHUFFLES.get(reader, "global permutation")
        benches.append({"group": f"{regime}-{profile}", "extra_info": info})
    return {"benchmarks": benches}


def write(tmp_path, name: str, content: dict) -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        json.dump(content, f)
    return path


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, "compare"), *args],
                          capture_output=True, text=True, timeout=60)


REFERENCE = {("cold", "f16-8KiB", "memmap"): 1000.0, ("cold", "f16-8KiB", "shardfeed"): 3000.0,
             ("cold", "f16-8KiB", "h5py"): 500.0, ("page-cached", "f16-128B", "memmap"): 10.0,
             ("page-cached", "f16-128B", "shardfeed"): 20.0, ("cold", "f16-8KiB", "tf.data"): 2000.0,
             ("cold", "f16-8KiB", "shardfeed-block16"): 9000.0}


def test_compare_stores_then_passes_within_tolerance_and_fails_beyond(tmp_path):
    stored = os.path.join(tmp_path, "ratios.json")
    run = write(tmp_path, "ref.json", results(REFERENCE))
    done = compare("--json", run, "--stored", stored, "--update")
    assert done.returncode == 0, done.stderr
    with open(stored) as f:
        assert json.load(f) == {"cold-f16-8KiB/shardfeed": 3.0, "cold-f16-8KiB/shardfeed-block16": 9.0,
                                "page-cached-f16-128B/shardfeed": 2.0}

    # Absolute speeds halve (a busier machine) but the ratio holds: no regression.
    slower = {k: v / 2 for k, v in REFERENCE.items()}
    slower[("cold", "f16-8KiB", "shardfeed")] = 1500 * 0.92  # -8%: within 10%
    done = compare("--json", write(tmp_path, "a.json", results(slower)), "--stored", stored)
    assert done.returncode == 0, done.stdout + done.stderr

    slower[("cold", "f16-8KiB", "shardfeed")] = 1500 * 0.85  # -15%
    done = compare("--json", write(tmp_path, "b.json", results(slower)), "--stored", stored)
    assert done.returncode == 1
    assert "cold-f16-8KiB/shardfeed" in done.stdout and "REGRESSION" in done.stdout

    # A peer's ratio is not gated; a faster memmap is (it lowers shardfeed's ratio).
    peer_slow = dict(REFERENCE)
    peer_slow[("cold", "f16-8KiB", "h5py")] = 1.0
    assert compare("--json", write(tmp_path, "c.json", results(peer_slow)), "--stored", stored).returncode == 0
    memmap_fast = dict(REFERENCE)
    memmap_fast[("page-cached", "f16-128B", "memmap")] = 15.0
    assert compare("--json", write(tmp_path, "d.json", results(memmap_fast)), "--stored", stored).returncode == 1


def test_compare_missing_entries_are_listed_not_failed(tmp_path):
    stored = write(tmp_path, "ratios.json", {"cold-f16-8KiB/shardfeed": 3.0, "out-of-core-f16-8KiB/shardfeed": 9.0})
    done = compare("--json", write(tmp_path, "r.json", results(REFERENCE)), "--stored", stored)
    assert done.returncode == 0, done.stdout
    assert "out-of-core-f16-8KiB/shardfeed" in done.stdout and "only one side" in done.stdout


def test_compare_bad_input(tmp_path):
    done = compare("--json", os.path.join(tmp_path, "missing.json"), "--stored", os.path.join(tmp_path, "s.json"))
    assert done.returncode == 2 and "missing.json" in done.stderr
    broken = os.path.join(tmp_path, "broken.json")
    with open(broken, "w") as f:
        f.write("{not json")
    done = compare("--json", broken)
    assert done.returncode == 2 and "broken.json" in done.stderr
    done = compare("--json", write(tmp_path, "empty.json", {"benchmarks": []}))
    assert done.returncode == 2 and "no shardfeed entries" in done.stderr
    assert compare("--tolerance", "1.5", "--json", broken).returncode == 2


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = os.path.join(tmp_path, "plot.png")
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "plot.py"), write(tmp_path, "r.json", results(REFERENCE)),
                           "-o", out], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "plot.py"), write(tmp_path, "e.json", {"benchmarks": []}),
                           "-o", out], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no bench_read.py entries" in done.stderr


def test_plot_labels_each_reader_with_the_shuffle_it_gives(tmp_path):
    """A reader that picks its own order is labelled with its shuffle (and hatched); the readers of
    a global permutation, and every reader of a run from before the field, keep their names."""
    sys.path.insert(0, BENCHMARKS)
    import plot
    table = plot.load(write(tmp_path, "r.json", results(REFERENCE)))
    assert sorted(table[("cold", "f16-8KiB")]) == ["h5py", "memmap", "shardfeed",
                                                   "shardfeed-block16 [blocks of 16 neighbours]",
                                                   "tf.data [sequential files, window of 10,000]"]
    assert [plot.own_order(label) for label in sorted(table[("cold", "f16-8KiB")])] == [False, False, False, True, True]
    old = plot.load(write(tmp_path, "old.json", results(REFERENCE, shuffles=False)))
    assert sorted(old[("cold", "f16-8KiB")]) == ["h5py", "memmap", "shardfeed", "shardfeed-block16", "tf.data"]


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, "sweep.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_loaders_sweep_reports_each_reader_against_ds_read(tmp_path):
    """``sweep.py loaders``: a markdown row per profile and reader, the baseline at exactly 1.00 in
    every round, the loader's ratios positive; unknown readers, or a list without the baseline
    first, are refused with the reason."""
    done = sweep("loaders", "--no-cold", "--mb", "2", "--profiles", "f16-128B,f16-8KiB",
                 "--readers", "shardfeed-alloc,shardfeed-loader")
    assert done.returncode == 0, done.stderr
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| f16-")]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [
        ("f16-128B", "shardfeed-alloc"), ("f16-128B", "shardfeed-loader"),
        ("f16-8KiB", "shardfeed-alloc"), ("f16-8KiB", "shardfeed-loader")]
    for profile, reader, rate, ratio, spread in rows:
        low, high = (float(x) for x in spread.split("-"))
        assert float(rate.replace(",", "")) > 0 and 0 < low <= float(ratio) <= high
        if reader.strip() == "shardfeed-alloc":
            assert (ratio.strip(), spread.strip()) == ("1.00", "1.00-1.00")
    refused = sweep("loaders", "--readers", "shardfeed-alloc,no-such-reader")
    assert refused.returncode == 2 and "no benchmark reader 'no-such-reader'" in refused.stderr
    refused = sweep("loaders", "--no-cold", "--mb", "1", "--readers", "shardfeed-loader")
    assert refused.returncode != 0 and "name it first in --readers" in refused.stderr


def test_read_benchmark_summary_leaves_the_warmup_pass_out_of_the_rates_and_keeps_it_in_memory(monkeypatch):
    """bench_read's ``Passes.summary``: samples/s, CPU per sample and cores used are medians over
    the timed passes only (pytest-benchmark's warmup pass, often slow, is left out); the memory
    figures are the most that any pass used, the warmup included; every pass is listed."""
    import types

    import numpy as np
    monkeypatch.syspath_prepend(BENCHMARKS)
    import bench_read
    passes = bench_read.Passes.__new__(bench_read.Passes)
    # (samples, seconds, peak RSS growth, anonymous growth), CPU seconds: the warmup first
    passes.records = [(100, 1.0, 900, 90), (400, 1.0, 10, 1), (300, 1.0, 20, 2), (500, 1.0, 30, 3)]
    passes.cpu_seconds = [5.0, 0.4, 0.6, 0.5]
    data = types.SimpleNamespace(profile=types.SimpleNamespace(output_bytes=1000))
    summary = passes.summary(data, warmup=1)
    assert summary["samples_per_s"] == np.median([400, 300, 500]) == 400
    assert summary["samples_per_s_best"] == 500
    assert summary["output_gb_per_s"] == 400 * 1000 / 1e9
    assert summary["cpu_us_per_sample"] == np.median([1e6 * 0.4 / 400, 1e6 * 0.6 / 300, 1e6 * 0.5 / 500])
    assert summary["cores_used"] == np.median([0.4, 0.6, 0.5])
    assert summary["peak_rss_growth_bytes"] == 900 and summary["anon_growth_bytes"] == 90
    assert summary["pass_rates"] == [100, 400, 300, 500] and summary["warmup_passes"] == 1
    assert passes.summary(data, warmup=0)["samples_per_s"] == np.median([100, 400, 300, 500])
