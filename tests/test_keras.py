"""Real model.fit calls fed from shards (TensorFlow backend).

A Recorder layer in the test models logs the sample ids ("tag") of every training step into a
model variable, so each test reads back exactly which samples each step saw and compares them
with the Sampler's order computed in numpy; weights are compared bit for bit with models trained
on in-memory numpy arrays in the same order.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
keras = pytest.importorskip("keras", reason="the tensorflow extra is not installed")

import keras_helpers as H  # noqa: E402  (after the backend is chosen above)
import shardfeed  # noqa: E402
from shardfeed import Sampler  # noqa: E402
from shardfeed.keras import BackupAndRestore, ShardSequence  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent

N, BATCH = 500, 64
STEPS = 8  # batches per epoch: ceil(500 / 64)
INPUTS = {"x": "x", "tag": "tag"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keras") / "ds")
    columns = H.write_dataset(path, N)
    with shardfeed.open(path) as ds:
        yield ds, columns


def epoch_order(sampler, epoch):
    return np.concatenate([sampler.batch(epoch, b) for b in range(len(sampler))])


def numpy_inputs(columns, order):
    return {"x": columns["x"][order].astype(np.float32), "tag": columns["tag"][order]}


def assert_saw(model, expected_steps):
    seen = model.get_layer("recorder").seen()
    assert len(seen) == len(expected_steps)
    for step, (got, want) in enumerate(zip(seen, expected_steps)):
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")


def test_fit_small_model_from_shards(data):
    """A linear model learns the dataset's linear target: close to the least-squares solution."""
    ds, columns = data
    train, val = ds.split([0.8, 0.2], seed=1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1), keras.layers.Reshape(())])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    history = model.fit(ShardSequence(train, 32, "x", "target", seed=2), epochs=25, verbose=0, shuffle=False,
                        validation_data=ShardSequence(val, 100, "x", "target", shuffle=False))
    x = columns["x"].astype(np.float64)
    solution = np.linalg.lstsq(np.c_[x, np.ones(N)], columns["target"], rcond=None)[0]
    kernel, bias = model.layers[0].get_weights()
    np.testing.assert_allclose(kernel[:, 0], solution[:-1], atol=0.03)
    np.testing.assert_allclose(bias, solution[-1:], atol=0.03)
    assert history.history["loss"][-1] < 0.01 < history.history["loss"][0]
    assert history.history["val_loss"][-1] < 0.01


def test_training_matches_numpy_arrays_in_the_same_order(data):
    """The same weights, bit for bit, from a ShardSequence, the generator, and model.fit on numpy
    arrays holding the same samples in the same order, over 3 epochs of different orders."""
    ds, columns = data
    sampler = Sampler(ds, BATCH, seed=3)
    reference = H.mlp(6, 3 * STEPS, BATCH)
    losses = []
    for epoch in range(3):
        order = epoch_order(sampler, epoch)
        hist = reference.fit(numpy_inputs(columns, order), columns["target"][order], batch_size=BATCH,
                             shuffle=False, verbose=0)
        losses += hist.history["loss"]
    from_sequence = H.mlp(6, 3 * STEPS, BATCH)
    seq = ShardSequence(ds, BATCH, INPUTS, "target", seed=3)
    hist = from_sequence.fit(seq, epochs=3, verbose=0, shuffle=False)
    H.assert_same_weights(from_sequence, reference)
    assert hist.history["loss"] == losses
    from_generator = H.mlp(6, 3 * STEPS, BATCH)
    from_generator.fit(ds.batches(BATCH, inputs=INPUTS, targets="target", seed=3), steps_per_epoch=STEPS,
                       epochs=3, verbose=0, shuffle=False)
    H.assert_same_weights(from_generator, reference)
    assert_saw(from_generator, [sampler.indices(s) for s in range(3 * STEPS)])


@pytest.mark.parametrize("workers", [1, 2])
def test_every_epoch_sees_every_sample_once_in_a_new_order(data, workers):
    """Exactly-once coverage per epoch, the epoch numbering untouched by Keras's extra
    on_epoch_end and its type-inference __getitem__(0)/(1) calls, with 1 or 2 worker threads."""
    ds, _ = data
    sampler = Sampler(ds, BATCH, seed=11)
    model = H.mlp(6, 4 * STEPS, BATCH)
    seq = ShardSequence(ds, BATCH, INPUTS, "target", seed=11, workers=workers)
    model.fit(seq, epochs=4, verbose=0, shuffle=False)
    assert seq.epoch == 4
    seen = model.get_layer("recorder").seen()
    orders = [np.concatenate(seen[e * STEPS:(e + 1) * STEPS]) for e in range(4)]
    for epoch, order in enumerate(orders):
        np.testing.assert_array_equal(np.sort(order), np.arange(N))
        np.testing.assert_array_equal(order, epoch_order(sampler, epoch))
    assert len({o.tobytes() for o in orders}) == 4


def test_workers_2_trains_like_workers_1(data):
    ds, _ = data
    models = []
    for workers in (1, 2):
        model = H.mlp(6, 2 * STEPS, BATCH)
        model.fit(ShardSequence(ds, BATCH, INPUTS, "target", seed=4, workers=workers, max_queue_size=3),
                  epochs=2, verbose=0, shuffle=False)
        models.append(model)
    H.assert_same_weights(*models)


def test_determinism_by_seed(data):
    ds, _ = data

    def train(seed):
        model = H.mlp(6, 2 * STEPS, BATCH)
        model.fit(ShardSequence(ds, BATCH, INPUTS, "target", seed=seed), epochs=2, verbose=0, shuffle=False)
        return model

    a, b, c = train(21), train(21), train(22)
    H.assert_same_weights(a, b)
    assert not np.array_equal(H.weights(a)[0], H.weights(c)[0])
    seen_a, seen_c = a.get_layer("recorder").seen(), c.get_layer("recorder").seen()
    assert not np.array_equal(np.concatenate(seen_a), np.concatenate(seen_c))


def test_validation_with_a_sequence_restarts_at_batch_0(data):
    """val_loss each epoch equals evaluate() on the validation samples as numpy arrays."""
    ds, columns = data
    train, val = ds.split({"train": 0.8, "val": 0.2}, seed=5).values()
    x_val, y_val = numpy_inputs(columns, val.indices()), columns["target"][val.indices()]
    expected = []

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            expected.append(self.model.evaluate(x_val, y_val, batch_size=32, verbose=0))

    model = H.mlp(6, 3 * 7, BATCH)
    validation = ShardSequence(val, 32, INPUTS, "target", shuffle=False)
    history = model.fit(ShardSequence(train, BATCH, INPUTS, "target", seed=1), validation_data=validation,
                        epochs=3, verbose=0, shuffle=False, callbacks=[Evaluate()])
    np.testing.assert_allclose(history.history["val_loss"], expected, rtol=1e-6)
    assert len(set(history.history["val_loss"])) == 3


def test_named_multi_input_multi_output_model_fed_with_dicts(data):
    ds, columns = data
    keras.utils.set_random_seed(0)

    def build():
        keras.utils.set_random_seed(0)
        pixels = keras.Input((2, 3, 3), name="pixels")
        extra = keras.Input((6,), name="extra")
        joined = keras.layers.Concatenate()([keras.layers.Flatten()(pixels), extra])
        hidden = keras.layers.Dense(16, activation="relu")(joined)
        outputs = {"cls": keras.layers.Dense(10, activation="softmax", name="cls")(hidden),
                   "reg": keras.layers.Reshape((), name="reg")(keras.layers.Dense(1)(hidden))}
        model = keras.Model({"pixels": pixels, "extra": extra}, outputs)
        model.compile(keras.optimizers.SGD(0.01), loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"})
        return model

    options = dict(inputs={"pixels": "image", "extra": "x"}, targets={"cls": "label", "reg": "target"},
                   sample_weights="weight", seed=6, scale={"image": 1 / 255})
    model = build()
    history = model.fit(ShardSequence(ds, BATCH, **options), epochs=2, verbose=0, shuffle=False)
    assert {"cls_loss", "reg_loss", "loss"} <= set(history.history)
    reference = build()
    sampler = Sampler(ds, BATCH, seed=6)
    for epoch in range(2):
        order = epoch_order(sampler, epoch)
        pixels = columns["image"][order].astype(np.float32) * np.float32(1 / 255)
        reference.fit({"pixels": pixels, "extra": columns["x"][order].astype(np.float32)},
                      {"cls": columns["label"][order].astype(np.float32), "reg": columns["target"][order]},
                      sample_weight=columns["weight"][order], batch_size=BATCH, shuffle=False, verbose=0)
    H.assert_same_weights(model, reference)


class Interrupt(keras.callbacks.Callback):
    """Raises after the given number of training steps, like a preempted job."""

    def __init__(self, after):
        super().__init__()
        self.after, self.steps = after, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.after:
            raise KeyboardInterrupt(f"interrupted after {self.after} steps")


def fit_3_epochs(data, callbacks, **kwargs):
    model = H.mlp(6, 3 * STEPS, BATCH, optimizer="adam")
    try:
        model.fit(data, epochs=3, verbose=0, shuffle=False, callbacks=callbacks, **kwargs)
    except KeyboardInterrupt:
        return model, True
    return model, False


@pytest.mark.parametrize("feed", ["sequence", "generator"])
def test_resume_mid_epoch_is_bit_identical(data, tmp_path, feed):
    """Interrupted in epoch 1 (13 steps trained, the last backup after 12), a restarted fit with
    shardfeed's BackupAndRestore ends with the weights and the step-by-step samples of an
    uninterrupted run: nothing replayed, nothing skipped."""
    ds, _ = data
    sampler = Sampler(ds, BATCH, seed=5)

    def feed_data(backup_dir):
        if feed == "sequence":
            seq = ShardSequence(ds, BATCH, INPUTS, "target", seed=5)
            return seq, BackupAndRestore(str(backup_dir), seq, save_freq=3), {}
        backup = BackupAndRestore(str(backup_dir), save_freq=3)
        gen = ds.batches(BATCH, inputs=INPUTS, targets="target", seed=5, start=backup.step)
        return gen, backup, {"steps_per_epoch": STEPS}

    source, backup, kwargs = feed_data(tmp_path / "whole")
    whole, interrupted = fit_3_epochs(source, [backup], **kwargs)
    assert not interrupted and not (tmp_path / "whole").exists()
    assert_saw(whole, [sampler.indices(s) for s in range(3 * STEPS)])

    source, backup, kwargs = feed_data(tmp_path / "backup")
    _, interrupted = fit_3_epochs(source, [backup, Interrupt(13)], **kwargs)
    assert interrupted
    with open(tmp_path / "backup" / "training_metadata.json") as f:
        assert json.load(f) == {"epoch": 1, "batch": 3, "shardfeed_step": 12}

    source, backup, kwargs = feed_data(tmp_path / "backup")
    assert backup.step == 12
    resumed, interrupted = fit_3_epochs(source, [backup], **kwargs)
    assert not interrupted
    H.assert_same_weights(resumed, whole)
    assert_saw(resumed, [sampler.indices(s) for s in range(3 * STEPS)])


def test_arrays_handed_to_keras_are_never_reused(data):
    """Each batch's samples are tagged with their ids and the model logs the tags of every step:
    any reuse of an array Keras still holds shows up as a step that saw another batch. The check
    is shown to work on a generator that does reuse its output array (Keras keeps the first
    batches it peeks at, so step 0 then sees batch 1's samples)."""
    ds, _ = data
    sampler = Sampler(ds, BATCH, seed=8)
    expected = [sampler.indices(s) for s in range(2 * STEPS)]
    feeds = {
        "generator": (ds.batches(BATCH, inputs=INPUTS, targets="target", seed=8, prefetch=4),
                      {"steps_per_epoch": STEPS}),
        "sequence, 2 workers": (ShardSequence(ds, BATCH, INPUTS, "target", seed=8, workers=2), {}),
        "tf.data": (ds.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=8, epochs=None),
                    {"steps_per_epoch": STEPS}),
    }
    for name, (source, kwargs) in feeds.items():
        model = H.mlp(6, 2 * STEPS, BATCH)
        model.fit(source, epochs=2, verbose=0, shuffle=False, **kwargs)
        assert_saw(model, expected)

    def reusing():
        out = None
        for step in range(2 * STEPS):
            indices = sampler.indices(step)
            if out is None or len(indices) != len(out["x"]):
                out = {"x": np.empty((len(indices), 6), np.float32), "tag": np.empty(len(indices), np.float32),
                       "target": np.empty(len(indices), np.float32)}
            batch = ds.read(indices, ["x", "tag", "target"], dtype="float32", out=out)
            yield {"x": batch["x"], "tag": batch["tag"]}, batch["target"]

    model = H.mlp(6, 2 * STEPS, BATCH)
    model.fit(reusing(), steps_per_epoch=STEPS, epochs=2, verbose=0, shuffle=False)
    seen = model.get_layer("recorder").seen()
    np.testing.assert_array_equal(seen[0], expected[1])  # the reuse is caught


@pytest.mark.parametrize("feed", ["generator", "sequence", "sequence, 2 workers", "tf.data"])
def test_batches_wait_until_keras_lets_go(data, allocation, feed, monkeypatch):
    """Every step sees its own batch whether TensorFlow copies the arrays (numpy's own, 16-byte
    aligned) or wraps them without a copy and reads them later (64-byte-aligned views, and batch
    memory, whose blocks are handed out again once TensorFlow has freed them). Small batches are
    read several at a time (``BatchPlan.group``), each a view of the read's array; with batch
    memory, one batch per read, so that every batch begins a block and the blocks handed out
    again can be counted (grouped reads are the other allocations' case)."""
    import shardfeed.loader
    if allocation == "batch-memory":
        monkeypatch.setattr(shardfeed.loader, "GROUP_BYTES", 0)
    addresses = []

    def record(batch):
        addresses.append(batch["x"].ctypes.data)
        return batch

    ds, _ = data
    sampler = Sampler(ds, BATCH, seed=8)
    options = dict(inputs=INPUTS, targets="target", seed=8, transform=record)
    if feed == "generator":
        source, kwargs = ds.batches(BATCH, **options), {"steps_per_epoch": STEPS}
    elif feed == "tf.data":
        source, kwargs = ds.to_tf_dataset(BATCH, epochs=None, **options), {"steps_per_epoch": STEPS}
    else:
        workers = 2 if "2 workers" in feed else 1
        source, kwargs = ShardSequence(ds, BATCH, INPUTS, "target", seed=8, workers=workers, max_queue_size=2,
                                       transform=record), {}
    model = H.mlp(6, 3 * STEPS, BATCH)
    model.fit(source, epochs=3, verbose=0, shuffle=False, **kwargs)
    assert_saw(model, [sampler.indices(s) for s in range(3 * STEPS)])
    if allocation != "batch-memory":
        assert shardfeed.loader.BatchPlan(ds, BATCH, inputs=INPUTS, targets="target").group > 1  # grouped reads tested
    if allocation == "batch-memory":
        assert all(address % 4096 == 0 for address in addresses)
        assert len(set(addresses)) < len(addresses), "no block was handed out again"


def test_private_memory_stays_flat_during_fit(tmp_path):
    """Six epochs of fit over a 24 MiB dataset (1 MiB batches): RssAnon (RSS minus file-backed
    pages) at the end of epochs 2 to 6 stays within a few batches of epoch 2's."""
    path = str(tmp_path / "big")
    n, features = 6144, 1024
    with shardfeed.Writer(path, fields={"x": ("float32", (features,)), "y": ("float32", ())}) as w:
        for start in range(0, n, 1024):
            w.extend({"x": np.ones((1024, features), np.float32), "y": np.zeros(1024, np.float32)})
    readings = []

    class Measure(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            with open("/proc/self/status") as f:
                readings.append(next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:")))

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(4), keras.layers.Dense(1),
                              keras.layers.Reshape(())])
    model.compile("sgd", "mse")
    with shardfeed.open(path) as ds:
        model.fit(ShardSequence(ds, 256, "x", "y"), epochs=6, verbose=0, shuffle=False, callbacks=[Measure()])
    growth = max(readings[1:]) - readings[1]
    assert growth < 12 << 20, [f"{r / 2 ** 20:.1f} MiB" for r in readings]


def test_a_generator_left_to_keras_frees_its_thread_and_batches(data, monkeypatch):
    """TensorFlow keeps every generator model.fit consumed alive (from_generator's state stays
    registered), so nothing closes it: its prefetch thread and batches go after IDLE_S."""
    import threading
    from shardfeed._prefetch import PREFETCH_THREAD_NAME
    from shardfeed.loader import Prefetcher
    ds, _ = data
    monkeypatch.setattr(Prefetcher, "IDLE_S", 0.3)
    before = set(threading.enumerate())
    model = H.mlp(6, STEPS, BATCH)
    model.fit(ds.batches(BATCH, inputs=INPUTS, targets="target", prefetch=3), steps_per_epoch=STEPS, epochs=1,
              verbose=0, shuffle=False)
    deadline = time.monotonic() + 10
    while [t for t in set(threading.enumerate()) - before if t.name == PREFETCH_THREAD_NAME]:
        assert time.monotonic() < deadline, "the prefetch thread outlived its idle timeout"
        time.sleep(0.05)


def test_sequence_api(data):
    ds, columns = data
    seq = ShardSequence(ds.head(100), 30, "x", "target", seed=2)
    assert len(seq) == 4 and seq.epoch == 0
    x, y = seq[3]
    assert x.shape == (10, 6)
    with pytest.raises(IndexError):
        seq[4]
    first = seq[0][1]
    np.testing.assert_array_equal(seq[0][1], first)  # indexing alone stays in the epoch
    seq.on_epoch_end()  # a custom loop's end of epoch (Keras's own calls are told apart: test_routes.py)
    assert seq.epoch == 1 and not np.array_equal(seq[0][1], first)
    seq.set_epoch(0)
    np.testing.assert_array_equal(seq[0][1], first)
    seq.restore(seq.position(2))
    np.testing.assert_array_equal(seq[0][1], columns["target"][Sampler(ds.head(100), 30, seed=2).batch(0, 2)])
    import pickle
    copy = pickle.loads(pickle.dumps(seq))
    np.testing.assert_array_equal(copy[1][0], seq[1][0])
    with pytest.raises(ValueError, match="no batches"):
        ShardSequence(ds.head(10), 32, "x", drop_remainder=True)


SCRIPT = """
import json, multiprocessing, os, sys
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

def main(helpers, path, method):
    multiprocessing.set_start_method(method, force=True)
    import importlib.util
    spec = importlib.util.spec_from_file_location("helpers", helpers)
    H = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(H)
    import shardfeed
    from shardfeed.keras import ShardSequence
    ds = shardfeed.open(path)
    model = H.mlp(6, 16, 64)
    seq = ShardSequence(ds, 64, {"x": "x", "tag": "tag"}, "target", seed=7, workers=2, use_multiprocessing=True)
    model.fit(seq, epochs=2, verbose=0, shuffle=False)
    seen = model.get_layer("recorder").seen()
    print(json.dumps({"start_method": multiprocessing.get_start_method(),
                      "seen": [s.tolist() for s in seen]}))

if __name__ == "__main__":
    main(*sys.argv[1:])
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_use_multiprocessing(data, tmp_path, method):
    """workers=2, use_multiprocessing=True under each start method (Python 3.14 makes forkserver
    the default on Linux): the worker processes get the sequence (pickled by path, or forked) and
    every step sees exactly the batch the sampler says, epoch after epoch."""
    ds, _ = data
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), str(HERE / "keras_helpers.py"), ds.path, method],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["start_method"] == method
    sampler = Sampler(ds, BATCH, seed=7)
    assert len(report["seen"]) == 2 * STEPS
    for step, got in enumerate(report["seen"]):
        np.testing.assert_array_equal(got, sampler.indices(step), err_msg=f"step {step}")
