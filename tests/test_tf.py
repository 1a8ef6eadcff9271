"""ds.to_tf_dataset: whole batches with an exact element_spec, the same batches as the generator,
usable outside Keras, in model.fit, and in tf.distribute input pipelines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
keras = pytest.importorskip("keras", reason="the tensorflow extra is not installed")

import keras_helpers as H  # noqa: E402  (after the backend is chosen above)
import shardfeed  # noqa: E402
from shardfeed import Sampler  # noqa: E402


N = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tf") / "ds")
    columns = H.write_dataset(path, N)
    with shardfeed.open(path) as ds:
        yield ds, columns


def spec(shape, dtype):
    return tf.TensorSpec(shape, dtype)


def same_structure(a, b):
    tf.nest.assert_same_structure(a, b)
    for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
        y = np.asarray(y)
        assert x.dtype.as_numpy_dtype == y.dtype
        np.testing.assert_array_equal(x.numpy(), y)


def test_element_spec_and_batches_equal_the_generators(data):
    ds, _ = data
    options = dict(inputs={"pixels": "image", "extra": "x"}, targets=["label", "target"], sample_weights="weight",
                   seed=3, epochs=2, dtype={"image": "float32", "x": "float32", "target": "float32",
                                            "weight": "float32"})
    dataset = ds.to_tf_dataset(64, **options)
    assert dataset.element_spec == (
        {"pixels": spec((None, 2, 3, 3), tf.float32), "extra": spec((None, 6), tf.float32)},
        (spec((None,), tf.int64), spec((None,), tf.float32)),
        spec((None,), tf.float32))
    expected = list(ds.batches(64, **options))
    got = list(dataset)
    assert len(got) == len(expected) == 10
    for a, b in zip(got, expected):
        same_structure(a, b)
    dropped = ds.to_tf_dataset(64, inputs="x", targets="id", epochs=1, drop_remainder=True, dtype=None)
    assert dropped.element_spec == (spec((64, 6), tf.float16), spec((64,), tf.int64))
    # One epoch per iteration, the next one each iteration: a length tf.data cannot know ahead (told
    # one, Keras would also make an iteration at the end of every epoch and drop it).
    assert dropped.cardinality().numpy() == tf.data.UNKNOWN_CARDINALITY
    assert len(list(dropped)) == 4


def test_forever_resume_and_a_plain_loop(data):
    ds, _ = data
    options = dict(inputs="x", targets="id", seed=4, dtype=None)
    infinite = ds.to_tf_dataset(50, epochs=None, **options)
    assert infinite.cardinality().numpy() == tf.data.INFINITE_CARDINALITY
    generator = ds.batches(50, **options)
    for got, want in zip(infinite.take(15), (next(generator) for _ in range(15))):
        same_structure(got, want)
    generator.close()
    sampler = Sampler(ds, 50, seed=4)
    resumed = ds.to_tf_dataset(50, start=sampler.position(8), epochs=3, **options)
    ids = [y.numpy() for _, y in resumed]
    assert len(ids) == 3 * 6 - 8
    for step, got in enumerate(ids, start=8):
        np.testing.assert_array_equal(got, sampler.indices(step))


def test_variable_length_fields(tmp_path):
    rows = [np.arange(k, dtype=np.int32) + 10 * k for k in (3, 0, 7, 2, 5)]
    path = str(tmp_path / "var")
    with shardfeed.Writer(path, fields={"tokens": ("int32", (None,)), "y": ("float32", ())}) as w:
        w.extend({"tokens": rows, "y": np.arange(5, dtype=np.float32)})
    ds = shardfeed.open(path)
    padded = ds.to_tf_dataset(2, inputs="tokens", targets="y", shuffle=False, epochs=1, dtype=None, pad_value=-1)
    assert padded.element_spec == (spec((None, None), tf.int32), spec((None,), tf.float32))
    batches = [x.numpy() for x, _ in padded]
    assert [b.shape for b in batches] == [(2, 3), (2, 7), (1, 5)]  # each batch padded to its longest row
    np.testing.assert_array_equal(batches[0], [[30, 31, 32], [-1, -1, -1]])
    np.testing.assert_array_equal(batches[1], [np.arange(70, 77), [20, 21] + [-1] * 5])
    np.testing.assert_array_equal(batches[2], [np.arange(50, 55)])
    fixed = ds.to_tf_dataset(2, inputs="tokens", targets="y", shuffle=False, epochs=1, dtype=None, maxlen=4)
    assert fixed.element_spec[0] == spec((None, 4), tf.int32)
    first = next(iter(fixed))[0].numpy()
    np.testing.assert_array_equal(first, [[30, 31, 32, 0], [0, 0, 0, 0]])
    ds.close()


def test_transforms_and_output_signature(data):
    ds, columns = data

    def transform(batch):
        return {"sum": batch["x"].sum(axis=1, keepdims=True), "id": batch["id"]}

    dataset = ds.to_tf_dataset(32, inputs="sum", targets="id", transform=transform, fields=["x", "id"],
                               shuffle=False, epochs=1, dtype={"x": "float32"})
    assert dataset.element_spec == (spec((None, 1), tf.float32), spec((None,), tf.int64))
    x, y = next(iter(dataset))
    np.testing.assert_allclose(x.numpy()[:, 0], columns["x"][:32].astype(np.float32).sum(1), rtol=1e-6)
    explicit = ds.to_tf_dataset(32, inputs="sum", targets="id", transform=transform, fields=["x", "id"],
                                shuffle=False, epochs=1, dtype={"x": "float32"},
                                output_signature=(spec((None, None), tf.float32), spec((None,), tf.int64)))
    assert explicit.element_spec[0].shape.as_list() == [None, None]
    wrong = ds.to_tf_dataset(32, inputs="sum", targets="id", transform=transform, fields=["x", "id"],
                             shuffle=False, epochs=1, dtype={"x": "float32"},
                             output_signature=(spec((None, 1), tf.float64), spec((None,), tf.int64)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="output signature says float64"):
        list(wrong)


def test_fit_on_the_tf_dataset_trains_like_the_generator(data):
    ds, _ = data
    options = dict(inputs={"x": "x", "tag": "tag"}, targets="target", seed=6)
    models = []
    for source in (ds.to_tf_dataset(64, epochs=None, **options), ds.batches(64, **options)):
        model = H.mlp(6, 15, 64)
        model.fit(source, steps_per_epoch=5, epochs=3, verbose=0, shuffle=False)
        models.append(model)
    H.assert_same_weights(*models)
    sampler = Sampler(ds, 64, seed=6)
    seen = models[0].get_layer("recorder").seen()
    for step in range(15):
        np.testing.assert_array_equal(seen[step], sampler.indices(step))


DISTRIBUTE = """
import json, os, sys
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import shardfeed

ds = shardfeed.open(sys.argv[1])
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
report = {"replicas": strategy.num_replicas_in_sync}

# A global batch of 64 split across the replicas.
dataset = ds.to_tf_dataset(64, inputs="x", targets="id", seed=2, epochs=1, drop_remainder=True, dtype=None)
steps = []
for x, y in strategy.experimental_distribute_dataset(dataset):
    parts = strategy.experimental_local_results(y)
    steps.append([p.numpy().tolist() for p in parts])
report["split"] = steps

# One input pipeline per worker (one here), each reading its own shard of every epoch.
def per_pipeline(context):
    report["pipelines"] = context.num_input_pipelines
    view = ds.shard(context.input_pipeline_id, context.num_input_pipelines)
    return view.to_tf_dataset(context.get_per_replica_batch_size(64), inputs="x", targets="id", seed=2,
                              epochs=1, drop_remainder=True, dtype=None)
pipelines = strategy.distribute_datasets_from_function(per_pipeline)
report["from_function"] = [[p.numpy().tolist() for p in strategy.experimental_local_results(y)]
                           for _, y in pipelines]

# model.fit under the strategy.
with strategy.scope():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1), keras.layers.Reshape(())])
    model.compile(keras.optimizers.SGD(0.05), "mse")
history = model.fit(ds.to_tf_dataset(64, inputs="x", targets="target", seed=2, drop_remainder=True, epochs=None),
                    steps_per_epoch=4, epochs=3, verbose=0, shuffle=False)
report["loss"] = history.history["loss"]
print(json.dumps(report))
"""


def test_tf_distribute(data, tmp_path):
    """MirroredStrategy over two logical CPUs (needs a fresh process to configure the devices)."""
    ds, _ = data
    script = tmp_path / "distribute.py"
    script.write_text(DISTRIBUTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), ds.path], capture_output=True, text=True, timeout=300,
                          env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    sampler = Sampler(ds, 64, seed=2, drop_remainder=True)
    assert len(report["split"]) == len(sampler) == 4
    for step, parts in enumerate(report["split"]):
        assert [len(p) for p in parts] == [32, 32]
        np.testing.assert_array_equal(parts[0] + parts[1], sampler.indices(step))
    # One worker, so one input pipeline (its shard is everything); its replicas take consecutive batches.
    assert report["pipelines"] == 1
    per_replica = Sampler(ds, 32, seed=2, drop_remainder=True)
    assert len(report["from_function"]) == len(per_replica) // 2
    for step, parts in enumerate(report["from_function"]):
        for replica, part in enumerate(parts):
            np.testing.assert_array_equal(part, per_replica.indices(2 * step + replica))
    assert report["loss"][-1] < report["loss"][0]


CHECKPOINT = """
import json, os, signal, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
import shardfeed

path, prefix, phase = sys.argv[1], sys.argv[2], sys.argv[3]
ds = shardfeed.open(path)
options = dict(inputs="x", targets="id", seed=7, dtype=None)
datasets = {"finite": ds.to_tf_dataset(50, **options),  # one epoch per iteration
            "two_epochs": ds.to_tf_dataset(50, epochs=2, **options),
            "endless": ds.to_tf_dataset(50, epochs=None, **options)}
ids = lambda batches: [y.numpy().tolist() for _, y in batches]  # noqa: E731
if phase == "save":
    # finite: a whole first pass, then 2 batches into the second (data epoch 1); two_epochs: 8
    # batches into its first pass (epoch 1, batch 2); endless: 9 batches. Then the checkpoints,
    # written while the iterators are mid-pass, and a SIGKILL (nothing is closed or flushed).
    read = {"finite": ids(datasets["finite"])}
    iterators = {name: iter(dataset) for name, dataset in datasets.items()}
    for name, count in (("finite", 2), ("two_epochs", 8), ("endless", 9)):
        read[name + "_before"] = ids(next(iterators[name]) for _ in range(count))
        tf.train.Checkpoint(iterator=iterators[name]).write(f"{prefix}-{name}")
    print(json.dumps(read), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
# A fresh process: the same datasets, each a new iterator restored from its checkpoint.
read = {}
for name, dataset in datasets.items():
    iterator = iter(dataset)
    tf.train.Checkpoint(iterator=iterator).read(f"{prefix}-{name}").assert_consumed()
    if name == "endless":
        read[name] = ids(next(iterator) for _ in range(5))
    else:
        read[name] = ids(iterator)  # the rest of the restored pass
        read[name + "_next_pass"] = ids(dataset)  # a new iteration: the pass after it
    # Released before exit: TensorFlow 2.21 can hang at interpreter exit while a live iterator's
    # prefetch thread runs a numpy_function (also with no shardfeed in the pipeline).
    del iterator
print(json.dumps(read), flush=True)
"""


def test_an_iterator_checkpoint_restores_in_a_fresh_process(data, tmp_path):
    """``tf.train.Checkpoint(iterator=it)`` of a to_tf_dataset iterator mid-pass, the process
    SIGKILLed, restored in a fresh process: the restored iterator continues with the very next
    batch of the Sampler's order (in the pass it was in, also a later pass than the first), and
    the dataset's next iteration reads the following epoch(s)."""
    ds, _ = data
    script = tmp_path / "checkpoint.py"
    script.write_text(CHECKPOINT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    prefix = str(tmp_path / "ckpt")

    def run(phase):
        return subprocess.run([sys.executable, str(script), ds.path, prefix, phase], capture_output=True, text=True,
                              timeout=300, env=env, cwd=str(tmp_path))

    saved = run("save")
    assert saved.returncode == -9, saved.stderr[-3000:]
    before = json.loads(saved.stdout.strip().splitlines()[-1])
    restored = run("restore")
    assert restored.returncode == 0, restored.stderr[-3000:]
    after = json.loads(restored.stdout.strip().splitlines()[-1])
    sampler = Sampler(ds, 50, seed=7)
    n = len(sampler)
    steps = lambda lo, hi: [sampler.indices(s).tolist() for s in range(lo, hi)]  # noqa: E731
    assert before["finite"] == steps(0, n)
    assert before["finite_before"] == steps(n, n + 2)
    assert after["finite"] == steps(n + 2, 2 * n)
    assert after["finite_next_pass"] == steps(2 * n, 3 * n)
    assert before["two_epochs_before"] == steps(0, 8)
    assert after["two_epochs"] == steps(8, 2 * n)
    assert after["two_epochs_next_pass"] == steps(2 * n, 4 * n)
    assert before["endless_before"] == steps(0, 9)
    assert after["endless"] == steps(9, 14)
