"""Keras integration: :class:`ShardSequence` (a ``keras.utils.PyDataset``) and
:class:`BackupAndRestore` (Keras's callback, plus the position in the data stream).

Importing this module imports Keras; ``import shardfeed`` does not.
"""

from __future__ import annotations

import json
import operator
import os
import warnings
from typing import Any, Optional

try:
    import keras
except ImportError as exc:  # the Pillow way: say which extra brings it
    raise ImportError(f"shardfeed.keras needs Keras 3 ({exc}): pip install 'shardfeed[tensorflow]'") from exc

from .loader import BatchPlan, FeedOptions

__all__ = ["BackupAndRestore", "ShardSequence"]


class ShardSequence(keras.utils.PyDataset):
    """A Keras ``PyDataset`` (``keras.utils.Sequence``) of batches of a dataset or view: pass it to
    ``model.fit`` as ``x`` or ``validation_data``, and to ``evaluate``/``predict``.

    The options are the :class:`~shardfeed.loader.FeedOptions` (``inputs`` and ``targets`` may
    also be given by position): ``inputs``, ``targets`` and ``sample_weights`` (a field name, a
    list, or a dict of model input/output name -> field), ``shuffle``, ``seed``, ``shuffle_block``,
    ``drop_remainder``, ``transform``, ``dtype`` and the other read options.
    ``workers``, ``use_multiprocessing`` and ``max_queue_size`` go to ``PyDataset`` (Keras reads
    batches on that many threads or processes; with processes the sequence is pickled, its
    dataset reopened by path, so ``transform`` must be picklable).

    ``len(seq)`` is the number of batches per epoch. Batch ``i`` is a pure function of
    ``(seed, epoch, i)`` and ``__getitem__`` is thread-safe. The epoch advances when Keras ends
    an epoch it began: Keras 3 calls ``on_epoch_end`` once more than ``on_epoch_begin`` (before
    training), and calls ``__getitem__(0)`` and ``(1)`` first to infer types, neither of which
    moves the order; ``set_epoch(e)`` sets it by hand. With ``shuffle=False`` (validation data)
    every run reads the same batches from batch 0.

    Pass ``shuffle=False`` to ``model.fit`` itself: the sequence already shuffles every sample
    each epoch, and Keras's default ``shuffle=True`` would also reorder whole batches with
    Python's global ``random`` state, which makes runs irreproducible and defeats exact resume.
    Don't pass ``steps_per_epoch`` either: one Keras epoch is one pass over the sequence."""

    def __init__(self, source: Any, batch_size: int, inputs: Any = None, targets: Any = None, *,
                 workers: int = 1, use_multiprocessing: bool = False, max_queue_size: int = 10, **options: Any):
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        options = FeedOptions.from_kwargs("ShardSequence()", dict(options, inputs=inputs, targets=targets))
        self.plan = BatchPlan(source, batch_size, options)
        if len(self.plan) == 0:
            raise ValueError(f"no batches: {self.plan.sampler.samples} samples with batch_size {batch_size} "
                             f"and drop_remainder={options.drop_remainder}")
        self._base = 0  # global step of the current epoch's batch 0
        self._in_epoch = False

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> Any:
        index = operator.index(index)
        if not 0 <= index < len(self.plan):
            raise IndexError(f"batch {index} is out of range: the sequence has {len(self.plan)} batches")
        return self.plan.load(self._base + index)

    def __repr__(self) -> str:
        return (f"<shardfeed.keras.ShardSequence {len(self)} batches of {self.plan.sampler.batch_size} from "
                f"{self.plan.view!r}, epoch {self.epoch}>")

    def on_epoch_begin(self) -> None:
        self._in_epoch = True

    def on_epoch_end(self) -> None:
        if self._in_epoch:  # the extra call Keras makes before training is not the end of an epoch
            self._base += len(self.plan)
            self._in_epoch = False

    @property
    def epoch(self) -> int:
        """The epoch the next ``__getitem__`` calls read (of a stream resumed mid-epoch, the epoch of batch 0)."""
        return self._base // len(self.plan)

    @property
    def step(self) -> int:
        """Global step of this epoch's batch 0."""
        return self._base

    def set_epoch(self, epoch: int) -> None:
        self._base = self.plan.sampler.step_of((epoch, 0))
        self._in_epoch = False

    def position(self, batches_done: int = 0) -> dict:
        """The resumable position after ``batches_done`` batches of the current epoch (a JSON-able dict)."""
        return self.plan.sampler.position(self._base + batches_done)

    def restore(self, position: Any) -> None:
        """Continues at ``position`` (a :meth:`position` dict, ``(epoch, batch)`` or a global step):
        the next epoch Keras begins reads from that batch on, straight into the following epoch."""
        self._base = self.plan.sampler.step_of(position)
        self._in_epoch = False


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
        if self.data is not None:
            if self._restored:
                self.data.restore(self._trained)
            else:
                self._trained = self.data.step
        self._epoch_start = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if not self._restored and self._epoch_start is None:
            steps = self.params.get("steps")
            if steps:
                self._trained = max(self._trained, epoch * steps)
        self._epoch_start = self._trained
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
