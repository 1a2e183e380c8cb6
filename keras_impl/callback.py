"""``BackupAndRestore`` for Keras 3 on TensorFlow: Keras's callback hooks mapped to the lifecycle.

on_train_begin       lifecycle.start (restore), then tell ``fit`` where to start
first train step     (resumed inside an epoch) put back the metrics, skip the batches already trained
on_epoch_begin       drop what was set on the model; note the epoch's first step and host RNG states
on_train_batch_end   lifecycle.backup when ``save_freq=N`` optimizer steps have run; then, if a
                     preemption signal came, back up this step (unless just done) and stop
on_epoch_end         lifecycle.backup when ``save_freq="epoch"``; then the same preemption check
on_train_end         the same check; else lifecycle.finish(success=True): delete the backup (if
                     asked), unlock, remove the signal handlers

``on_train_batch_end`` runs once per ``steps_per_execution`` batches: that is the step boundary.
A preemption stop logs one warning, releases everything (handlers, lock; the backup stays) and
raises ``TrainingPreempted``: uncaught, the process exits with code 143.

Keras has no hook for an exception inside ``fit``: the backup stays, and the lock is taken over
by the next ``fit`` in this thread (or dropped by the kernel when the process dies); the signal
handlers hand any later signal to those they replaced (see :mod:`keras_impl.preemption`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from keras_impl import pipeline, rng
from keras_impl.preemption import FitWatch
from keras_impl.state import KerasTrainingState
from unified_backup import Counters, Manifest
from unified_backup.callback import BackupCallback
from unified_backup.errors import CorruptBackupError, UnsupportedEnvironmentError
from unified_backup.preemption import TrainingPreempted, stop_message

log = logging.getLogger(__name__)


class BackupAndRestore(BackupCallback, keras.callbacks.Callback):
    __doc__ = BackupCallback.__doc__

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int = "epoch",
        delete_checkpoint: bool = True,
        save_before_preemption: bool | Sequence[str | int] = False,
        *,
        on_write_error: str = "raise",
        keep_previous: bool = False,
    ) -> None:
        super().__init__(
            backup_dir,
            save_freq,
            delete_checkpoint,
            save_before_preemption,
            on_write_error=on_write_error,
            keep_previous=keep_previous,
        )
        if not tf.executing_eagerly():
            raise UnsupportedEnvironmentError(
                "BackupAndRestore needs TensorFlow's eager execution, but it is disabled (found "
                "tf.compat.v1.disable_eager_execution() or graph mode). Keras 3 trains eagerly: remove "
                "the call that disables eager execution."
            )
        self._state: KerasTrainingState | None = None
        self._epoch = 0
        self._epoch_start = (0, 0)  # (optimizer steps, batches) when the current epoch began
        self._resume_start: tuple[int, int] | None = None  # the resumed epoch's, until it begins
        self._last_backup_step = 0
        self._committed: Counters | None = None  # what the slot holds, as far as this fit knows
        self._watch: FitWatch | None = None
        self._input = pipeline.UNKNOWN

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        _require_single_worker(self.model)
        if self._options.preemption_signals:
            FitWatch.check_installable()  # fit may run in another thread than the constructor did
        _FirstSteps.remove(self.model)  # left by a fit that raised before its first steps ended
        self._uninstall()  # left by a fit that raised
        self._input = pipeline.inspect_fit_input()
        self._state = KerasTrainingState(self.model)
        self._resume_start = None
        self._committed = None
        # Without a strategy, fit builds the model in its first step. To restore now, before the input
        # draws the epoch's order, build it as fit does under a strategy; where the input's structure is
        # unknown, restore at the first step (before it trains), but tell fit now where to start.
        peeked = None if self.model.built else self._lifecycle.peek(self._state.framework)
        if peeked is not None and self._input.element_spec is not None:
            self.model._symbolic_build(data_batch=self._input.element_spec)
        if self.model.built or peeked is None:
            self._restore()
        else:
            self._resume_at(peeked)
            _FirstSteps(self.model, lambda iterator: self._restore(iterator, expected=peeked))
        if self._options.preemption_signals:
            self._watch = FitWatch(self._options.preemption_signals, self)
            self._watch.install()

    def _restore(self, iterator: Any = None, expected: Manifest | None = None) -> int:
        """Build what is not built yet, then restore the backup; return the batches to skip."""
        model = self.model
        if iterator is not None:
            model._symbolic_build(data_batch=iterator.element_spec)  # what fit does under a strategy
        if model.built and not model.optimizer.built:  # as the first optimizer step would
            with model.distribute_strategy.scope():
                model.optimizer.build(model.trainable_variables)
        assert self._state is not None
        manifest = self._lifecycle.start(self._state)
        self._last_backup_step = self._state.global_step
        self._committed = None if manifest is None else manifest.counters
        if expected is not None and (manifest is None or manifest.counters != expected.counters):
            raise CorruptBackupError(
                f"The backup in {self.backup_dir} changed while fit was starting (expected counters "
                f"{expected.counters}, found {manifest and manifest.counters}). Expected one training per "
                "backup_dir; run fit again."
            )
        if manifest is None:
            return 0
        skip = self._state.restored_batch_in_epoch  # batches, not optimizer steps (gradient accumulation)
        steps, batches = self._state.position
        self._resume_start = (steps - manifest.step_in_epoch, batches - skip)
        if iterator is None:  # else on_train_begin did it from the same manifest
            self._resume_at(manifest)
        else:  # the resumed epoch has begun
            self._epoch_start, self._resume_start = self._resume_start, None
        self._report_input(manifest, skip)
        if not skip:
            return 0
        if iterator is None:
            _FirstSteps(model, lambda iterator: self._continue_epoch(iterator, manifest, skip))
            return skip
        return self._continue_epoch(iterator, manifest, skip)

    def _continue_epoch(self, iterator: Any, manifest: Manifest, skip: int) -> int:
        """At the resumed epoch's first step (``fit`` has reset the metrics): put the metrics'
        accumulators back, so the epoch's mean loss counts the batches trained before the backup;
        return how many batches to skip."""
        compile_metrics = getattr(self.model, "_compile_metrics", None)
        if compile_metrics is not None and not compile_metrics.built:  # fit builds them in this step
            self.model._symbolic_build(data_batch=iterator.element_spec)
        assert self._state is not None
        if not self._state.restore_metrics():
            log.warning(
                "The metrics of the backup do not match the compiled metrics; the metrics that fit reports "
                "for epoch %d cover only its batches after the resume.",
                manifest.epoch,
            )
        return skip

    def _report_input(self, manifest: Manifest, skip: int) -> None:
        """Say once whether the resumed run reads the data in the uninterrupted run's order."""
        assert self._state is not None
        seeds = self._state.restored_tf_seed, rng.tf_global_seed()
        log.log(*self._input.resume_message(manifest.epoch, skip, *seeds))

    def _resume_at(self, manifest: Manifest) -> None:
        # fit reads `self._initial_epoch or initial_epoch` right after on_train_begin; _Epoch(0) is true.
        self.model._initial_epoch = _Epoch(manifest.epoch)
        self._epoch = manifest.epoch

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.model._initial_epoch = None
        if self._resume_start is not None and epoch == self._epoch:
            self._epoch_start = self._resume_start
        else:
            self._epoch_start = self._state.position if self._state else (0, 0)
        self._resume_start = None
        self._epoch = epoch
        if self._state is not None:
            self._state.epoch_began()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._state is None:
            return
        if self._options.step_backup_due(self._state.global_step, self._last_backup_step):
            self._backup(ended=False)
        self._stop_if_preempted(ended=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._state is not None and self._options.per_epoch:
            self._backup(ended=True)
        self._stop_if_preempted(ended=True)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._stop_if_preempted(ended=True)  # came after the last check: the restart resumes at the end
        self._release(success=True)

    def _position(self, ended: bool) -> tuple[Counters, int]:
        """The counters of this instant, and the batches trained in the epoch they name."""
        assert self._state is not None
        step, batches = self._state.position
        in_steps, in_batches = step - self._epoch_start[0], batches - self._epoch_start[1]
        total = self.params.get("steps")
        if (total and in_batches >= total) or (ended and not (self.model.stop_training and total)):
            return Counters(self._epoch + 1, 0, step), 0  # the epoch's last batch
        return Counters(self._epoch, in_steps, step), in_batches

    def _backup(self, ended: bool) -> None:
        """Back up now: at a batch end, or at the epoch's end (``ended``; maybe stopped inside it)."""
        assert self._state is not None
        counters, in_batches = self._position(ended)
        self._state.record(counters, in_batches)
        if self._lifecycle.backup(self._state, counters) is not None:
            self._committed = counters
        self._last_backup_step = counters.global_step

    def _stop_if_preempted(self, ended: bool) -> None:
        """At a step boundary: once a preemption signal came, back up this step and stop ``fit``."""
        watch = self._watch
        if watch is None or self._state is None or not watch.agreed(self._lifecycle.coordinator):
            return
        try:
            step = self._state.global_step
            if self._committed is None or self._committed.global_step != step:
                self._backup(ended)
            committed = self._committed is not None and self._committed.global_step == step
            cause = watch.received.name if watch.received else "a preemption signal"
            message = stop_message(cause, self._position(ended)[0], self.backup_dir, committed)
            log.warning(message)
        finally:
            self._release(success=False)
        raise TrainingPreempted(message)

    def _release(self, success: bool) -> None:
        """End the fit: nothing of ours stays on the model, the handlers go, the lifecycle finishes."""
        self.model._initial_epoch = None
        _FirstSteps.remove(self.model)
        self._state = None
        self._uninstall()
        self._lifecycle.finish(success=success)

    def _uninstall(self) -> None:
        if self._watch is not None:
            self._watch.uninstall()
            self._watch = None


class _Epoch(int):
    """An epoch index that is true even when 0, so that ``fit`` prefers it to its ``initial_epoch``."""

    def __bool__(self) -> bool:
        return True


class _FirstSteps:
    """Stands in for ``model.train_function`` during the first steps of a resumed ``fit``.

    Its first call runs ``prepare(iterator)`` (a restore that had to wait for the model to be
    built, or the metrics' accumulators put back after ``fit`` reset them for the resumed epoch),
    which returns how many batches the backup had already trained in this epoch. ``fit``
    calls ``model.train_function(iterator)`` once per ``steps_per_execution`` batches; each call
    here then reads that many batches without training and returns the (reset) metrics, until the
    count is reached and the model's own function is put back. If ``steps_per_execution`` changed
    since the backup so that the count does not divide, the straddling call reads the rest and then
    trains; the epoch's input then ends inside its last call, so every batch is still trained once.
    """

    def __init__(self, model: keras.Model, prepare: Callable[[Any], int]) -> None:
        self.model = model
        self.original = model.train_function
        self.prepare = prepare
        self.remaining = 0
        self.iterator: Any = None
        model.train_function = self

    def __call__(self, iterator: Any) -> Any:
        if self.iterator is None:
            self.iterator = iterator
            self.remaining = self.prepare(iterator)
        if self.remaining <= 0 or iterator is not self.iterator:  # done, or a later epoch or fit
            _FirstSteps.remove(self.model)
            return self.original(iterator)
        per_call = self.model.steps_per_execution
        skipped = min(per_call, self.remaining)
        for _ in range(skipped):
            next(iterator)
        self.remaining -= skipped
        if self.remaining <= 0:
            _FirstSteps.remove(self.model)
        if skipped < per_call:
            return self.original(iterator)
        return self.model.get_metrics_result()

    @staticmethod
    def remove(model: keras.Model) -> None:
        """Put the model's own train function back, if a stand-in is there."""
        stand_in = getattr(model, "train_function", None)
        if isinstance(stand_in, _FirstSteps):
            model.train_function = stand_in.original


def _require_single_worker(model: keras.Model) -> None:
    """Refuse multi-worker strategies: Keras 3 ``fit`` does not run under them (keras#20585)."""
    strategy = model.distribute_strategy
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    workers = sum(len(spec.get(job, ())) for job in ("chief", "worker"))
    if workers > 1 or not strategy.extended.should_checkpoint:
        raise UnsupportedEnvironmentError(
            f"BackupAndRestore for Keras 3 supports single-process training (no strategy, MirroredStrategy, "
            f"OneDeviceStrategy); found {type(strategy).__name__} with {workers} workers. Keras 3's fit does "
            "not train under multi-worker strategies; train in one process per backup_dir."
        )
