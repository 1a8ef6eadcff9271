"""The ``shardfeed`` command line (also ``python -m shardfeed``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np

from . import dataset as _dataset
from .errors import ShardfeedError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _demo(args: argparse.Namespace) -> int:
    """Writes a synthetic image dataset (uint8 images, int64 labels) and reads random batches."""
    from .writer import Writer

    side = args.image_size
    record_bytes = 3 * side * side + 8
    samples = args.samples if args.samples else max(1, int(args.size_mb * (1 << 20)) // record_bytes)
    with tempfile.TemporaryDirectory(prefix="shardfeed-demo-", dir=args.dir) as root:
        path = os.path.join(root, "images")
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        chunk = max(1, (8 << 20) // record_bytes)
        with Writer(path, fields={"image": ("uint8", (3, side, side)), "label": ("int64", ())},
                    metadata={"classes": [f"class_{i}" for i in range(10)], "source": "shardfeed demo"}) as writer:
            for start in range(0, samples, chunk):
                n = min(chunk, samples - start)
                labels = rng.integers(0, 10, n)
                images = rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8)
                images[:, 0, 0, 0] = labels  # something a reader can check
                writer.extend({"image": images, "label": labels})
        elapsed = time.perf_counter() - started
        size = samples * record_bytes
        print(f"wrote {samples} samples ({_human_bytes(size)}) of uint8[3,{side},{side}] + int64 label "
              f"in {elapsed:.2f} s ({size / elapsed / 1e6:.0f} MB/s)")

        ds = _dataset.open(path)
        print(f"opened {ds.num_shards} shard(s); reading random batches of {args.batch_size} with "
              f"{ds.threads} native threads, uint8 -> normalised float32 in place")
        mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None] * 255
        std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None] * 255
        scale, offset = 1 / std, -mean / std
        read = 0
        started = time.perf_counter()
        order = rng.permutation(len(ds))
        for epoch in range(args.epochs):
            for start in range(0, len(ds), args.batch_size):
                batch = ds.read(order[start:start + args.batch_size], ["image", "label"],
                                scale={"image": scale}, offset={"image": offset},
                                dtype={"image": "float32"})
                first = np.rint(batch["image"][:, 0, 0, 0] * std[0, 0, 0] + mean[0, 0, 0])
                if not np.array_equal(first, batch["label"]):
                    print("error: a batch does not match what was written", file=sys.stderr)
                    return 1
                read += len(batch["label"])
            order = rng.permutation(len(ds))
        elapsed = time.perf_counter() - started
        ds.close()
        print(f"read {read} samples in {elapsed:.2f} s: {read / elapsed:,.0f} samples/s, "
              f"{read * 3 * side * side * 4 / elapsed / 1e9:.2f} GB/s of float32 output")
    return 0


def _info(args: argparse.Namespace) -> int:
    with _dataset.open(args.path) as ds:
        manifest = ds._manifest
        if args.json:
            print(json.dumps(manifest.to_json(), indent=1))
            return 0
        print(f"{ds.path}: {len(ds)} samples in {ds.num_shards} shard(s), "
              f"{_human_bytes(sum(s.size + s.heap_size for s in manifest.shards))}")
        print(f"record: {ds.schema.record_bytes} bytes")
        for field in ds.fields.values():
            shape = ", ".join("*" if d is None else str(d) for d in field.shape)
            print(f"  {field.name}: {field.dtype}[{shape}]")
        if ds.metadata:
            print(f"metadata: {json.dumps(ds.metadata)[:2000]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardfeed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="write a synthetic dataset and read random batches from it",
                               description=_demo.__doc__)
    demo.add_argument("--size-mb", type=float, default=256, help="dataset size in MiB (default 256; "
                      "pick more than your RAM to see the out-of-core case)")
    demo.add_argument("--samples", type=int, default=0, help="number of samples (overrides --size-mb)")
    demo.add_argument("--image-size", type=int, default=64, help="images are uint8[3, N, N] (default 64)")
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--dir", default=None, help="directory for the temporary dataset (default: system temp)")
    demo.set_defaults(run=_demo)

    info = commands.add_parser("info", help="print a dataset's schema, size and metadata")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(run=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ShardfeedError, OSError) as exc:
        print(f"shardfeed {args.command}: error: {exc}", file=sys.stderr)
        return 1
