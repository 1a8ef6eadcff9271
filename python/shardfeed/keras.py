"""Keras integration: :class:`ShardSequence` (a ``keras.utils.PyDataset``) and
:class:`BackupAndRestore` (Keras's callback, plus the position in the data stream).

Importing this module imports Keras; ``import shardfeed`` does not.
"""

from __future__ import annotations

import json
import operator
import os
import warnings
from typing import Any, Optional, Tuple

try:
    import keras
except ImportError as exc:  # the Pillow way: say which extra brings it
    raise ImportError(f"shardfeed.keras needs Keras 3 ({exc}): pip install 'shardfeed[tensorflow]'") from exc

from . import kerasfit
from .loader import DEFAULT_PREFETCH, BatchPlan, FeedOptions, StepPool, refuse_generator_as_validation

__all__ = ["BackupAndRestore", "ShardSequence"]

# The name prefix of a ShardSequence's read-ahead threads (tests wait for these threads).
SEQUENCE_THREAD_NAME = "shardfeed-sequence"


class ShardSequence(keras.utils.PyDataset):
    """A Keras ``PyDataset`` (``keras.utils.Sequence``) of batches of a dataset or view: pass it to
    ``model.fit`` as ``x`` or ``validation_data``, and to ``evaluate``/``predict``.

    The options are the :class:`~shardfeed.loader.FeedOptions` (``inputs`` and ``targets`` may
    also be given by position): ``inputs``, ``targets`` and ``sample_weights`` (a field name, a
    list, or a dict of model input/output name -> field), ``shuffle``, ``seed``, ``shuffle_block``,
    ``drop_remainder``, ``transform``, ``dtype`` and the other read options.

    ``len(seq)`` is the number of batches per epoch; batch ``i`` of data epoch ``e`` is the
    :class:`~shardfeed.Sampler`'s batch ``(e, i)``, and ``__getitem__`` is thread-safe.

    Which epoch: in ``model.fit``, Keras epoch ``e`` reads data epoch ``e`` (so ``initial_epoch=k``
    continues with epoch ``k``, and every backend trains the same batches), whatever Keras calls
    around it: the epoch is read from fit's own loop (:mod:`shardfeed.kerasfit`), not counted from
    ``on_epoch_begin``/``on_epoch_end`` calls, and the batch Keras reads to build the model is not
    an epoch. ``evaluate``, ``predict`` and validation read the sequence's current epoch
    (0 unless moved) from batch 0, every run. In a custom loop, ``on_epoch_end()`` moves to the
    next epoch, and each ``for batch in seq`` reads the next epoch (the current one if none of
    its batches was read yet); ``set_epoch(e)`` and :meth:`restore` move it by hand. After a fit
    epoch ``e`` the current epoch is ``e + 1``.

    Reading ahead: the sequence reads the next batches itself, keyed by step, on ``workers``
    threads (processes with ``use_multiprocessing``: the plan is pickled to them, its dataset
    reopened by path, so ``transform`` must be picklable under ``spawn``), up to
    ``max_queue_size`` batches ahead (2 with one thread). Keras is told ``workers=1``: its own
    worker queue keeps batches read for an epoch it stops early and hands them out in the next
    one (issue 13), which a queue keyed by step cannot do. The threads or processes stop when no
    batch was asked for 10 s (TensorFlow keeps every sequence a ``fit`` read, so a process that
    fits many models would otherwise keep them all), and start again at the next batch asked for.

    Refused at the start of ``fit``, with the alternative: ``shuffle=True`` in ``fit`` (its
    default; Keras would reorder whole batches with Python's ``random``: pass ``shuffle=False``,
    the sequence already shuffles every sample each epoch) and ``steps_per_epoch`` (one Keras
    epoch is one pass over the sequence; use a view such as ``ds.head(n)`` for shorter epochs)."""

    def __init__(self, source: Any, batch_size: int, inputs: Any = None, targets: Any = None, *,
                 workers: int = 1, use_multiprocessing: bool = False, max_queue_size: int = 10, **options: Any):
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=max_queue_size)
        options = FeedOptions.from_kwargs("ShardSequence()", dict(options, inputs=inputs, targets=targets))
        self.plan = BatchPlan(source, batch_size, options)
        if len(self.plan) == 0:
            raise ValueError(f"no batches: {self.plan.sampler.samples} samples with batch_size {batch_size} "
                             f"and drop_remainder={options.drop_remainder}")
        self.read_workers = workers
        self.read_processes = bool(use_multiprocessing)
        self.read_ahead = max_queue_size if workers > 1 or use_multiprocessing else DEFAULT_PREFETCH
        self._pool = self._new_pool()
        self._current = 0  # custom loops: global step of the current epoch's batch 0
        self._read_current = False  # a batch of the current epoch was read outside Keras
        self._resume_at: Optional[int] = None  # restore(): the step the next fit epoch starts at
        self._anchor: Optional[Tuple[int, int]] = None  # (Keras epoch, its first step) after a restore
        self._keras_step: Optional[int] = None  # a Keras epoch in progress: global step of its batch 0
        self._in_fit_epoch = False  # that Keras epoch is one of fit's (not evaluate's, nor the build)

    def __len__(self) -> int:
        return len(self.plan)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool = self._new_pool()

    def _new_pool(self) -> StepPool:
        return StepPool(self.plan, workers=self.read_workers, processes=self.read_processes, depth=self.read_ahead,
                        name=SEQUENCE_THREAD_NAME,
                        inline_when=self.plan.reads_cached if self.plan.inlined else None)

    def __getitem__(self, index: int) -> Any:
        index = operator.index(index)
        if not 0 <= index < len(self.plan):
            raise IndexError(f"batch {index} is out of range: the sequence has {len(self.plan)} batches")
        base = self._keras_step
        if base is None:
            base = self._current
            if kerasfit.keras_call() is None:  # not the batches Keras reads for their types
                self._read_current = True
        return self._pool.get(base + index)

    def __iter__(self):
        """One epoch, batch by batch: the next epoch (the current one if none of its batches was read)."""
        if self._read_current:
            self._current += len(self.plan)
        first = self._current
        self._read_current = True
        for index in range(len(self.plan)):
            yield self._pool.get(first + index)

    def __repr__(self) -> str:
        return (f"<shardfeed.keras.ShardSequence {len(self)} batches of {self.plan.sampler.batch_size} from "
                f"{self.plan.view!r}, epoch {self.epoch}>")

    def step_for_epoch(self, epoch: int) -> int:
        """The global step Keras epoch ``epoch`` of a ``fit`` starts at: ``epoch * len(seq)``, or
        after :meth:`restore`, the restored step for the next epoch Keras begins and consecutive
        epochs from there (in that fit and later ones, until the next restore)."""
        n = len(self.plan)
        if self._resume_at is not None:
            return self._resume_at
        if self._anchor is not None:
            anchor_epoch, anchor_step = self._anchor
            step = anchor_step + (epoch - anchor_epoch) * n
            if step < 0:
                raise ValueError(f"Keras epoch {epoch} comes before the one this sequence was restored for "
                                 f"(epoch {anchor_epoch} reads from step {anchor_step}): call restore() or "
                                 "set_epoch() before a fit that starts earlier")
            return step
        return epoch * n

    def on_epoch_begin(self) -> None:
        call = kerasfit.keras_call()
        if call is None:
            return  # a custom loop: the current epoch goes on
        if call.method == "fit":
            _refuse_inexact_fit(call, len(self.plan))
        if call.method == "fit" and call.epoch is not None:
            if self._resume_at is not None:
                self._anchor, self._resume_at = (call.epoch, self._resume_at), None
            self._keras_step = self.step_for_epoch(call.epoch)
            self._in_fit_epoch = True
        else:  # evaluate, predict, validation, or the batch fit reads to build the model
            self._keras_step = self._current
        self._pool.cancel()

    def on_epoch_end(self) -> None:
        if kerasfit.keras_call() is not None:
            # Keras's epochs come from its loop, not from these calls; after a fit epoch the
            # sequence's current epoch is the next one (for a custom loop or evaluate after fit).
            if self._in_fit_epoch and self._keras_step is not None:
                self._current, self._read_current = self._keras_step + len(self.plan), False
            self._keras_step, self._in_fit_epoch = None, False
            self._pool.cancel()
            return
        self._current += len(self.plan)
        self._read_current = False

    def close(self) -> None:
        """Stops the threads or processes reading ahead (they also stop when the sequence is
        garbage-collected, and at exit)."""
        self._pool.close()

    @property
    def epoch(self) -> int:
        """The data epoch being read (of a stream resumed mid-epoch, the epoch of batch 0)."""
        return self.step // len(self.plan)

    @property
    def step(self) -> int:
        """Global step of the batch 0 being read: of the Keras epoch in progress, else of the
        current epoch."""
        return self._current if self._keras_step is None else self._keras_step

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of data epoch ``epoch``: the next epoch Keras begins reads it, and
        the following ones continue from there; so do custom loops."""
        self.restore((epoch, 0))

    def position(self, batches_done: int = 0) -> dict:
        """The resumable position after ``batches_done`` batches of the current epoch (a JSON-able dict)."""
        return self.plan.sampler.position(self.step + batches_done)

    def restore(self, position: Any) -> None:
        """Continues at ``position`` (a :meth:`position` dict, ``(epoch, batch)`` or a global step):
        the next epoch Keras begins reads from that batch on, straight into the following epoch,
        and so does a custom loop."""
        step = self.plan.sampler.step_of(position)
        self._current, self._read_current, self._resume_at, self._anchor = step, False, step, None


def _refuse_inexact_fit(call: kerasfit.KerasCall, batches: int) -> None:
    arguments = call.arguments
    refuse_generator_as_validation(call)
    if arguments.get("steps_per_epoch") is not None:
        raise ValueError(f"model.fit(ShardSequence, steps_per_epoch={arguments['steps_per_epoch']}): a Keras epoch "
                         f"is one pass over the sequence ({batches} batches), so the data epochs would not line up "
                         "with Keras's; leave steps_per_epoch out, and for shorter epochs train on a view "
                         "(ds.head(n), ds.split(...))")
    if arguments.get("shuffle", False):
        raise ValueError("model.fit(ShardSequence, shuffle=True) (Keras's default): Keras would reorder whole "
                         "batches with Python's random module, so a run would neither follow the sampler's order "
                         "nor be reproducible; pass shuffle=False to fit (the sequence already shuffles every "
                         "sample each epoch)")


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` that also records how many batches were trained, so
    that a restarted ``fit`` continues the data stream with the very next batch instead of
    replaying the interrupted epoch from its start (Keras 3 restores the weights saved mid-epoch
    but restarts the epoch) or skipping it.

    ``data``: the :class:`ShardSequence` passed to ``fit`` (it is repositioned when training
    begins). For a generator, build it after this callback and start it where the backup says:
    ``ds.batches(..., start=backup.step)``. Either way the stream must start at step 0 when the
    run starts from scratch.

    The step count is stored in Keras's own ``training_metadata.json`` (so ``double_checkpoint``
    stays consistent). After a mid-epoch restart Keras restarts epoch ``e`` with a full epoch of
    steps; the stream continues where it was, so that and later Keras epochs end the same number
    of batches into the data epochs, and the callback stops training once the total number of
    batches of an uninterrupted ``fit`` (``epochs * steps_per_epoch``) has been trained: the
    model sees exactly the batches, in the order, of an uninterrupted run."""

    STEP_KEY = "shardfeed_step"

    def __init__(self, backup_dir: str, data: Optional[ShardSequence] = None, save_freq: Any = "epoch",
                 double_checkpoint: bool = False, delete_checkpoint: bool = True):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=double_checkpoint,
                         delete_checkpoint=delete_checkpoint)
        if data is not None and not isinstance(data, ShardSequence):
            raise TypeError("data must be the ShardSequence passed to fit (for a generator, pass "
                            "start=backup.step to batches() instead)")
        self.data = data
        self._metadata_path = getattr(self, "_training_metadata_path",
                                      os.path.join(backup_dir, "training_metadata.json"))
        saved = self._saved_step()
        self.step: int = 0 if saved is None else saved
        """Batches trained before the backup being restored (0 when there is none): a generator's ``start``."""
        self._trained = self.step
        self._restored = saved is not None
        self._epoch_start: Optional[int] = None

    def _read_metadata(self) -> Optional[dict]:
        try:
            with open(self._metadata_path, "r", encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _saved_step(self) -> Optional[int]:
        metadata = self._read_metadata()
        if metadata is None:
            return None
        step = metadata.get(self.STEP_KEY)
        if step is None:
            warnings.warn(f"{self._metadata_path} has no {self.STEP_KEY!r} (a backup not written by "
                          "shardfeed.keras.BackupAndRestore, or interrupted while being written): the data "
                          "stream restarts at the beginning of the saved epoch", RuntimeWarning, stacklevel=3)
            return None
        return int(step)

    def on_train_begin(self, logs: Any = None) -> None:
        super().on_train_begin(logs)  # restores the weights and the epoch, if there is a backup
        saved = self._saved_step()  # double_checkpoint may have fallen back to the previous backup
        if saved is not None:
            self.step = self._trained = saved
            self._restored = True
        if self.data is not None and self._restored:
            self.data.restore(self._trained)  # the next Keras epoch continues the stream there
        self._epoch_start = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.data is not None:
            self._epoch_start = self.data.step_for_epoch(epoch)
        elif self._restored:
            self._epoch_start = self._trained  # a generator started at the backup's step
        else:
            steps = self.params.get("steps") or 0
            self._epoch_start = max(self._trained, epoch * steps)
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._trained = self._epoch_start + batch + 1
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        if self._restored and steps and epochs and self._trained >= epochs * steps and batch + 1 < steps:
            self.model.stop_training = True  # a restarted run has trained as many batches as a whole one
        super().on_train_batch_end(batch, logs)

    def _save_model(self) -> None:
        super()._save_model()
        metadata = self._read_metadata() or {}
        metadata[self.STEP_KEY] = self._trained
        temporary = self._metadata_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(metadata, f)
        os.replace(temporary, self._metadata_path)
