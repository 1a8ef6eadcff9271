"""Which Keras training loop is asking for data: read from the call stack.

Keras 3 tells a ``PyDataset`` neither which epoch begins (``on_epoch_begin`` takes no argument)
nor whether the batches it asks for will be trained on: ``fit`` also iterates the data once to
build the model (on JAX and torch, and on TensorFlow under ``tf.distribute``) and drops what it
read, and it calls ``on_epoch_begin``/``on_epoch_end`` around that iteration too. Counting those
calls gives each backend a different data epoch for the same Keras epoch (issue 13). What
Keras cannot desynchronise is its own loop variable: ``fit`` runs ``for epoch in
range(initial_epoch, epochs)`` and calls into the data from inside that loop. :func:`keras_call`
finds the nearest ``fit``/``evaluate``/``predict`` frame of a Keras model on the stack and
reports the epoch it is in (None before the loop: the build iteration) with the arguments that
decide whether a feed can be exact (``x``, ``steps_per_epoch``, ``shuffle``, ``initial_epoch``...).
:func:`keras_calls_reading` does the same on every thread, for a feed whose first read runs on a
thread of its own (a tf.data pipeline).

The loop variable is a Keras internal; the route-matrix test (tests/test_routes.py) pins it to
the Keras trainers of every backend (Keras 3.15). Guarded at run time: when a Keras model's
``fit`` frame has no ``epoch`` local, or holds something else than an int there (a Keras that
renamed it), :attr:`KerasCall.epoch` raises :class:`~shardfeed.errors.KerasVersionError`, never
a guessed epoch. The arguments (``x``, ``steps_per_epoch``...) are fit's public signature and
are checked the same way when a frame is found.

Importing this module imports nothing: Keras is looked up in ``sys.modules``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Dict, List, Optional

from .errors import KerasVersionError

__all__ = ["KerasCall", "distributed", "keras_call", "keras_calls_reading"]

# The trainer methods whose loops ask for data, and the arguments of each that the feeds read.
_ARGUMENTS = {
    "fit": ("x", "epochs", "initial_epoch", "steps_per_epoch", "shuffle", "validation_data"),
    "evaluate": ("x", "steps"),
    "predict": ("x", "steps"),
}
# fit's loop variable: ``for epoch in range(initial_epoch, epochs)`` in every Keras 3 trainer.
LOOP_VARIABLE = "epoch"
_UNBOUND = object()  # the loop variable before the loop (fit reads data to build the model)


def _keras_version() -> str:
    return str(getattr(sys.modules.get("keras"), "__version__", "unknown"))


class KerasCall:
    """A Keras ``fit``/``evaluate``/``predict`` call in progress (on the current thread, or the
    thread :func:`keras_calls_reading` found it on)."""

    def __init__(self, method: str, arguments: Dict[str, Any], model: Any, where: str,
                 loop_variable: Any = _UNBOUND, has_loop_variable: bool = True) -> None:
        self.method = method
        self.arguments = arguments
        self.model = model
        self.where = where  # the trainer's module, for messages
        self._loop_variable = loop_variable
        self._has_loop_variable = has_loop_variable

    def __repr__(self) -> str:
        return f"<KerasCall {self.where}.{self.method}>"

    @property
    def epoch(self) -> Optional[int]:
        """fit: the Keras epoch being trained (None before the epoch loop: the iteration Keras
        makes to build the model); None for evaluate and predict. Raises
        :class:`~shardfeed.errors.KerasVersionError` when this Keras's fit has no int loop
        variable ``epoch``."""
        if self.method != "fit":
            return None
        if not self._has_loop_variable:
            raise self._version_error(f"has no local variable {LOOP_VARIABLE!r}")
        value = self._loop_variable
        if value is _UNBOUND:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._version_error(f"holds a {type(value).__name__} in {LOOP_VARIABLE!r}, not the epoch number")
        return value

    @property
    def building(self) -> bool:
        """fit, before its first epoch: Keras reads a batch to build the model and drops the rest."""
        return self.method == "fit" and self.epoch is None

    def _version_error(self, what: str) -> KerasVersionError:
        return KerasVersionError(
            f"Keras {_keras_version()}: {self.where}.fit {what}; shardfeed reads the Keras epoch from that "
            f"loop variable ('for {LOOP_VARIABLE} in range(initial_epoch, epochs)', Keras 3.15) to feed Keras "
            f"epoch e with data epoch e, and will not guess it. Feed fit with a generator, "
            f"ds.batches(..., epochs=None, start=(initial_epoch, 0)) with steps_per_epoch=<batches per epoch>, "
            f"or ds.to_tf_dataset(..., epochs=None) with steps_per_epoch (neither needs the epoch), or pin keras "
            f"to a version shardfeed is tested with (pip install 'keras==3.15.*')")


def _is_model(value: Any) -> bool:
    keras = sys.modules.get("keras")
    model = getattr(keras, "Model", None) if keras is not None else None
    return model is not None and isinstance(value, model)


def _forget_locals(frame_locals: Any, own_thread: bool) -> None:
    """Empties the dict that ``frame.f_locals`` returned for a running function frame (Python
    before 3.13): the frame keeps it, and with it every local as it was then, until the next
    ``f_locals`` or the frame's end. Kept, the snapshot of ``fit``'s locals held the previous
    epoch's tf.data iterator after Keras had let it go, so that its destructor (which can wait
    seconds for its threads) ran in the next ``f_locals``, inside a ShardSequence's
    ``on_epoch_end``, instead of in Keras's loop. Left as it is for another thread's frame,
    and while a trace or profile function is set on this thread: CPython writes that dict back
    into the frame after a trace callback, deleting the locals it lacks, and this call may run
    inside one (a debugger's prompt). From 3.13 ``f_locals`` is a view, not a snapshot."""
    if own_thread and type(frame_locals) is dict and sys.gettrace() is None and sys.getprofile() is None:
        frame_locals.clear()


def _call_of(frame: Any, own_thread: bool = True) -> Optional[KerasCall]:
    """The Keras call ``frame`` runs, if it is the frame of a Keras model's fit/evaluate/predict
    (``own_thread``: a frame of the calling thread's stack)."""
    code = frame.f_code
    if code.co_name not in _ARGUMENTS:
        return None
    module = str(frame.f_globals.get("__name__", ""))
    if not module.startswith("keras."):
        return None
    local = frame.f_locals
    try:
        return _call_in(code, module, local)
    finally:
        _forget_locals(local, own_thread)


def _call_in(code: Any, module: str, local: Any) -> Optional[KerasCall]:
    """:func:`_call_of` of a frame that runs a trainer method of a ``keras.`` module, from its
    locals ``local``."""
    if not _is_model(local.get("self")):
        return None
    names = code.co_varnames  # every local of the function, bound or not
    missing = [name for name in _ARGUMENTS[code.co_name] if name not in names]
    if missing:
        raise KerasVersionError(
            f"Keras {_keras_version()}: {module}.{code.co_name} has no argument {missing[0]!r}; shardfeed's "
            f"feeds read it to refuse the uses that would not train the sampler's epochs; pin keras to a version "
            f"shardfeed is tested with (pip install 'keras==3.15.*')")
    arguments = {name: local[name] for name in _ARGUMENTS[code.co_name] if name in local}
    if code.co_name != "fit":
        return KerasCall(code.co_name, arguments, local["self"], module)
    return KerasCall("fit", arguments, local["self"], module, loop_variable=local.get(LOOP_VARIABLE, _UNBOUND),
                     has_loop_variable=LOOP_VARIABLE in names)


def keras_call(depth: int = 1) -> Optional[KerasCall]:
    """The nearest Keras ``fit``/``evaluate``/``predict`` frame on this thread's stack, or None
    (a custom loop, or Keras not imported). ``depth``: frames to skip (the caller's own).

    It must be called from the thread that runs Keras's loop (``on_epoch_begin`` is; a
    generator's first ``next`` is, when Keras peeks at it)."""
    if "keras" not in sys.modules:
        return None
    frame = sys._getframe(depth)
    while frame is not None:
        call = _call_of(frame)
        if call is not None:
            return call
        frame = frame.f_back
    return None


def keras_calls_reading(reads: Callable[[Any], bool]) -> List[KerasCall]:
    """On every thread, the nearest Keras ``fit``/``evaluate``/``predict`` call whose data ``x``
    satisfies ``reads`` (a thread with none contributes nothing). For a feed whose reads run on
    threads of their own (tf.data's): the thread that runs Keras's loop waits for them, so its
    stack shows which Keras call, and which epoch, the data is being read for."""
    if "keras" not in sys.modules:
        return []
    calls = []
    current = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == current:
            frame = sys._getframe(1)
        while frame is not None:
            call = _call_of(frame, own_thread=ident == current)
            if call is not None and reads(call.arguments.get("x")):
                calls.append(call)
                break
            frame = frame.f_back
    return calls


def distributed(model: Any) -> bool:
    """Whether ``model`` trains under a ``tf.distribute`` strategy (Keras's TensorFlow trainer
    then reads a batch from every fit's iterator to build the model, and drops the iterator)."""
    return getattr(model, "_distribute_strategy", None) is not None
