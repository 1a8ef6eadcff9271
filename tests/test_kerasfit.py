"""shardfeed.kerasfit reads Keras's own epoch from the loop variable of its trainer's ``fit``, a
Keras internal. When a Keras model's fit frame lacks it (a Keras that renamed it) or holds
something else there, the feeds that need the epoch raise KerasVersionError naming the Keras
version and the way out, rather than guess an epoch; the generator with ``steps_per_epoch``
does not need it and keeps working. Simulated here with Keras's real TensorFlow trainer ``fit``,
recompiled with the loop variable renamed (or made a float)."""

import inspect
import os
import re
import textwrap
import types

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
keras = pytest.importorskip("keras", reason="the tensorflow extra is not installed")

import keras_helpers as H  # noqa: E402  (after the backend is chosen above)
import shardfeed  # noqa: E402
from shardfeed import KerasVersionError, Sampler  # noqa: E402
from shardfeed.keras import ShardSequence  # noqa: E402

N, BATCH = 200, 50
INPUTS = {"x": "x", "tag": "tag"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kerasfit") / "ds")
    H.write_dataset(path, N)
    with shardfeed.open(path) as dataset:
        yield dataset


def altered_fit(edit):
    """Keras's TensorFlow trainer ``fit``, its source passed through ``edit`` and compiled in the
    trainer module's globals (so that it is, to shardfeed, that Keras's fit)."""
    from keras.src.backend.tensorflow import trainer
    source = textwrap.dedent(inspect.getsource(trainer.TensorFlowTrainer.fit))
    altered = edit(source)
    assert altered != source
    namespace = dict(vars(trainer))
    exec(compile(altered, trainer.__file__, "exec"), namespace)  # noqa: S102
    return namespace["fit"]


def renamed_loop_variable(source):
    return re.sub(r"\bepoch\b", "keras_epoch", source)


def float_loop_variable(source):
    return source.replace("for epoch in range(initial_epoch, epochs):",
                          "for epoch in map(float, range(initial_epoch, epochs)):")


def renamed_argument(source):  # fit's steps_per_epoch renamed (what it passes on keeps its keyword)
    return re.sub(r"\bsteps_per_epoch\b", "epoch_steps", source).replace("epoch_steps=epoch_steps",
                                                                        "steps_per_epoch=epoch_steps")


def model_with(fit):
    model = H.mlp(6, 20, BATCH)
    model.fit = types.MethodType(fit, model)
    return model


VERSION = re.escape(keras.__version__)


def test_the_real_fit_passes_the_guard(ds):
    model = model_with(altered_fit(lambda source: source + "\n"))  # recompiled, unchanged
    model.fit(ShardSequence(ds, BATCH, INPUTS, "target", seed=1), epochs=2, verbose=0, shuffle=False)
    seen = model.get_layer("recorder").seen()
    sampler = Sampler(ds, BATCH, seed=1)
    for step in range(2 * len(sampler)):
        np.testing.assert_array_equal(seen[step], sampler.indices(step))


@pytest.mark.parametrize("edit,what", [(renamed_loop_variable, "has no local variable 'epoch'"),
                                       (float_loop_variable, "holds a float in 'epoch'")])
def test_a_sequence_refuses_a_keras_whose_fit_loop_changed(ds, edit, what):
    model = model_with(altered_fit(edit))
    with pytest.raises(KerasVersionError, match=rf"Keras {VERSION}: keras\.src\.backend\.tensorflow\.trainer\.fit "
                                                rf"{what}.*ds\.batches\(.*pip install 'keras==3\.15\.\*'"):
        model.fit(ShardSequence(ds, BATCH, INPUTS, "target", seed=1), epochs=2, verbose=0, shuffle=False)
    assert model.optimizer.iterations.numpy() == 0  # nothing trained


def test_a_finite_tf_dataset_refuses_a_keras_whose_fit_loop_changed(ds):
    model = model_with(altered_fit(renamed_loop_variable))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    initial = [w.numpy().copy() for layer in dense for w in layer.weights]
    # The pass's epoch is decided on a tf.data thread: the error comes through tf.data.
    with pytest.raises(tf.errors.OpError, match=rf"KerasVersionError.*Keras {VERSION}.*has no local variable 'epoch'"):
        model.fit(ds.to_tf_dataset(BATCH, inputs=INPUTS, targets="target", seed=1), epochs=2, verbose=0,
                  shuffle=False)
    # No batch was trained (the failed graph step may still bump step counters: TensorFlow's, not data).
    for before, after in zip(initial, [w.numpy() for layer in dense for w in layer.weights]):
        np.testing.assert_array_equal(before, after)


def test_the_generator_with_steps_per_epoch_does_not_need_the_loop_variable(ds):
    model = model_with(altered_fit(renamed_loop_variable))
    sampler = Sampler(ds, BATCH, seed=1)
    model.fit(ds.batches(BATCH, inputs=INPUTS, targets="target", seed=1), steps_per_epoch=len(sampler), epochs=2,
              verbose=0, shuffle=False)
    seen = model.get_layer("recorder").seen()
    for step in range(2 * len(sampler)):
        np.testing.assert_array_equal(seen[step], sampler.indices(step))


def test_a_renamed_fit_argument_is_refused_too(ds):
    model = model_with(altered_fit(renamed_argument))
    with pytest.raises(KerasVersionError, match=rf"Keras {VERSION}: .*\.fit has no argument 'steps_per_epoch'"):
        model.fit(ds.batches(BATCH, inputs=INPUTS, targets="target", seed=1), epoch_steps=len(Sampler(ds, BATCH)),
                  epochs=1, verbose=0, shuffle=False)
