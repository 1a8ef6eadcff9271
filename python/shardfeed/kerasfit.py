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
decide whether a feed can be exact (``steps_per_epoch``, ``shuffle``, ``initial_epoch``).

It must be called from the thread that runs Keras's loop (``on_epoch_begin`` is; a generator's
first ``next`` is, when Keras peeks at it). The route-matrix test (tests/test_routes.py) pins
this to the Keras trainers of every backend (Keras 3.15). Not guarded at run time: with a
Keras whose trainers no longer match (other method or loop-variable names), no call is found
and the feeds fall back to their custom-loop rules, which the route-matrix test then shows.

Importing this module imports nothing: Keras is looked up in ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, Optional

__all__ = ["KerasCall", "distributed", "keras_call"]

# The trainer methods whose loops ask for data.
_METHODS = ("fit", "evaluate", "predict")


@dataclasses.dataclass(frozen=True)
class KerasCall:
    """A Keras ``fit``/``evaluate``/``predict`` call in progress on the current thread."""

    method: str
    # fit: the Keras epoch being trained (None before the epoch loop: the iteration Keras makes to
    # build the model); None for evaluate and predict.
    epoch: Optional[int]
    arguments: Dict[str, Any]
    model: Any

    @property
    def building(self) -> bool:
        """fit, before its first epoch: Keras reads a batch to build the model and drops the rest."""
        return self.method == "fit" and self.epoch is None


def _is_model(value: Any) -> bool:
    keras = sys.modules.get("keras")
    model = getattr(keras, "Model", None) if keras is not None else None
    return model is not None and isinstance(value, model)


def keras_call(depth: int = 1) -> Optional[KerasCall]:
    """The nearest Keras ``fit``/``evaluate``/``predict`` frame on this thread's stack, or None
    (a custom loop, or Keras not imported). ``depth``: frames to skip (the caller's own)."""
    if "keras" not in sys.modules:
        return None
    frame = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        if code.co_name in _METHODS and str(frame.f_globals.get("__name__", "")).startswith("keras."):
            local = frame.f_locals
            if _is_model(local.get("self")):
                epoch = local.get("epoch", None) if code.co_name == "fit" else None
                names = ("steps_per_epoch", "shuffle", "initial_epoch", "epochs", "validation_data", "steps")
                arguments = {name: local[name] for name in names if name in local}
                return KerasCall(code.co_name, epoch if isinstance(epoch, int) else None, arguments,
                                 local.get("self"))
        frame = frame.f_back
    return None


def distributed(model: Any) -> bool:
    """Whether ``model`` trains under a ``tf.distribute`` strategy (Keras's TensorFlow trainer
    then reads a batch from every fit's iterator to build the model, and drops the iterator)."""
    return getattr(model, "_distribute_strategy", None) is not None
