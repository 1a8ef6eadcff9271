"""Draws samples/s per profile and regime, for shardfeed and each peer, from a results JSON.

    python benchmarks/plot.py run.json -o benchmarks/results.png

``run.json`` is what ``pytest benchmarks/bench_read.py --benchmark-enable --benchmark-json=run.json``
writes. One panel per regime (rows) and profile (columns); a bar per reader, log scale, with the
regime's limit (memcpy ceiling page-cached, best fio from disk) as a dashed line. A reader whose
passes are not a global permutation (tf.data, shardfeed-block16) is labelled with the shuffle it
really gives and drawn hatched: compare it with the others of its kind, not with the limit.
Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from readers import GLOBAL_SHUFFLE  # noqa: E402
from regimes import LIMITS, PROFILES, REGIMES  # noqa: E402


def label(info: dict) -> str:
    """The reader's name, and the shuffle it gives when that is not a global permutation."""
    shuffle = info.get("shuffle", GLOBAL_SHUFFLE)  # runs from before the field: every reader's order
    return info["reader"] if shuffle == GLOBAL_SHUFFLE else f"{info['reader']} [{shuffle}]"


def load(path: str) -> dict:
    """{(regime, profile): {label: samples/s}}, labels from :func:`label`."""
    with open(path) as f:
        results = json.load(f)
    table: dict = {}
    for bench in results["benchmarks"]:
        info = bench["extra_info"]
        if "regime" in info and "samples_per_s" in info:
            table.setdefault((info["regime"], info["profile"]), {})[label(info)] = info["samples_per_s"]
    return table


def colour(reader: str) -> str:
    if reader.startswith("shardfeed"):
        return "tab:blue"
    return "tab:gray" if reader == "memmap" else "tab:orange"


def own_order(reader_label: str) -> bool:
    """Whether the bar is a reader that picks its own order (labelled with its shuffle)."""
    return reader_label.endswith("]")


def plot(table: dict, out: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    profiles = [p.name for p in PROFILES]
    fig, axes = plt.subplots(len(REGIMES), len(profiles), figsize=(4.2 * len(profiles), 2.9 * len(REGIMES)),
                             squeeze=False)
    for row, regime in enumerate(REGIMES):
        for col, profile in enumerate(profiles):
            ax = axes[row][col]
            rates = table.get((regime, profile), {})
            limit = rates.get(LIMITS[regime])
            readers = sorted((r for r in rates if r != LIMITS[regime]), key=lambda r: rates[r])
            ax.barh(readers, [rates[r] for r in readers], color=[colour(r) for r in readers],
                    hatch=["//" if own_order(r) else "" for r in readers])
            if limit:
                ax.axvline(limit, color="black", linestyle="--", linewidth=1)
                ax.text(limit, len(readers) - 0.5, f" {LIMITS[regime]}", fontsize=7, va="top")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{regime}, {profile}", fontsize=9)
            ax.tick_params(labelsize=7)
            if row == len(REGIMES) - 1:
                ax.set_xlabel("samples/s (log)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="pytest-benchmark JSON from bench_read.py")
    parser.add_argument("-o", "--output", default="results.png")
    parser.add_argument("--title", default="Random-order epoch reads, float32 output (higher is better)")
    args = parser.parse_args(argv)
    table = load(args.results)
    if not table:
        print(f"plot: no bench_read.py entries in {args.results}", file=sys.stderr)
        return 2
    plot(table, args.output, args.title)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
