"""shardfeed.kerasfit reads a Keras trainer's locals through ``frame.f_locals``, which before
Python 3.13 is a snapshot that the frame keeps. Kept, it held objects that ``fit`` had already
let go (an epoch's tf.data iterator), whose destructors then ran inside the next read of the
locals (seen: a ShardSequence's ``on_epoch_end`` waiting seconds for an old iterator's threads).
Simulated with a stand-in ``keras`` module (no TensorFlow needed): a trainer
``fit`` whose local is rebound after shardfeed looked at its frame."""

import sys
import types
import weakref

import pytest

from shardfeed import kerasfit

FIT_SOURCE = '''
def fit(self, x=None, epochs=1, initial_epoch=0, steps_per_epoch=None, shuffle=True, validation_data=None):
    iterator = make_iterator()
    for epoch in range(initial_epoch, epochs):
        seen.append(look())           # a data feed asking which Keras call and epoch this is
        released.append(weakref.ref(iterator))
        iterator = make_iterator()    # fit lets the epoch's iterator go
        released_alive.append(released[-1]() is not None)
'''


class _Iterator:
    """Stands for an epoch's tf.data iterator."""


@pytest.fixture
def keras_trainer(monkeypatch):
    """A ``fit`` compiled in a module named like Keras's trainers, and ``keras.Model``."""
    class Model:
        pass

    monkeypatch.setitem(sys.modules, "keras", types.SimpleNamespace(Model=Model, __version__="stand-in"))
    trainer = types.ModuleType("keras.src.trainers.stand_in")
    trainer.__dict__.update(make_iterator=_Iterator, weakref=weakref, seen=[], released=[], released_alive=[],
                            look=lambda: kerasfit.keras_call())
    exec(compile(FIT_SOURCE, "<keras stand-in trainer>", "exec"), trainer.__dict__)
    return trainer, Model()


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="f_locals is a view from Python 3.13: no snapshot to keep")
def test_looking_at_fit_keeps_none_of_its_locals_alive(keras_trainer):
    if sys.gettrace() is not None or sys.getprofile() is not None:
        pytest.skip("a trace or profile function is set (coverage, a debugger): the snapshot is kept by design")
    trainer, model = keras_trainer
    trainer.fit(model, x="data", epochs=3)
    assert [(call.method, call.epoch, call.arguments["x"]) for call in trainer.seen] == \
        [("fit", 0, "data"), ("fit", 1, "data"), ("fit", 2, "data")]
    assert trainer.released_alive == [False, False, False]  # freed as fit let go, not at the next look


def test_a_look_from_inside_a_trace_callback_leaves_fit_whole(keras_trainer):
    """A debugger's prompt runs inside a trace callback, after which CPython writes the snapshot
    back into the frame, deleting the locals it lacks: with a trace function set, the snapshot is
    left as it is, and fit's locals stay whole."""
    trainer, model = keras_trainer
    looked = []

    def tracer(frame, event, arg):
        if frame.f_code.co_name == "fit" and event == "line" and not looked:
            looked.append(kerasfit.keras_call())  # e.g. seq.on_epoch_begin() typed at the prompt
        return tracer

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        trainer.fit(model, x="data", epochs=2)
    finally:
        sys.settrace(before)
    assert looked and looked[0].method == "fit"
    assert [call.epoch for call in trainer.seen] == [0, 1]
