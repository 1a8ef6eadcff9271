"""model.fit throughput of a small MLP fed from shards, against fit on in-memory numpy arrays.

One group, four feeds of the same samples (float16[256] features stored, read as float32; int64
labels) into the same model (Dense 128 relu, Dense 10; batch 256; SGD):

- ``numpy``: the baseline, ``model.fit(x, y, batch_size=256, shuffle=True)`` on float32 arrays in
  memory (Keras shuffles them each epoch);
- ``sequence``: ``shardfeed.keras.ShardSequence`` (workers=1);
- ``generator``: ``ds.batches(...)`` with ``steps_per_epoch``;
- ``tf.data``: ``ds.to_tf_dataset(..., epochs=None)`` with ``steps_per_epoch``;
- ``keras-sequence-ceiling`` and ``keras-generator-ceiling``: the same batches (the sampler's
  order), made once from the in-memory float32 arrays, handed out by a ``keras.utils.PyDataset``
  that only indexes a list and by a generator that only iterates it. No loader can be faster
  through that Keras route: they measure what Keras's Python-feed path (``from_generator``, the
  GIL, per-batch structure checks) costs on its own, so the feeds' ``ratio_to_ceiling`` says what
  the loader itself costs.

One round is one ``model.fit(..., epochs=1)`` over the whole dataset (setup included), after one
warm-up epoch that traces the model. ``extra_info`` also has the epoch time measured inside fit
by a callback (setup excluded), ``fit_samples_per_s`` from it, and ``ratio_to_numpy`` (the
baseline's median time over this feed's: 1.0 = as fast as training from RAM). Every run, timed
or not, checks that each feed's first batches are exactly the samples the sampler names, and that
training gives a finite loss.

With ``--benchmark-disable`` (the test suite's default) each feed runs one round on 2048 samples.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
keras = pytest.importorskip("keras", reason="the tensorflow extra is not installed")

import shardfeed  # noqa: E402
from shardfeed import Sampler  # noqa: E402
from shardfeed.keras import ShardSequence  # noqa: E402

FEATURES, CLASSES, BATCH, HIDDEN = 256, 10, 256, 128
TIMED_SAMPLES = 200_000  # 100 MiB stored, 200 MB of float32 for the in-memory baseline
TIMED_ROUNDS = 7
FEEDS = ["numpy", "keras-sequence-ceiling", "keras-generator-ceiling", "sequence", "generator", "tf.data"]
CEILING = {"sequence": "keras-sequence-ceiling", "generator": "keras-generator-ceiling"}
_medians: dict = {}


def _timing_enabled(config) -> bool:
    return not config.getoption("benchmark_disable") or bool(config.getoption("benchmark_enable"))


@pytest.fixture(scope="module")
def fit_data(request, tmp_path_factory):
    n = TIMED_SAMPLES if _timing_enabled(request.config) else 2048
    rng = np.random.default_rng(20240607)
    x = rng.standard_normal((n, FEATURES), dtype=np.float32).astype(np.float16)
    y = rng.integers(0, CLASSES, n)
    path = str(tmp_path_factory.mktemp("fit") / "ds")
    with shardfeed.Writer(path, fields={"x": ("float16", (FEATURES,)), "y": ("int64", ())}) as writer:
        for start in range(0, n, 65536):
            writer.extend({"x": x[start:start + 65536], "y": y[start:start + 65536]})
    with shardfeed.open(path) as ds:
        yield ds, x.astype(np.float32), y


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(HIDDEN, activation="relu"),
                              keras.layers.Dense(CLASSES)])
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds, self.losses = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._started)
        self.losses.append(logs["loss"])


class _InMemoryBatches(keras.utils.PyDataset):
    """Batches made beforehand: ``__getitem__`` only indexes a list."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def _repeat(batches):
    while True:
        yield from batches


def _feed(name, ds, x, y):
    """(fit arguments, the first two batches as (x, y) numpy pairs) for one feed."""
    steps = -(-len(ds) // BATCH)
    read = dict(dtype={"x": "float32"}, seed=1)
    if name == "numpy":
        return dict(x=x, y=y, batch_size=BATCH, shuffle=True), None
    if name.endswith("-ceiling"):
        sampler = Sampler(ds, BATCH, seed=1)
        batches = [(x[i], y[i].astype(np.float32)) for i in map(sampler.indices, range(steps))]
        if name == "keras-sequence-ceiling":
            return dict(x=_InMemoryBatches(batches), shuffle=False), batches[:2]
        return dict(x=_repeat(batches), steps_per_epoch=steps, shuffle=False), batches[:2]
    if name == "sequence":
        seq = ShardSequence(ds, BATCH, "x", "y", **read)
        return dict(x=seq, shuffle=False), [seq[0], seq[1]]
    if name == "generator":
        first = ds.batches(BATCH, inputs="x", targets="y", epochs=1, **read)
        batches = [next(first), next(first)]
        first.close()
        return dict(x=ds.batches(BATCH, inputs="x", targets="y", **read), steps_per_epoch=steps, shuffle=False), batches
    dataset = ds.to_tf_dataset(BATCH, inputs="x", targets="y", epochs=None, **read)
    batches = [tuple(t.numpy() for t in element) for element in dataset.take(2)]
    return dict(x=dataset, steps_per_epoch=steps, shuffle=False), batches


@pytest.mark.benchmark(group="fit-mlp-256x128x10")
@pytest.mark.parametrize("feed", FEEDS)
def test_fit_throughput(benchmark, fit_data, feed):
    ds, x, y = fit_data
    kwargs, first_batches = _feed(feed, ds, x, y)
    correct = True
    if first_batches is not None:  # exactly the samples the sampler names, converted like numpy does
        sampler = Sampler(ds, BATCH, seed=1)
        for step, (bx, by) in enumerate(first_batches):
            indices = sampler.indices(step)
            correct &= bool(np.array_equal(bx, x[indices]) and np.array_equal(by, y[indices].astype(np.float32)))
    model = _model()
    timer = _EpochTimer()
    fit = dict(kwargs, verbose=0, callbacks=[timer], epochs=1)
    rounds = TIMED_ROUNDS if len(ds) == TIMED_SAMPLES else 1
    warmup = 1 if rounds > 1 else 0
    benchmark.pedantic(model.fit, kwargs=fit, rounds=rounds, warmup_rounds=warmup, iterations=1)
    correct &= all(np.isfinite(timer.losses))
    epoch_seconds = statistics.median(timer.seconds[warmup:])
    benchmark.extra_info.update(
        feed=feed, baseline=feed == "numpy", samples=len(ds), batch=BATCH, model=f"{FEATURES}-{HIDDEN}-{CLASSES} MLP",
        epoch_seconds_in_fit=epoch_seconds, fit_samples_per_s=len(ds) / epoch_seconds,
        threads=ds.threads, cpus=len(os.sched_getaffinity(0)), correct=correct)
    _medians[feed] = benchmark.stats.stats.median if benchmark.stats else None
    if feed != "numpy" and _medians.get("numpy") and _medians[feed]:
        benchmark.extra_info["ratio_to_numpy"] = _medians["numpy"] / _medians[feed]
    ceiling = CEILING.get(feed)
    if ceiling and _medians.get(ceiling) and _medians[feed]:
        benchmark.extra_info["ratio_to_ceiling"] = _medians[ceiling] / _medians[feed]
    assert correct, f"{feed}: the batches differ from the sampler's samples, or the loss is not finite"


def interleaved(cycles: int = 9, samples: int = TIMED_SAMPLES) -> None:
    """``python benchmarks/bench_fit.py [cycles [samples]]``: the same feeds, one epoch each in
    turn, ``cycles`` times (the order rotating), so that a shared machine's load hits every feed
    alike; prints each feed's median samples/s (epoch timed inside fit), median ratio to the numpy
    epoch of the same cycle (and to the ceiling epoch of its Keras route), the ratio of every
    cycle, and median CPU time (all threads) per sample."""
    import tempfile

    rng = np.random.default_rng(20240607)
    x16 = rng.standard_normal((samples, FEATURES), dtype=np.float32).astype(np.float16)
    y = rng.integers(0, CLASSES, samples)
    with tempfile.TemporaryDirectory(prefix="shardfeed-fit-") as root:
        path = os.path.join(root, "ds")
        with shardfeed.Writer(path, fields={"x": ("float16", (FEATURES,)), "y": ("int64", ())}) as writer:
            writer.extend({"x": x16, "y": y})
        with shardfeed.open(path) as ds:
            x = x16.astype(np.float32)
            runs = {}
            for feed in FEEDS:
                kwargs, _ = _feed(feed, ds, x, y)
                model, timer = _model(), _EpochTimer()
                model.fit(**dict(kwargs, verbose=0, callbacks=[timer], epochs=1))  # warm-up: tracing
                runs[feed] = (model, timer, kwargs)
            results = {feed: [] for feed in FEEDS}
            for cycle in range(cycles):
                order = FEEDS[cycle % len(FEEDS):] + FEEDS[:cycle % len(FEEDS)]
                for feed in order:
                    model, timer, kwargs = runs[feed]
                    cpu = time.process_time()
                    model.fit(**dict(kwargs, verbose=0, callbacks=[timer], epochs=1))
                    results[feed].append((samples / timer.seconds[-1], (time.process_time() - cpu) / samples))
    print(f"model.fit, {samples:,} samples per epoch, {cycles} interleaved cycles, "
          f"{len(os.sched_getaffinity(0))} CPUs; medians")
    print(f"{'feed':<24} {'samples/s':>10} {'ratio':>6} {'to ceiling':>10} {'CPU us/sample':>14}")
    for feed in FEEDS:
        ratios = [a[0] / b[0] for a, b in zip(results[feed], results["numpy"])]
        to_ceiling = ""
        if feed in CEILING:
            to_ceiling = f"{statistics.median(a[0] / b[0] for a, b in zip(results[feed], results[CEILING[feed]])):.2f}"
        print(f"{feed:<24} {statistics.median(r[0] for r in results[feed]):>10,.0f} {statistics.median(ratios):>6.2f} "
              f"{to_ceiling:>10} {statistics.median(r[1] for r in results[feed]) * 1e6:>14.2f}")
        print(f"{'':<24} per cycle: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    import sys
    interleaved(*(int(a) for a in sys.argv[1:3]))
