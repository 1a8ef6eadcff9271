"""The training routes of the GPU check (benchmarks/gpu_check.py): one Keras model trained from a
shardfeed dataset, against the same model on a batch already on the device.

Each route runs in a process whose Keras backend is its own (``KERAS_BACKEND`` is read when Keras is
first imported): :func:`tf_rows` needs ``tensorflow``, :func:`torch_rows` needs ``torch``. The
command starts one process per route (``python benchmarks/gpu_routes.py tf|torch ...``); tests call
the functions directly. Every row is handed to ``emit`` as soon as it is measured.

What is timed, per route, ``config.steps`` steps after ``config.warmup`` untimed ones (the first
traces the model), with the device synchronised at both ends of the timed steps only:

- ``synthetic``: the model's own ``train_step`` (what ``fit`` runs each step) on one batch of
  random tensors created on the device: no input pipeline at all. On TensorFlow it is wrapped in
  ``tf.function`` as ``fit`` wraps it; the model is compiled with ``jit_compile=False`` so the two
  run the same graph (on torch, ``train_step`` runs eagerly in both).
- ``fit(ShardSequence)`` / ``fit(ds.batches)``: ``model.fit`` fed by shardfeed, images read as float32
  and normalised by the reader (``x * scale + offset`` per channel), page-cached (the dataset is
  preloaded first).
- torch loop: a Python loop calling ``train_step`` on batches that a background thread reads with
  ``ds.read(..., out=)`` into page-locked host buffers, copied with ``non_blocking=True`` on a
  stream of their own (:class:`PinnedFeed`). ``cudnn.benchmark`` is on for every torch row.
- out-of-core: a fed row again after the dataset's files were evicted from the page cache, inside a
  cgroup v1 memory cgroup capped at a quarter of the dataset plus room for the process's new
  allocations (skipped with the reason where no cgroup can be made: not root, no v1 controller).

The first ``config.check_steps`` batches of every feed are compared, bit for bit, with numpy's
normalisation of the same images (:func:`gpu_data.check_batch`): a feed that hands the model
anything else fails the run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import sys
import threading
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import regimes  # noqa: E402
import shardfeed  # noqa: E402
from gpu_data import PAGE_CACHE, Config, Row, check_batch, dataset_files, read_options  # noqa: E402
from shardfeed.keras import ShardSequence  # noqa: E402

SYNTHETIC = "synthetic batch on the device"
# Room in the out-of-core cgroup for what the process allocates while inside (batches queued by
# Keras, the framework's host buffers): on top of a quarter of the dataset, plus 16 batches.
CGROUP_HEADROOM_BYTES = 1 << 30
Emit = Callable[[Row], None]


def build_model(config: Config):
    """The model of every row: ``keras.applications.ResNet50(weights=None)`` (25.6 M parameters,
    about 4 GFLOPs per 224 px image forward), or a single small convolution for tests."""
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    if config.model == "resnet50":
        model = keras.applications.ResNet50(weights=None, input_shape=config.image_shape, classes=config.classes)
    elif config.model == "tiny":
        model = keras.Sequential([keras.Input(config.image_shape), keras.layers.Conv2D(4, 3, strides=4),
                                  keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(config.classes, activation="softmax", dtype="float32")])
    else:
        raise ValueError(f"unknown model {config.model!r} (resnet50 or tiny)")
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(),
                  jit_compile=False)
    return model


def _sync(model) -> None:
    """Waits for every step queued so far: the last weight's update is the last op queued (the
    device runs one stream in order); on CUDA, the device is synchronised outright."""
    if keras.backend.backend() == "torch":
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            return
    keras.ops.convert_to_numpy(model.trainable_weights[-1].value)


def time_loop(step: Callable[[int], None], model, config: Config) -> float:
    """Seconds of ``config.steps`` calls of ``step(i)`` after ``config.warmup`` untimed ones."""
    for i in range(config.warmup):
        step(i)
    _sync(model)
    start = time.perf_counter()
    for i in range(config.warmup, config.warmup + config.steps):
        step(i)
    _sync(model)
    return time.perf_counter() - start


class StepClock(keras.callbacks.Callback):
    """Times ``model.fit``'s steps ``warmup`` to ``warmup + steps - 1``, syncing at both ends."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.start = self.seconds = None

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.config.warmup - 1:
            _sync(self.model)
            self.start = time.perf_counter()
        elif batch == self.config.warmup + self.config.steps - 1:
            _sync(self.model)
            self.seconds = time.perf_counter() - self.start


def timed_view(ds, config: Config):
    """A view of ``ds`` whose one epoch is exactly the ``warmup + steps`` batches timed (a Keras epoch
    is a whole pass over a feed: shardfeed refuses a ``steps_per_epoch`` that cuts one), its samples
    spread evenly over the whole dataset so that reads from disk are as scattered as a full epoch's."""
    wanted = config.batch * (config.warmup + config.steps)
    if wanted > len(ds):
        raise ValueError(f"the dataset has {len(ds)} images, fewer than the {wanted} timed")
    return ds.subset(np.linspace(0, len(ds) - 1, wanted).astype(np.int64))


def fit_seconds(model, feed, config: Config) -> float:
    clock = StepClock(config)
    generator = not isinstance(feed, ShardSequence)  # a generator needs its epoch's length
    model.fit(feed, epochs=1, steps_per_epoch=config.warmup + config.steps if generator else None, shuffle=False,
              verbose=0, callbacks=[clock])
    if clock.seconds is None:
        raise RuntimeError(f"fit stopped before step {config.warmup + config.steps} (too few samples?)")
    return clock.seconds


class CheckedSequence(ShardSequence):
    """``ShardSequence`` whose first ``config.check_steps`` batches are checked against numpy's."""

    def __init__(self, ds, config: Config, feed: str):
        super().__init__(timed_view(ds, config), config.batch, inputs="image", targets="label", seed=config.seed,
                         drop_remainder=True, **read_options())
        self.config, self.feed = config, feed

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        if self.epoch == 0 and index < self.config.check_steps:
            check_batch(self.feed, index, x, y, self.plan.sampler.indices(index), self.config)
        return x, y


def checked_batches(ds, config: Config, feed: str):
    """``ds.batches(...)``, the generator for ``model.fit``, its first batches checked."""
    ds = timed_view(ds, config)
    sampler = shardfeed.Sampler(ds, config.batch, seed=config.seed, drop_remainder=True)
    batches = ds.batches(config.batch, inputs="image", targets="label", seed=config.seed, drop_remainder=True,
                         **read_options())
    try:
        for step, (x, y) in enumerate(batches):
            if step < config.check_steps:
                check_batch(feed, step, x, y, sampler.indices(step), config)
            yield x, y
    finally:
        batches.close()


class PinnedFeed:
    """Batches read by ``ds.read(..., out=)`` on a background thread into ``depth`` page-locked
    host buffers, then copied to the device with ``non_blocking=True`` on a stream of their own:
    the copy of a batch runs while the previous step computes, and the reads of the next batches
    overlap both. The step's stream waits for the copy (an event), and a buffer is refilled only
    after its copy completed (the same event). Without CUDA, buffers are ordinary memory and
    :meth:`next` returns copies (``clone``), so a refill never writes under a step."""

    def __init__(self, ds, config: Config, device, depth: int = 3):
        import torch
        self.torch, self.ds, self.device = torch, ds, device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.sampler = shardfeed.Sampler(ds, config.batch, seed=config.seed, drop_remainder=True)
        self.slots = [(torch.empty((config.batch,) + config.image_shape, dtype=torch.float32, pin_memory=self.cuda),
                       torch.empty(config.batch, dtype=torch.int64, pin_memory=self.cuda)) for _ in range(depth)]
        self.free: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        for slot in range(depth):
            self.free.put((slot, None))
        self.stopping = False
        self.thread = threading.Thread(target=self._fill, name="gpu-check-pinned-feed", daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        try:
            for step in itertools.count():
                slot, copied = self.free.get()
                if slot is None or self.stopping:
                    return
                if copied is not None:
                    copied.synchronize()
                x, y = self.slots[slot]
                self.ds.read(self.sampler.indices(step), ["image", "label"],
                             out={"image": x.numpy(), "label": y.numpy()}, **read_options())
                self.ready.put((slot, step))
        except BaseException as exc:  # handed to the consumer
            self.ready.put((None, exc))

    def next(self):
        """``(x, y, indices)`` of the next batch, on the device."""
        slot, step = self.ready.get()
        if slot is None:
            raise step
        x, y = self.slots[slot]
        if self.cuda:
            cuda = self.torch.cuda
            with cuda.stream(self.copy_stream):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                copied = cuda.Event()
                copied.record(self.copy_stream)
            compute = cuda.current_stream(self.device)
            compute.wait_event(copied)
            x.record_stream(compute)  # allocated on the copy stream, used (and freed) on this one
            y.record_stream(compute)
        else:
            x, y, copied = x.clone(), y.clone(), None
        self.free.put((slot, copied))
        return x, y, self.sampler.indices(step)

    def close(self) -> None:
        self.stopping = True
        self.free.put((None, None))
        self.thread.join()


def out_of_core(path: str, config: Config, route: str, feed: str, device: str, base_seconds: float,
                run: Callable[[object], float]) -> Row:
    """``run(ds)`` (seconds of its timed steps) on a freshly opened dataset, after evicting its files,
    inside a memory cgroup; a skipped row when no cgroup can be made."""
    why = regimes.memory_cgroup_unavailable()
    if why:
        return Row(route, feed, "out-of-core", device=device, note=f"skipped: {why}")
    files = list(dataset_files(path))
    dataset_bytes = sum(os.path.getsize(f) for f in files)
    limit_bytes = dataset_bytes // 4 + CGROUP_HEADROOM_BYTES + 16 * config.batch * config.image_bytes * 4
    regimes.evict(files)
    limit = regimes.MemoryLimit(limit_bytes)
    try:
        with limit:
            with shardfeed.open(path) as ds:
                seconds = run(ds)
        hits = limit.failcnt()
    finally:
        limit.remove()
    data = (f"out-of-core: evicted, cgroup {limit_bytes / 2**30:.1f} GiB for {dataset_bytes / 2**30:.1f} GiB, "
            f"{hits} limit hits")
    return _row(route, feed, data, seconds, base_seconds, config, device)


def _row(route: str, feed: str, data: str, seconds: float, base_seconds: Optional[float], config: Config,
         device: str) -> Row:
    return Row(route, feed, data, images_per_s=config.steps * config.batch / seconds,
               step_ms=1000 * seconds / config.steps,
               ratio=None if base_seconds is None else base_seconds / seconds, device=device)


def _enough(ds, config: Config) -> None:
    if len(ds) < config.samples_per_row:
        raise ValueError(f"the dataset has {len(ds)} images; a row reads {config.samples_per_row}")


def tf_rows(config: Config, path: str, emit: Emit, out_of_core_row: bool = True) -> None:
    """The TensorFlow route: synthetic, ``fit(ShardSequence)``, ``fit(ds.batches)``, out-of-core."""
    import tensorflow as tf
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"the TensorFlow route needs KERAS_BACKEND=tensorflow, not {keras.backend.backend()}")
    route = "TensorFlow"
    gpus = tf.config.list_physical_devices("GPU")
    device = (f"GPU: {tf.config.experimental.get_device_details(gpus[0]).get('device_name', gpus[0].name)}"
              if gpus else "CPU")
    model = build_model(config)
    with tf.device("/GPU:0" if gpus else "/CPU:0"):
        x = tf.random.uniform((config.batch,) + config.image_shape)
        y = tf.random.uniform((config.batch,), 0, config.classes, dtype=tf.int64)
    model.train_on_batch(x, y)  # builds the optimizer's variables outside the tf.function
    step = tf.function(model.train_step)
    base = time_loop(lambda i: step((x, y)), model, config)
    emit(_row(route, SYNTHETIC, "-", base, base, config, device))

    def sequence(ds) -> float:
        return fit_seconds(model, CheckedSequence(ds, config, "fit(ShardSequence)"), config)

    with shardfeed.open(path) as ds:
        _enough(ds, config)
        ds.preload()
        emit(_row(route, "fit(ShardSequence)", PAGE_CACHE, sequence(ds), base, config, device))
        batches = checked_batches(ds, config, "fit(ds.batches)")
        try:
            emit(_row(route, "fit(ds.batches)", PAGE_CACHE, fit_seconds(model, batches, config), base, config, device))
        finally:
            batches.close()
    if out_of_core_row:
        emit(out_of_core(path, config, route, "fit(ShardSequence)", device, base, sequence))


def torch_rows(config: Config, path: str, emit: Emit, out_of_core_row: bool = True) -> None:
    """The torch route (Keras 3 on its torch backend): synthetic, ``fit(ShardSequence)``, a torch
    loop fed through pinned buffers, and that loop out-of-core."""
    import torch
    if keras.backend.backend() != "torch":
        raise RuntimeError(f"the torch route needs KERAS_BACKEND=torch, not {keras.backend.backend()}")
    route = "torch (Keras 3)"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"GPU: {torch.cuda.get_device_name(0)}" if device.type == "cuda" else "CPU"
    torch.backends.cudnn.benchmark = True  # as torch users training convolutions set it (every row alike)
    model = build_model(config)
    x = torch.rand((config.batch,) + config.image_shape, device=device)
    y = torch.randint(0, config.classes, (config.batch,), device=device)
    model.train_on_batch(x, y)
    base = time_loop(lambda i: model.train_step((x, y)), model, config)
    emit(_row(route, SYNTHETIC, "-", base, base, config, name))
    loop = "loop: ds.read -> pinned -> non_blocking copy"

    def pinned(ds) -> float:
        feed = PinnedFeed(ds, config, device)

        def step(i: int) -> None:
            bx, by, indices = feed.next()
            if i < config.check_steps:
                check_batch(loop, i, bx, by, indices, config)
            model.train_step((bx, by))
        try:
            return time_loop(step, model, config)
        finally:
            feed.close()

    with shardfeed.open(path) as ds:
        _enough(ds, config)
        ds.preload()
        seconds = fit_seconds(model, CheckedSequence(ds, config, "fit(ShardSequence)"), config)
        emit(_row(route, "fit(ShardSequence)", PAGE_CACHE, seconds, base, config, name))
        emit(_row(route, loop, PAGE_CACHE, pinned(ds), base, config, name))
    if out_of_core_row:
        emit(out_of_core(path, config, route, loop, name, base, pinned))


ROUTES = {"tf": ("tensorflow", tf_rows), "torch": ("torch", torch_rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="One route of benchmarks/gpu_check.py (run by it).")
    parser.add_argument("route", choices=sorted(ROUTES))
    parser.add_argument("--config", required=True, help="Config as JSON")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--rows", required=True, help="file to append the rows to, one JSON a line")
    parser.add_argument("--no-out-of-core", action="store_true")
    args = parser.parse_args(argv)
    backend, rows = ROUTES[args.route]
    if keras.backend.backend() != backend:
        print(f"gpu_routes: route {args.route} needs KERAS_BACKEND={backend}", file=sys.stderr)
        return 2

    def emit(row: Row) -> None:
        with open(args.rows, "a") as f:
            f.write(row.to_json() + "\n")

    rows(Config.from_json(args.config), args.dataset, emit, out_of_core_row=not args.no_out_of_core)
    return 0


if __name__ == "__main__":
    sys.exit(main())
