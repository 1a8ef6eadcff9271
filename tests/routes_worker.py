"""One Keras backend's side of tests/test_routes.py, run in its own process (KERAS_BACKEND is set
before Keras is imported): trains a small model on every route and writes, for each route, the
sample ids the model itself saw at every training and evaluation step, or the error the route
was refused with.

    python routes_worker.py BACKEND DATASET OUT.json [resume-run BACKUP_DIR LOG KILL_AT]

The ids are recorded from inside the model: a ``Recorder`` layer on the ``tag`` input (the
sample's id as float32) appends the concrete values it is called with (the models run
eagerly, so every step calls it with real arrays; the symbolic calls Keras makes to build the
model record nothing). A callback marks where each Keras epoch begins.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import traceback
import warnings

BACKEND = sys.argv[1]
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
warnings.simplefilter("ignore")  # JAX's fork warning, Keras's notes: this process reports by its output

import numpy as np  # noqa: E402

if BACKEND == "tensorflow":
    import tensorflow as tf  # noqa: E402
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import shardfeed  # noqa: E402
from shardfeed.keras import BackupAndRestore, ShardSequence  # noqa: E402

BATCH, SEED, FEATURES = 32, 11, 4
INPUTS = {"x": "x", "tag": "tag"}
LOG: list = []  # ("epoch", e) | ("train", ids) | ("eval", ids)
LOCK = threading.Lock()


class Recorder(keras.layers.Layer):
    def call(self, tags, training=None):
        try:
            ids = np.asarray(keras.ops.convert_to_numpy(tags)).reshape(-1)
        except Exception:  # a symbolic call (building the model): nothing to record
            return tags
        with LOCK:
            LOG.append(("train" if training else "eval", ids.astype(np.int64).tolist()))
        return tags


class EpochMarks(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        LOG.append(("epoch", epoch))


def model(named_output: bool = False, steps_per_execution: int = 1, distribution_scope=None):
    keras.utils.set_random_seed(0)
    x = keras.Input((FEATURES,), name="x")
    tag = keras.Input((), name="tag")
    out = keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(x))
    out = keras.layers.Reshape(())(out)
    out = out + 0.0 * Recorder(name="recorder")(tag)
    outputs = {"out": out} if named_output else out
    m = keras.Model({"x": x, "tag": tag}, outputs)
    m.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", run_eagerly=True,
              steps_per_execution=steps_per_execution)
    return m


ROUTE_TIMEOUT_S = 240


def _timeout(signum, frame):
    raise TimeoutError(f"the route ran for more than {ROUTE_TIMEOUT_S} s (an endless epoch?)")


def run(name, fn, results):
    LOG.clear()
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(ROUTE_TIMEOUT_S)
    try:
        extra = fn() or {}
        results[name] = {"log": list(LOG), **extra}
    except Exception as exc:  # a refusal, or a failure the parent reports
        results[name] = {"log": list(LOG), "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-3000:]}
    finally:
        signal.alarm(0)


def sequence(view, **kwargs):
    return ShardSequence(view, BATCH, INPUTS, kwargs.pop("targets", "target"), seed=SEED, **kwargs)


def fit(data, epochs=3, m=None, **kwargs):
    m = m or model()
    kwargs.setdefault("shuffle", False)
    m.fit(data, epochs=epochs, verbose=0, callbacks=[EpochMarks()] + kwargs.pop("callbacks", []), **kwargs)
    return m


def routes(ds, results):
    parts = ds.split({"train": 300, "val": 60}, seed=1)
    train, val = parts["train"], parts["val"]
    per_epoch = -(-len(train) // BATCH)

    run("seq_workers1", lambda: fit(sequence(train)) and None, results)
    run("seq_workers2", lambda: {"weights": [w.tolist() for w in fit(sequence(train, workers=2)).get_weights()]},
        results)
    run("seq_workers4", lambda: fit(sequence(train, workers=4)) and None, results)
    for method in ("fork", "spawn"):
        def processes(method=method):
            multiprocessing.set_start_method(method, force=True)
            try:
                fit(sequence(train, workers=2, use_multiprocessing=True))
            finally:
                multiprocessing.set_start_method("fork", force=True)
        run(f"seq_processes_{method}", processes, results)
    run("seq_validation", lambda: fit(sequence(train), validation_data=sequence(val, shuffle=False)) and None,
        results)
    run("seq_validation_shuffled", lambda: fit(sequence(train, workers=2),
                                               validation_data=sequence(val, workers=2)) and None, results)
    run("seq_named_dicts", lambda: fit(sequence(train, targets={"out": "target"}), m=model(named_output=True))
        and None, results)
    run("seq_steps_per_execution", lambda: fit(sequence(train), m=model(steps_per_execution=3)) and None, results)
    run("seq_initial_epoch", lambda: fit(sequence(train), epochs=5, initial_epoch=2) and None, results)

    def second_fit():
        seq = sequence(train, workers=2)
        m = fit(seq, epochs=2)
        fit(seq, epochs=2, m=m)
    run("seq_second_fit", second_fit, results)

    def evaluate_predict():
        seq, m = sequence(train), model()
        m.evaluate(seq, verbose=0)
        predictions = m.predict(ShardSequence(train, BATCH, INPUTS, seed=SEED), verbose=0)
        return {"predict_rows": int(np.asarray(predictions).shape[0])}
    run("seq_evaluate_predict", evaluate_predict, results)
    run("seq_keras_shuffle", lambda: fit(sequence(train), shuffle=True) and None, results)
    run("seq_steps_per_epoch", lambda: fit(sequence(train), steps_per_epoch=4) and None, results)

    run("gen_steps_per_epoch", lambda: fit(train.batches(BATCH, inputs=INPUTS, targets="target", seed=SEED),
                                           steps_per_epoch=per_epoch) and None, results)
    run("gen_one_epoch", lambda: fit(train.batches(BATCH, inputs=INPUTS, targets="target", seed=SEED, epochs=1),
                                     epochs=1) and None, results)
    run("gen_no_steps_per_epoch", lambda: fit(train.batches(BATCH, inputs=INPUTS, targets="target", seed=SEED,
                                                            epochs=3)) and None, results)
    run("gen_other_steps_per_epoch", lambda: fit(train.batches(BATCH, inputs=INPUTS, targets="target", seed=SEED),
                                                 steps_per_epoch=4) and None, results)
    run("gen_initial_epoch_without_start", lambda: fit(train.batches(BATCH, inputs=INPUTS, targets="target",
                                                                     seed=SEED),
                                                       steps_per_epoch=per_epoch, epochs=4, initial_epoch=2)
        and None, results)
    run("gen_validation_data", lambda: fit(sequence(train), validation_data=val.batches(
        BATCH, inputs=INPUTS, targets="target", shuffle=False)) and None, results)
    run("gen_initial_epoch", lambda: fit(train.batches(BATCH, inputs=INPUTS, targets="target", seed=SEED,
                                                       start=(2, 0)),
                                         steps_per_epoch=per_epoch, epochs=4, initial_epoch=2) and None, results)

    run("tfdata_finite", lambda: fit(train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=SEED))
        and None, results)
    run("tfdata_finite_steps_per_epoch", lambda: fit(train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target",
                                                                         seed=SEED), steps_per_epoch=per_epoch)
        and None, results)
    run("tfdata_finite_initial_epoch", lambda: fit(train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target",
                                                                       seed=SEED), epochs=4, initial_epoch=2)
        and None, results)
    run("tfdata_endless", lambda: fit(train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=SEED,
                                                          epochs=None), steps_per_epoch=per_epoch) and None, results)

    def derived(tf_ds):  # map, unbatch + batch (the same batches), prefetch
        return tf_ds.map(lambda x, y: (x, y)).unbatch().batch(BATCH).prefetch(2)
    run("tfdata_derived", lambda: fit(derived(train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target",
                                                                  seed=SEED))) and None, results)
    run("tfdata_derived_initial_epoch", lambda: fit(derived(train.to_tf_dataset(
        BATCH, inputs=INPUTS, targets="target", seed=SEED)), epochs=4, initial_epoch=2) and None, results)
    run("tfdata_derived_steps_per_epoch", lambda: fit(derived(train.to_tf_dataset(
        BATCH, inputs=INPUTS, targets="target", seed=SEED)), steps_per_epoch=per_epoch) and None, results)

    def custom_loops():
        seq, out = sequence(train), {"indexed": [], "iterated": [], "tf_iterations": [], "tf_repeat": [],
                                     "tf_derived": [], "tf_distributed": []}
        for _ in range(2):
            out["indexed"].append([np.asarray(seq[i][0]["tag"]).astype(int).tolist() for i in range(len(seq))])
            seq.on_epoch_end()
        seq = sequence(train)
        seq.on_epoch_end()  # Keras-style extra call before a loop: custom loops move on
        for _ in range(2):
            out["iterated"].append([np.asarray(x["tag"]).astype(int).tolist() for x, _ in seq])
        tf_ds = train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=SEED)
        for _ in range(2):
            out["tf_iterations"].append([np.asarray(x["tag"]).astype(int).tolist() for x, _ in tf_ds])
        out["tf_repeat"] = [np.asarray(x["tag"]).astype(int).tolist() for x, _ in tf_ds.repeat(2)]
        for _ in range(2):
            out["tf_derived"].append([np.asarray(x["tag"]).astype(int).tolist() for x, _ in derived(tf_ds)])
        if BACKEND == "tensorflow":  # distributed iterations (which never call the dataset's __iter__)
            for _ in range(2):
                out["tf_distributed"].append([
                    [int(i) for part in strategy.experimental_local_results(x["tag"]) for i in np.asarray(part)]
                    for x, _ in strategy.experimental_distribute_dataset(tf_ds)])
        return out
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if BACKEND == "tensorflow" else None
    run("custom_loops", custom_loops, results)

    if BACKEND == "tensorflow":

        def mirrored(data, **kwargs):
            with strategy.scope():
                m = model()
            fit(data, m=m, **kwargs)
        run("mirrored_seq_workers1", lambda: mirrored(sequence(train)), results)
        run("mirrored_seq_workers2", lambda: mirrored(sequence(train, workers=2)), results)
        run("mirrored_tfdata_finite", lambda: mirrored(
            train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=SEED)), results)
        run("mirrored_tfdata_finite_initial_epoch", lambda: mirrored(
            train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=SEED), epochs=4, initial_epoch=2),
            results)
        run("mirrored_tfdata_derived", lambda: mirrored(
            derived(train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=SEED))), results)
        run("mirrored_tfdata_endless", lambda: mirrored(
            train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=SEED, epochs=None),
            steps_per_epoch=per_epoch), results)
        run("mirrored_generator", lambda: mirrored(
            train.batches(BATCH, inputs=INPUTS, targets="target", seed=SEED), steps_per_epoch=per_epoch), results)
    if BACKEND == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        try:
            run("dataparallel_seq_workers1", lambda: fit(sequence(train)) and None, results)
            run("dataparallel_seq_workers2", lambda: fit(sequence(train, workers=2)) and None, results)
            run("dataparallel_tfdata_finite", lambda: fit(
                train.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=SEED)) and None, results)
            run("dataparallel_gen_steps_per_epoch", lambda: fit(
                train.batches(BATCH, inputs=INPUTS, targets="target", seed=SEED), steps_per_epoch=per_epoch)
                and None, results)
        finally:
            keras.distribution.set_distribution(None)


class KillAt(keras.callbacks.Callback):
    """SIGKILLs this process after ``at`` training steps (counted over the run), like a lost machine."""

    def __init__(self, at):
        super().__init__()
        self.at, self.steps = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def resume_run(ds, backup_dir, log_path, kill_at, feed):
    """One run of a fit that may be killed: the ids of every training step go to ``log_path`` as
    they are trained (flushed), the final weights to ``log_path + ".npz"``."""
    train = ds.split({"train": 300, "val": 60}, seed=1)["train"]
    per_epoch = -(-len(train) // BATCH)
    m = model()
    if feed == "sequence":
        seq = sequence(train, workers=2)
        backup = BackupAndRestore(backup_dir, data=seq, save_freq=4)
        data, kwargs = seq, {}
    else:
        backup = BackupAndRestore(backup_dir, save_freq=4)
        data = train.batches(BATCH, inputs=INPUTS, targets="target", seed=SEED, start=backup.step)
        kwargs = {"steps_per_epoch": per_epoch}
    callbacks = [backup] + ([KillAt(kill_at)] if kill_at else [])

    class Flush(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            with open(log_path, "a") as f:
                for kind, ids in LOG:
                    if kind == "train":
                        f.write(json.dumps(ids) + "\n")
            LOG.clear()
    m.fit(data, epochs=3, verbose=0, shuffle=False, callbacks=[Flush()] + callbacks, **kwargs)
    np.savez(log_path + ".npz", *m.get_weights())


def main():
    path, out = sys.argv[2], sys.argv[3]
    ds = shardfeed.open(path)
    if len(sys.argv) > 4 and sys.argv[4] == "resume-run":
        backup_dir, log_path, kill_at, feed = sys.argv[5], sys.argv[6], int(sys.argv[7]), sys.argv[8]
        resume_run(ds, backup_dir, log_path, kill_at, feed)
        return
    multiprocessing.set_start_method("fork", force=True)
    results: dict = {"backend": keras.backend.backend()}
    routes(ds, results)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
