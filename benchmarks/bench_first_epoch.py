"""The first epoch of a run over a dataset that fits in RAM but is not cached (issue 18, item 1):
shardfeed as opened by default (``preload="auto"``: a background sequential pass while the first
batches are served by random reads), against numpy.memmap and a torch ``DataLoader`` over a memmap
(both helped by the kernel's readahead around each page fault), in the same run.

A pass is one whole epoch: a fresh uniformly random permutation of the dataset, read into float32
batches by each reader of ``READERS`` (readers.py and peers.py: ``memmap``, ``torch-w0``,
``torch-w2``, ``shardfeed`` (``ds.read`` into a reused buffer), ``shardfeed-loader``
(``ds.batches``), and ``shardfeed-preload-off``, opened with ``preload=False``: the random reads
only, as before the background pass). Cut short after ``PASS_SECONDS`` (the rate is then that of
the epoch's start, flagged ``capped``).

Measuring cold reads on a VM whose disk drifts and keeps blocks untouched for a while on a slower
tier (benchmarks/RESULTS.md, issue 18): every reader reads the same shard file; it is read once
front to back before the first eviction (so every block is equally warm on the host), the readers'
order rotates every round, and before every pass the file is evicted, fio reads it sequentially
once (``fio.sequential_command``: the disk's bandwidth at that moment), and it is evicted again.
``ratio_to_paired_fio`` is the pass's samples/s over the samples/s of reading the whole file at
that fio rate: 1.0 is an epoch as fast as one sequential read of the dataset.

Timed: ``python benchmarks/bench_first_epoch.py [--dataset-mb 1024] [--rounds 3] [--json out.json]
[--profiles f16-128B,...] [--readers memmap,shardfeed,...]`` prints one table per profile with the
load average before each pass (the machine is shared). Under pytest (the test suite), each reader
runs the whole protocol once on a dataset of a few batches and its batches are checked against
numpy's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fio  # noqa: E402
import peers  # noqa: E402
import readers  # noqa: E402
from regimes import PROFILES, BenchData, evict, read_in_order, resident_fraction  # noqa: E402

PASS_SECONDS = 40.0


class ShardfeedPreloadOffReader(readers.ShardfeedReader):
    """``shardfeed.open(path, preload=False)``: random reads only (the reader before issue 18)."""

    name = "shardfeed-preload-off"

    def open(self) -> None:
        import shardfeed
        self.dataset = shardfeed.open(self.data.path, preload=False)
        self.buffer = np.empty((self.profile.batch,) + self.profile.shape, np.float32)


READERS = {cls.name: cls for cls in (readers.MemmapReader, peers.TorchW0Reader, peers.TorchW2Reader,
                                     readers.ShardfeedReader, readers.ShardfeedLoaderReader,
                                     ShardfeedPreloadOffReader)}
TORCH_PEERS = ("torch-w0", "torch-w2")


def paired_fio(files: List[str]) -> Optional[float]:
    """Bytes/s of one sequential fio read of ``files``, evicted before and after; None without fio."""
    if fio.unavailable():
        return None
    evict(files)
    with tempfile.TemporaryDirectory(prefix="shardfeed-fio-") as tmp:
        read = fio.run_fio(fio.sequential_command(files, os.path.join(tmp, "report.json")))
    evict(files)
    return float(read["bw_bytes"])


def one_pass(reader, order: np.ndarray, check: Optional[BenchData]) -> Dict[str, float]:
    """Times one epoch of ``reader`` over ``order``; with ``check``, every batch is compared with
    numpy's (untimed runs only)."""
    if check is not None:
        readers.check_pass(reader, check, order)
        return {"samples": len(order), "seconds": 0.0, "capped": False}
    read = 0
    start = time.perf_counter()
    batches = reader.read_pass(order)
    capped = False
    try:
        for ids, _ in batches:
            read += len(ids)
            if time.perf_counter() - start > PASS_SECONDS:
                capped = read < len(order)
                break
    finally:
        batches.close()
    return {"samples": read, "seconds": time.perf_counter() - start, "capped": capped}


def run_profile(data: BenchData, names: List[str], rounds: int, timing: bool) -> Dict[str, list]:
    """The protocol for one profile; returns reader name -> one record per pass."""
    files = [data.record_file]
    available = {name: READERS[name] for name in names if not READERS[name].unavailable()}
    results: Dict[str, list] = {name: [] for name in available}
    data.release()
    read_in_order(files)  # every block equally warm on the host before the first eviction
    order_of_readers = list(available)
    rng = np.random.default_rng(7)
    for round_ in range(rounds):
        shift = round_ % len(order_of_readers)
        for name in order_of_readers[shift:] + order_of_readers[:shift]:
            reader = data.reader(available[name])
            data.release()
            bandwidth = paired_fio(files)
            evict(files)
            resident = resident_fraction(files)
            load = os.getloadavg()[0]
            reader.open()
            try:
                record = one_pass(reader, rng.permutation(data.count).astype(np.int64), None if timing else data)
            finally:
                reader.close()
            record.update(round=round_, paired_fio_bytes_per_s=bandwidth, resident_before=resident, load_average=load)
            if bandwidth:
                record["ratio_to_paired_fio"] = (record["samples"] / record["seconds"]) / (
                    data.count / (os.path.getsize(data.record_file) / bandwidth)) if record["seconds"] else None
            results[name].append(record)
    data.release()
    return results


def summarise(profile_name: str, results: Dict[str, list]) -> List[dict]:
    """One row per reader: median samples/s and, per round, ratios to memmap's and the faster torch
    peer's pass of the same round."""
    def rate(r):
        return r["samples"] / r["seconds"] if r["seconds"] else float("nan")

    rows = []
    for name, records in results.items():
        rates = [rate(r) for r in records]
        row = {"profile": profile_name, "reader": name, "samples_per_s": statistics.median(rates),
               "rates": rates, "capped": any(r["capped"] for r in records),
               "load_average": [round(r["load_average"], 2) for r in records],
               "paired_fio_mb_per_s": [round(r["paired_fio_bytes_per_s"] / 1e6) if r["paired_fio_bytes_per_s"] else None
                                       for r in records],
               "resident_before": max(r["resident_before"] for r in records)}
        by_round = {r["round"]: rate(r) for r in records}
        for base, key in (("memmap", "ratio_to_memmap"), (None, "ratio_to_torch_peer")):
            bases = [base] if base else [p for p in TORCH_PEERS if p in results]
            ratios = []
            for round_, value in by_round.items():
                base_rates = [rate(r) for p in bases for r in results.get(p, []) if r["round"] == round_]
                if base_rates:
                    ratios.append(value / max(base_rates))
            row[key] = statistics.median(ratios) if ratios else None
        fio_ratios = [r["ratio_to_paired_fio"] for r in records if r.get("ratio_to_paired_fio")]
        row["ratio_to_paired_fio"] = statistics.median(fio_ratios) if fio_ratios else None
        rows.append(row)
    return rows


def print_table(rows: List[dict]) -> None:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"
    print(f"{'profile':<16}{'reader':<24}{'samples/s':>12}{'x memmap':>10}{'x torch':>9}{'x fio seq':>10}"
          "  rounds (samples/s | load | fio MB/s)")
    for row in rows:
        rounds = ", ".join(f"{r:,.0f}|{l}|{f}" for r, l, f in zip(row["rates"], row["load_average"],
                                                                  row["paired_fio_mb_per_s"]))
        print(f"{row['profile']:<16}{row['reader'] + ('*' if row['capped'] else ''):<24}{row['samples_per_s']:>12,.0f}"
              f"{fmt(row['ratio_to_memmap'], '10.2f')}{fmt(row['ratio_to_torch_peer'], '9.2f')}"
              f"{fmt(row['ratio_to_paired_fio'], '10.2f')}  {rounds}")


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-mb", type=int, default=1024, help="each profile's dataset (MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profiles", default=",".join(p.name for p in PROFILES))
    parser.add_argument("--readers", default=",".join(READERS))
    parser.add_argument("--json", help="write the rows and every pass here")
    parser.add_argument("--tmp", default=None, help="where the datasets are written (removed after)")
    args = parser.parse_args(argv)
    rows: List[dict] = []
    passes: Dict[str, dict] = {}
    root = tempfile.mkdtemp(prefix="shardfeed-first-epoch-", dir=args.tmp)
    try:
        for profile in PROFILES:
            if profile.name not in args.profiles.split(","):
                continue
            data = BenchData(root, profile, (args.dataset_mb << 20) // profile.record_bytes)
            try:
                results = run_profile(data, args.readers.split(","), args.rounds, timing=True)
            finally:
                data.close()
                shutil.rmtree(data.path, ignore_errors=True)
                shutil.rmtree(data.peer_dir, ignore_errors=True)
            passes[profile.name] = results
            profile_rows = summarise(profile.name, results)
            print_table(profile_rows)
            sys.stdout.flush()
            rows += profile_rows
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "passes": passes}, f, indent=1)
    return rows


def test_first_epoch_protocol(tmp_path):
    """Untimed: every reader's whole-epoch batches equal numpy's, through the whole protocol
    (evictions, paired fio where installed, rotation), on each profile."""
    for profile in PROFILES:
        data = BenchData(str(tmp_path), profile, 3 * profile.batch + 5)
        try:
            results = run_profile(data, list(READERS), rounds=2, timing=False)
        finally:
            data.close()
        assert set(results) >= {"memmap", "shardfeed", "shardfeed-loader", "shardfeed-preload-off"}
        rows = summarise(profile.name, results)
        assert all(len(results[name]) == 2 for name in results)
        assert all(row["samples_per_s"] != row["samples_per_s"] for row in rows)  # untimed: NaN, not a figure


if __name__ == "__main__":
    main()
