"""GPU training end to end: does a GPU trained from shardfeed ever wait for its data?

    python benchmarks/gpu_check.py [--quick]

Writes a dataset of uint8 224x224x3 images (``--dataset-gb``, 4 GiB by default, in 64 MiB chunks)
in a temporary directory it removes at the end, then prints one table:

- the reader alone: ``ds.read`` of random batches into a reused buffer, images read as float32 and
  normalised (``x * scale + offset`` per channel) by the native threads, page-cached; images/s and
  images per CPU-second it used, against FFCV's claim of about 1,800 raw 256 px images/s per vCPU
  from RAM (scaled to 256 px by pixel count);
- per route (TensorFlow; torch through Keras 3's torch backend, in a separate process each), a
  ResNet-50 (``keras.applications.ResNet50(weights=None)``) trained on a batch already on the GPU
  (synthetic, no input pipeline), then fed by shardfeed: ``model.fit(ShardSequence)``,
  ``model.fit(ds.batches(...))``, a torch loop reading into pinned buffers copied with
  ``non_blocking=True``, and out of core (the files evicted, the process in a memory cgroup capped
  near a quarter of the dataset; needs root and cgroup v1, skipped otherwise). ``x synthetic`` is
  images/s over the synthetic row's: 0.95 or more means the GPU never waits for its data.

Every feed's first batches are checked against numpy's normalisation of the same images. It
refuses to run without a GPU unless ``--allow-cpu`` (the tests run it that way with ``--model
tiny``). The routes are in benchmarks/gpu_routes.py, the dataset in benchmarks/gpu_data.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shardfeed  # noqa: E402
from gpu_data import PAGE_CACHE, Config, Row, check_batch, read_options, write_images  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FFCV_PER_VCPU = 1800.0  # raw 256 px images/s per vCPU from RAM, FFCV's claim
FFCV_PIXELS = 256 * 256
TARGET = 0.95
ROUTE_BACKENDS = {"tf": "tensorflow", "torch": "torch"}
ROUTE_NAMES = {"tf": "TensorFlow", "torch": "torch (Keras 3)"}  # as gpu_routes names them in its rows
ROUTE_TIMEOUT_S = 900

_PROBE = {
    "tf": "import tensorflow as tf\n"
          "gpus = tf.config.list_physical_devices('GPU')\n"
          "details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}\n"
          "found = details.get('device_name', gpus[0].name) if gpus else None",
    "torch": "import torch\n"
             "found = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None",
}
_PROBE_RUN = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
try:
    exec(sys.argv[1])
except ImportError as e:
    found = "missing: " + str(e)
print(json.dumps(found))
"""


def probe_devices(routes: Sequence[str]) -> Dict[str, Optional[str]]:
    """The GPU each route would use (``tf.config.list_physical_devices("GPU")``,
    ``torch.cuda.is_available()``), each in a separate process so this one imports neither
    framework: ``{route: device name, None (no GPU) or "missing: ..." (not installed)}``."""
    found = {}
    for route in routes:
        done = subprocess.run([sys.executable, "-c", _PROBE_RUN, _PROBE[route]], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"probing the {route} route's device failed: {_last_line(done.stderr)}")
        found[route] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def reader_row(path: str, config: Config) -> Row:
    """``ds.read`` alone: random batches of ``config.batch`` into a reused buffer, page-cached, for
    ``config.reader_seconds``; images/s and images per CPU-second of this process (all threads)."""
    with shardfeed.open(path) as ds:
        ds.preload()
        out = {"image": np.empty((config.batch,) + config.image_shape, np.float32),
               "label": np.empty(config.batch, np.int64)}
        rng = np.random.default_rng(config.seed)
        first = rng.choice(len(ds), config.batch, replace=False)
        ds.read(first, ["image", "label"], out=out, **read_options())
        check_batch("reader alone", 0, out["image"], out["label"], first, config)
        images, cpu0, start = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - start < config.reader_seconds:
            ds.read(rng.integers(0, len(ds), config.batch), ["image", "label"], out=out, **read_options())
            images += config.batch
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    per_core = images / cpu
    ffcv = per_core * config.image_size ** 2 / FFCV_PIXELS / FFCV_PER_VCPU
    return Row("reader alone", "ds.read -> float32, normalised", PAGE_CACHE, images_per_s=images / wall,
               per_core=per_core, cores_busy=cpu / wall, device="CPU",
               note=f"{ffcv:.1f}x FFCV's 1.8 k/vCPU (per core, 256 px equivalent)")



def run_route(route: str, config: Config, path: str, out_of_core: bool,
              timeout_s: float = ROUTE_TIMEOUT_S) -> List[Row]:
    """Runs one route in its own process (its Keras backend) and returns its rows; a row saying how
    it failed when the process did not finish (e.g. killed in the memory cgroup)."""
    env = dict(os.environ, KERAS_BACKEND=ROUTE_BACKENDS[route], TF_CPP_MIN_LOG_LEVEL="3")
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as rows_file:
        command = [sys.executable, os.path.join(HERE, "gpu_routes.py"), route, "--config", config.to_json(),
                   "--dataset", path, "--rows", rows_file.name] + ([] if out_of_core else ["--no-out-of-core"])
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
            failure = None if done.returncode == 0 else \
                f"the {route} process exited with {done.returncode}: {_last_line(done.stderr)}"
        except subprocess.TimeoutExpired:
            failure = f"the {route} process ran past {timeout_s:.0f} s"
        rows = [Row.from_json(line) for line in rows_file.read().splitlines() if line.strip()]
    if failure:
        rows.append(Row(ROUTE_NAMES[route], "(rest of the route)", note=f"failed: {failure}"))
    return rows


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _figure(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def verdict(row: Row) -> str:
    if row.note:
        return row.note
    if row.ratio is None or row.feed.startswith("synthetic"):
        return ""
    return f"{'met' if row.ratio >= TARGET else 'NOT met'} (>= {TARGET})"


def format_table(rows: Sequence[Row]) -> str:
    """The markdown table of the rows."""
    lines = ["| route | feed | data | device | images/s | step ms | x synthetic | images/s per busy core | target |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        per_core = "" if row.per_core is None else f"{row.per_core:,.0f} ({row.cores_busy:.1f} cores busy)"
        lines.append(f"| {row.route} | {row.feed} | {row.data} | {row.device} | {_figure(row.images_per_s, ',.0f')} | "
                     f"{_figure(row.step_ms, '.1f')} | {_figure(row.ratio, '.2f')} | {per_core} | {verdict(row)} |")
    return "\n".join(lines)


def dataset_images(config: Config, dataset_gb: float) -> int:
    """Images in a dataset of ``dataset_gb`` GiB, at least what two rows read."""
    return max(int(dataset_gb * 2**30) // config.image_bytes, 2 * config.samples_per_row)


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)


def parse_options(argv=None):
    """``(args, routes, config, dataset_gb)`` from the command line (exit 2 on a bad option)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 GiB dataset, 5 + 20 steps, 1 s reader row")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (for tests)")
    parser.add_argument("--dataset-gb", type=float, help="dataset size in GiB (default 4, --quick 1)")
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "tiny"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 10, --quick 5)")
    parser.add_argument("--steps", type=int, help="timed steps (default 50, --quick 20)")
    parser.add_argument("--reader-seconds", type=float, help="the reader row's duration (default 3, --quick 1)")
    parser.add_argument("--mixed-precision", action="store_true", help="Keras's mixed_float16 policy")
    parser.add_argument("--routes", default="tf,torch", help="comma-separated: tf, torch")
    parser.add_argument("--no-out-of-core", action="store_true", help="leave out the memory-cgroup rows")
    parser.add_argument("--tmp", help="where to write the dataset (default: the system's temporary directory)")
    args = parser.parse_args(argv)
    routes = [r for r in args.routes.split(",") if r]
    unknown = [r for r in routes if r not in ROUTE_BACKENDS]
    if unknown:
        parser.error(f"unknown route {unknown[0]!r} (tf, torch)")
    quick = {"warmup": 5, "steps": 20, "reader_seconds": 1.0, "dataset_gb": 1.0}
    full = {"warmup": 10, "steps": 50, "reader_seconds": 3.0, "dataset_gb": 4.0}
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else (quick if args.quick else full)[k] for k in full}
    config = Config(model=args.model, image_size=args.image_size, classes=args.classes, batch=args.batch,
                    warmup=chosen["warmup"], steps=chosen["steps"], mixed_precision=args.mixed_precision,
                    reader_seconds=chosen["reader_seconds"])
    if min(config.batch, config.steps, config.image_size, config.classes) < 1 or config.reader_seconds <= 0 \
            or chosen["dataset_gb"] <= 0:
        parser.error("--batch, --steps, --image-size, --classes, --reader-seconds and --dataset-gb must be positive")
    if config.warmup < config.check_steps:
        parser.error(f"--warmup must be at least {config.check_steps} (the first batches are checked while warming up)")
    return args, routes, config, chosen["dataset_gb"]


def main(argv=None) -> int:
    args, routes, config, dataset_gb = parse_options(argv)
    devices = probe_devices(routes)
    rows: List[Row] = []
    for route in list(routes):
        found = devices.get(route)
        if found is not None and found.startswith("missing"):
            rows.append(Row(ROUTE_NAMES[route], "(route)", note=f"skipped: {found}"))
            routes.remove(route)
        elif found is None and not args.allow_cpu:
            print(f"gpu_check: no GPU visible to the {route} route ({ROUTE_BACKENDS[route]}); "
                  f"pass --allow-cpu to run on the CPU anyway", file=sys.stderr)
            return 2

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that a kill removes the dataset too
    root = tempfile.mkdtemp(prefix="shardfeed-gpu-check-", dir=args.tmp)
    try:
        path = os.path.join(root, "images")
        count = dataset_images(config, dataset_gb)
        start = time.perf_counter()
        write_images(path, count, config)
        written = time.perf_counter() - start
        rows.insert(0, reader_row(path, config))
        for route in routes:
            rows.extend(run_route(route, config, path, out_of_core=not args.no_out_of_core))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    print(f"shardfeed GPU check: {config.model}, {config.image_size}x{config.image_size}x3 uint8 images "
          f"read as normalised float32, batch {config.batch}, {config.steps} timed steps after {config.warmup}"
          f"{', mixed_float16' if config.mixed_precision else ''}; dataset {count:,} images "
          f"({count * config.image_bytes / 2**30:.1f} GiB, written in {written:.0f} s); "
          f"{len(os.sched_getaffinity(0))} vCPUs; devices: {devices}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
