"""The epoch contract on every Keras and tf.data route (issue 13), route by route and backend by
backend: for each Keras epoch ``e`` of a fit, the batches the model trained on, step by step, are
exactly the Sampler's batches of data epoch ``e`` (counted from ``initial_epoch``); validation
reads every validation sample once per run; custom loops and tf.data iterations move on one
epoch per pass; a fit killed with SIGKILL and restarted trains exactly the batches of an
uninterrupted run and ends with its weights. A route that cannot be exact is refused at the
start of fit with an error naming the alternative.

Each backend runs in its own process (``tests/routes_worker.py``; KERAS_BACKEND must be set
before Keras is imported), which trains a small model on every route and records, from inside
the model (a layer on the ``tag`` input, the sample's id), the ids of every step. The expected
batches come from ``shardfeed.Sampler`` over the same view, in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import shardfeed

HERE = Path(__file__).parent
WORKER = HERE / "routes_worker.py"
BATCH, SEED = 32, 11  # as in routes_worker.py
BACKENDS = ["tensorflow", "jax", "torch"]
WORKER_TIMEOUT_S = 1500

EXACT = {  # route -> the Keras epochs it trains (each must be that data epoch, batch for batch)
    "seq_workers1": [0, 1, 2], "seq_workers2": [0, 1, 2], "seq_workers4": [0, 1, 2],
    "seq_processes_fork": [0, 1, 2], "seq_processes_spawn": [0, 1, 2],
    "seq_validation": [0, 1, 2], "seq_validation_shuffled": [0, 1, 2], "seq_named_dicts": [0, 1, 2],
    "seq_steps_per_execution": [0, 1, 2], "seq_initial_epoch": [2, 3, 4], "seq_second_fit": [0, 1, 0, 1],
    "gen_steps_per_epoch": [0, 1, 2], "gen_one_epoch": [0], "gen_initial_epoch": [2, 3],
    "tfdata_finite": [0, 1, 2], "tfdata_finite_initial_epoch": [2, 3],
    "tfdata_derived": [0, 1, 2], "tfdata_derived_initial_epoch": [2, 3],  # map, unbatch + batch, prefetch
    "tfdata_endless": [0, 1, 2],
}
EXACT_BY_BACKEND = {
    "tensorflow": {"mirrored_seq_workers1": [0, 1, 2], "mirrored_seq_workers2": [0, 1, 2],
                   "mirrored_tfdata_finite": [0, 1, 2], "mirrored_tfdata_finite_initial_epoch": [2, 3],
                   "mirrored_tfdata_derived": [0, 1, 2], "mirrored_tfdata_endless": [0, 1, 2]},
    "jax": {"dataparallel_seq_workers1": [0, 1, 2], "dataparallel_seq_workers2": [0, 1, 2],
            "dataparallel_tfdata_finite": [0, 1, 2], "dataparallel_gen_steps_per_epoch": [0, 1, 2]},
    "torch": {},
}
REFUSED = {  # route -> the error (its type, the route and the alternative), before any training step
    "seq_keras_shuffle": r"^ValueError: .*shuffle=True.*pass shuffle=False to fit",
    "seq_steps_per_epoch": r"^ValueError: .*steps_per_epoch=4.*leave steps_per_epoch out",
    "gen_no_steps_per_epoch": r"^ValueError: .*without steps_per_epoch.*pass steps_per_epoch=10",
    "gen_other_steps_per_epoch": r"^ValueError: model\.fit\(generator, steps_per_epoch=4\): an epoch of this "
                                 r"generator has 10 batches.*pass steps_per_epoch=10, or train on a view",
    "gen_initial_epoch_without_start": r"^ValueError: model\.fit\(generator, initial_epoch=2\) with a generator "
                                       r"starting at epoch 0: pass start=\(2, 0\) to batches\(\)",
    "gen_validation_data": r"^ValueError: a shardfeed generator as validation_data: .*pass a "
                           r"shardfeed\.keras\.ShardSequence\(\.\.\., shuffle=False\)",
    "tfdata_finite_steps_per_epoch": r"^ValueError: .*steps_per_epoch=10\) with a finite dataset.*pass epochs=None "
                                     r"to to_tf_dataset",
    # A derived dataset has no __iter__ of shardfeed's: refused at its first read, through tf.data.
    "tfdata_derived_steps_per_epoch": r"^InvalidArgumentError: .*ValueError: model\.fit\(to_tf_dataset\(\.\.\.\), "
                                      r"steps_per_epoch=10\) with a finite dataset.*pass epochs=None to to_tf_dataset",
}
REFUSED_BY_BACKEND = {
    "tensorflow": {"mirrored_generator": r"^ValueError: .*under tf\.distribute.*to_tf_dataset\(\.\.\., epochs=None\) "
                                         r"with steps_per_epoch"},
    "jax": {},
    "torch": {"seq_steps_per_execution": r"^ValueError: `steps_per_execution` must be 1 with the PyTorch backend"},
}


def _have(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


def _skip_without(backend: str) -> None:
    if not _have(backend):
        pytest.skip(f"Keras's {backend} backend needs {backend}, which is not installed "
                    f"(pip install 'shardfeed[{'jax' if backend == 'jax' else backend}]'; .ci/run installs it)")
    if not _have("keras") or not _have("tensorflow"):
        pytest.skip("the routes need Keras and TensorFlow (pip install 'shardfeed[tensorflow]')")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    n = 360
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    path = str(tmp_path_factory.mktemp("routes") / "ds")
    with shardfeed.Writer(path, fields={"x": ("float32", (4,)), "tag": ("float32", ()), "target": ("float32", ())},
                          shard_size=4096) as writer:
        writer.extend({"x": x, "tag": np.arange(n, dtype=np.float32), "target": x.sum(axis=1)})
    with shardfeed.open(path) as ds:
        parts = ds.split({"train": 300, "val": 60}, seed=1)
        yield path, parts["train"], parts["val"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND", "XLA_FLAGS")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="module")
def results(dataset, tmp_path_factory):
    """The worker's report for a backend. The workers of all the installed backends start together
    on first use (each pays its own Keras import; they overlap on a machine with several CPUs)."""
    path = dataset[0]
    running: dict = {}
    reports: dict = {}

    def start_all() -> None:
        for backend in BACKENDS:
            if _have(backend) and backend not in running:
                out = tmp_path_factory.mktemp(f"routes-{backend}") / "report.json"
                process = subprocess.Popen([sys.executable, str(WORKER), backend, path, str(out)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                           cwd=str(out.parent))
                running[backend] = (process, out)

    def get(backend: str) -> dict:
        if backend not in reports:
            start_all()
            process, out = running[backend]
            try:
                stdout, stderr = process.communicate(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
                pytest.fail(f"the {backend} worker ran for more than {WORKER_TIMEOUT_S} s:\n{stderr[-4000:]}")
            assert process.returncode == 0, f"{backend} worker failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
            with open(out) as f:
                reports[backend] = json.load(f)
            assert reports[backend]["backend"] == backend
        return reports[backend]

    yield get
    for process, _ in running.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def _epoch_ids(sampler, epoch: int) -> list:
    return [[int(i) for i in sampler.batch(epoch, b)] for b in range(len(sampler))]


def _trained_epochs(log: list) -> list:
    """[(keras epoch, [ids of each call in training])] from a worker log."""
    epochs = []
    for kind, value in log:
        if kind == "epoch":
            epochs.append((value, []))
        elif kind == "train":
            assert epochs, "a training step before the first epoch began"
            epochs[-1][1].append(value)
    return epochs


def _assert_exact(route: str, report: dict, sampler, keras_epochs: list, distributed: bool) -> None:
    assert "error" not in report, f"{route} failed: {report.get('traceback', report.get('error'))}"
    trained = _trained_epochs(report["log"])
    assert [e for e, _ in trained] == keras_epochs, f"{route}: Keras epochs"
    for keras_epoch, calls in trained:
        expected = _epoch_ids(sampler, keras_epoch)
        if distributed:  # each replica records its part of a step: compare the epoch's stream
            got = [i for call in calls for i in call]
            assert got == [i for batch in expected for i in batch], f"{route}: Keras epoch {keras_epoch}"
        else:
            assert calls == expected, (f"{route}: Keras epoch {keras_epoch} trained other batches than data epoch "
                                       f"{keras_epoch}'s ({_describe(calls, sampler)})")


def _describe(calls: list, sampler) -> str:
    got = [i for call in calls for i in call]
    for epoch in range(8):
        if got == [i for batch in _epoch_ids(sampler, epoch) for i in batch]:
            return f"they are data epoch {epoch}'s"
    return f"{len(got)} ids, {len(got) - len(set(got))} repeated"


def _routes():
    for backend in BACKENDS:
        refused = list(REFUSED) + list(REFUSED_BY_BACKEND[backend])
        exact = [r for r in list(EXACT) + list(EXACT_BY_BACKEND[backend]) if r not in refused]
        for route in exact + refused:
            yield pytest.param(backend, route, id=f"{backend}-{route}")


@pytest.mark.parametrize("backend,route", list(_routes()))
def test_route(results, dataset, backend, route):
    _skip_without(backend)
    _, train, val = dataset
    report = results(backend)[route]
    sampler = shardfeed.Sampler(train, BATCH, seed=SEED)
    refused = {**REFUSED, **REFUSED_BY_BACKEND[backend]}
    if route in refused:
        assert "error" in report, f"{route} trained instead of refusing"
        assert re.search(refused[route], report["error"], re.DOTALL), report["error"]
        assert not [kind for kind, _ in report["log"] if kind == "train"], f"{route} trained before refusing"
        return
    keras_epochs = {**EXACT, **EXACT_BY_BACKEND[backend]}[route]
    _assert_exact(route, report, sampler, keras_epochs, distributed=route.startswith(("mirrored", "dataparallel")))
    evaluated = [ids for kind, ids in report["log"] if kind == "eval"]
    if route == "seq_validation":  # shuffle=False: every validation run reads the view in order
        in_order = [int(i) for i in val.indices()]
        runs = [[i for call in evaluated[k:k + 2] for i in call] for k in range(0, len(evaluated), 2)]
        assert runs == [in_order] * 3
    if route == "seq_validation_shuffled":  # every run reads each validation sample once
        runs = [[i for call in evaluated[k:k + 2] for i in call] for k in range(0, len(evaluated), 2)]
        assert len(runs) == 3 and all(sorted(run) == sorted(int(i) for i in val.indices()) for run in runs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_and_predict_read_the_current_epoch_once(results, dataset, backend):
    _skip_without(backend)
    _, train, _ = dataset
    report = results(backend)["seq_evaluate_predict"]
    assert "error" not in report, report.get("traceback")
    evaluated = [ids for kind, ids in report["log"] if kind == "eval"]
    sampler = shardfeed.Sampler(train, BATCH, seed=SEED)
    assert evaluated == _epoch_ids(sampler, 0) * 2  # evaluate, then predict: epoch 0, batch by batch
    assert report["predict_rows"] == len(train)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_loops_and_tf_data_iterations_move_on_one_epoch_per_pass(results, dataset, backend):
    _skip_without(backend)
    _, train, _ = dataset
    report = results(backend)["custom_loops"]
    assert "error" not in report, report.get("traceback")
    sampler = shardfeed.Sampler(train, BATCH, seed=SEED)
    epoch = lambda e: _epoch_ids(sampler, e)  # noqa: E731
    assert report["indexed"] == [epoch(0), epoch(1)]  # seq[i] for i in range(len(seq)); seq.on_epoch_end()
    assert report["iterated"] == [epoch(1), epoch(2)]  # after an on_epoch_end: for batch in seq, twice
    assert report["tf_iterations"] == [epoch(0), epoch(1)]  # for batch in tf_ds, twice
    assert report["tf_repeat"] == epoch(2) + epoch(3)  # tf_ds.repeat(2): the next two iterations
    assert report["tf_derived"] == [epoch(4), epoch(5)]  # for batch in tf_ds.map(f).unbatch().batch(b), twice
    if backend == "tensorflow":  # for batch in strategy.experimental_distribute_dataset(tf_ds), twice
        assert report["tf_distributed"] == [epoch(6), epoch(7)]


@pytest.mark.parametrize("feed", ["sequence", "generator"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_fit_restarts_with_the_very_next_batch(results, dataset, tmp_path, backend, feed):
    """fit(3 epochs) with BackupAndRestore(save_freq=4) SIGKILLed after 17 steps (mid-epoch 1),
    then restarted: the restart trains the stream from the last backup (step 16) to the end and
    ends with the weights of the uninterrupted run (the seq_workers2 route)."""
    _skip_without(backend)
    path, train, _ = dataset
    backup, log = tmp_path / "backup", tmp_path / "steps.jsonl"

    def run(kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(WORKER), backend, path, "-", "resume-run", str(backup), str(log),
                               str(kill_at), feed], capture_output=True, text=True, timeout=600, env=_env(),
                              cwd=str(tmp_path))

    killed = run(17)
    assert killed.returncode == -9, killed.stderr[-3000:]
    with open(backup / "training_metadata.json") as f:
        assert json.load(f)["shardfeed_step"] == 16
    sampler = shardfeed.Sampler(train, BATCH, seed=SEED)
    stream = [[int(i) for i in sampler.indices(step)] for step in range(3 * len(sampler))]
    with open(log) as f:
        assert [json.loads(line) for line in f] == stream[:17]
    log.unlink()
    restarted = run(0)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    with open(log) as f:
        assert [json.loads(line) for line in f] == stream[16:]
    whole = results(backend)["seq_workers2"]["weights"]
    with np.load(str(log) + ".npz") as weights:
        resumed = [weights[f"arr_{i}"] for i in range(len(weights.files))]
    assert len(resumed) == len(whole)
    for got, expected in zip(resumed, whole):
        np.testing.assert_array_equal(got, np.asarray(expected, dtype=got.dtype))
