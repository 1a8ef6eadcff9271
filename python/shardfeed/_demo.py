"""``shardfeed demo``: writes a synthetic image dataset in a temporary directory and trains a small
Keras model on it from the shards (a validation split, a new random order every epoch), printing
per-epoch samples/s and memory next to the dataset's size. Without Keras, or with
``--read-only``, it reads random batches instead and prints the read throughput."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from . import dataset as _dataset
from .writer import Writer

CLASSES = 10


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def memory() -> Dict[str, int]:
    """Peak RSS, and where /proc has them the current private (anonymous) and file-backed RSS."""
    figures: Dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    figures[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in figures:  # macOS: ru_maxrss is in bytes there (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        figures["VmHWM"] = peak if sys.platform == "darwin" else peak * 1024
    return figures


def write_images(path: str, samples: int, side: int) -> float:
    """uint8[3, side, side] images whose class (0-9) shows as a faint class pattern under noise,
    and int64 labels. Returns the seconds it took."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (CLASSES, 3, side, side)).astype(np.float32)
    record_bytes = 3 * side * side + 8
    chunk = max(1, (16 << 20) // record_bytes)
    started = time.perf_counter()
    with Writer(path, fields={"image": ("uint8", (3, side, side)), "label": ("int64", ())},
                metadata={"classes": [f"class_{i}" for i in range(CLASSES)], "source": "shardfeed demo"}) as writer:
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            labels = rng.integers(0, CLASSES, n)
            noise = rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8)
            images = (0.05 * patterns[labels] + 0.95 * noise).astype(np.uint8)
            writer.extend({"image": images, "label": labels})
    return time.perf_counter() - started


def _samples(args: argparse.Namespace) -> int:
    record_bytes = 3 * args.image_size ** 2 + 8
    return args.samples if args.samples else max(20, int(args.size_mb * (1 << 20)) // record_bytes)


def run(args: argparse.Namespace) -> int:
    keras = None
    if not args.read_only:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            import keras
        except ImportError:
            print("Keras is not installed, so the demo only reads batches; to train a model, install the "
                  "extra: pip install 'shardfeed[tensorflow]'")
    side = args.image_size
    samples = _samples(args)
    with tempfile.TemporaryDirectory(prefix="shardfeed-demo-", dir=args.dir) as root:
        path = os.path.join(root, "images")
        elapsed = write_images(path, samples, side)
        size = samples * (3 * side * side + 8)
        print(f"wrote {samples:,} samples ({human_bytes(size)}) of uint8[3,{side},{side}] images + int64 labels "
              f"in {elapsed:.1f} s ({size / elapsed / 1e6:.0f} MB/s) to {path}")
        with _dataset.open(path) as ds:
            if keras is None:
                return _read_only(ds, args, size)
            return _train(keras, ds, args, size)


def _train(keras, ds, args: argparse.Namespace, size: int) -> int:
    from .keras import ShardSequence

    train, val = ds.split([1 - args.validation, args.validation], seed=0)
    side = args.image_size
    read = dict(dtype={"image": "float32"}, scale={"image": 1 / 127.5}, offset={"image": -1.0})
    train_seq = ShardSequence(train, args.batch_size, "image", "label", seed=0, **read)
    val_seq = ShardSequence(val, args.batch_size, "image", "label", shuffle=False, **read)
    print(f"training a Keras ({keras.backend.backend()}) MLP on {len(train):,} samples, validating on "
          f"{len(val):,}: batches of {args.batch_size} read from the shards by {ds.threads} native threads, "
          "a new random order of the whole training split every epoch")

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((3, side, side)), keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(CLASSES, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    private: List[int] = []

    class Report(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started, self.trained = time.perf_counter(), None

        def on_test_begin(self, logs=None):
            self.trained = time.perf_counter() - self.started

        def on_epoch_end(self, epoch, logs=None):
            seconds = self.trained if self.trained is not None else time.perf_counter() - self.started
            figures = memory()
            if "RssAnon" in figures:
                private.append(figures["RssAnon"])
            mine = f", private {human_bytes(figures['RssAnon'])}" if "RssAnon" in figures else ""
            print(f"epoch {epoch + 1}/{args.epochs}: loss {logs['loss']:.3f}, accuracy {logs['accuracy']:.3f}, "
                  f"val_accuracy {logs['val_accuracy']:.3f} | {len(train) / seconds:,.0f} samples/s | "
                  f"peak RSS {human_bytes(figures['VmHWM'])}{mine}", flush=True)

    model.fit(train_seq, validation_data=val_seq, epochs=args.epochs, shuffle=False, verbose=0,
              callbacks=[Report()])
    figures = memory()
    peak = figures["VmHWM"]
    print(f"dataset {human_bytes(size)}; peak RSS {human_bytes(peak)} = {peak / size:.2f} x the dataset")
    if private:
        print(f"private memory (RSS minus file pages) at each epoch's end: "
              f"{', '.join(human_bytes(p) for p in private)}: it depends on the model and a few batches, not "
              "on the dataset. The rest of the RSS is the dataset's pages in the page cache, mapped while "
              "reading, which the kernel reclaims when memory is short.")
    print("try --size-mb with more than your RAM (and --epochs 1): the private memory stays the same")
    return 0


def _read_only(ds, args: argparse.Namespace, size: int) -> int:
    side = args.image_size
    print(f"opened {ds.num_shards} shard(s); reading random batches of {args.batch_size} with "
          f"{ds.threads} native threads, uint8 -> normalised float32 in place")
    scale, offset = np.float32(1 / 127.5), np.float32(-1.0)
    read = 0
    started = time.perf_counter()
    for x, y in ds.batches(args.batch_size, inputs="image", targets="label", seed=0, epochs=args.epochs,
                           dtype={"image": "float32"}, scale={"image": scale}, offset={"image": offset}):
        read += len(y)
    elapsed = time.perf_counter() - started
    print(f"read {read:,} samples in {elapsed:.2f} s: {read / elapsed:,.0f} samples/s, "
          f"{read * 3 * side * side * 4 / elapsed / 1e9:.2f} GB/s of float32 output; "
          f"peak RSS {human_bytes(memory()['VmHWM'])} for a {human_bytes(size)} dataset")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=float, default=256, help="dataset size in MiB (default 256; pick more "
                        "than your RAM to see the out-of-core case)")
    parser.add_argument("--samples", type=int, default=0, help="number of samples (overrides --size-mb)")
    parser.add_argument("--image-size", type=int, default=32, help="images are uint8[3, N, N] (default 32)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--validation", type=float, default=0.1, help="fraction held out for validation")
    parser.add_argument("--read-only", action="store_true", help="read random batches instead of training")
    parser.add_argument("--dir", default=None, help="directory for the temporary dataset (default: system temp)")

