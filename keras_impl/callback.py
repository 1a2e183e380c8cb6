"""``BackupAndRestore`` for Keras 3 on TensorFlow and for tf_keras: the hooks translated into lifecycle calls.

One class serves both Keras flavours; the model ``fit`` trains tells which (see :mod:`keras_impl.flavour`).

Hook -> lifecycle::

    on_train_begin      open: lock and verify; restore now, or at the first step when only that step
                        can build the model (see resume.py); install the preemption watch
    on_epoch_begin      note where the epoch begins (optimizer steps, batches)
    on_train_batch_end  boundary(step): a backup every save_freq=N optimizer steps; a preemption stop
    on_epoch_end        boundary(epoch end): the backup of save_freq="epoch"; a preemption stop;
                        note the host RNG states the next epoch's input will draw from
    on_train_end        boundary: a signal that came after the last epoch's still stops (exit code
                        143); else finish(success=True): delete the backup (if asked), unlock

``on_train_batch_end`` runs once per ``steps_per_execution`` batches: that is the step boundary.
After a step-level resume, the batches read again without training fire no batch hook, ours or
any other callback's (see resume.py).
Keras has no hook for an exception inside ``fit``: the backup stays, and the lock is taken over
by the next ``fit`` in this thread (or dropped by the kernel when the process dies); the signal
handlers hand any later signal to those they replaced (see :mod:`keras_impl.preemption`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import tensorflow as tf

from keras_impl import _private, callback_state, flavour, resume, strategies
from keras_impl.coordinator import coordinator_of
from keras_impl.preemption import FitWatch
from keras_impl.state import KerasTrainingState
from unified_backup.callback import BackupCallback
from unified_backup.errors import UnsupportedEnvironmentError


class BackupAndRestore(BackupCallback, _private.TfKerasHooks, keras.callbacks.Callback):
    __doc__ = BackupCallback.__doc__

    _resume: resume.Resume | None = None  # of the running fit
    _kind: flavour.Keras3 = flavour.Keras3()  # of the running (or last) fit
    _epoch_begun = False  # the running fit began an epoch: every other on_train_begin has run

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not tf.executing_eagerly():
            raise UnsupportedEnvironmentError(
                "BackupAndRestore needs TensorFlow's eager execution, but it is disabled (found "
                "tf.compat.v1.disable_eager_execution() or graph mode). Keras 3 trains eagerly: remove "
                "the call that disables eager execution (tf_keras: tf.compat.v1.enable_eager_execution())."
            )

    __init__.__signature__ = BackupCallback.__init__.__signature__  # type: ignore[attr-defined]

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        signals = self._options.preemption_signals
        if signals:
            FitWatch.check_installable()  # fit may run in another thread than the constructor did
        kind = self._kind = flavour.of(self.model)
        callback_list = _private.fit_callback_list(self)
        callbacks = list(callback_list.callbacks) if callback_list is not None else []
        kind.check_alone(self.model, callbacks)
        distribution = self.model.distribute_strategy
        strategies.check(
            distribution,
            kind,
            per_epoch=self._options.per_epoch or not self._options.periodic,
            background=self._options.async_backup,
        )
        if self._options.async_backup and _private.keeps_slot_variables(self.model.optimizer):
            name = type(self.model.optimizer).__name__
            raise UnsupportedEnvironmentError(
                f"async_backup=True cannot take a snapshot of {name}: a legacy "
                "optimizer (tf_keras.optimizers.legacy) keeps its slot variables outside the checkpoint's "
                "object graph. Use the current optimizer (e.g. tf_keras.optimizers.Adam), or pass "
                "async_backup=False."
            )
        resume.clear(self.model)  # left by a fit that raised
        state = KerasTrainingState(self.model, kind)
        state.callbacks = [callback for callback in callbacks if callback is not self]
        with contextlib.suppress(AttributeError, KeyError):  # a state made in on_train_begin: checked later
            callback_state.capture(state.callbacks)  # a state that is not JSON fails now, not at a backup
        _private.run_last(self)  # our backups see what the others did at the same step or epoch end
        self._epoch_begun = False
        self._resume = fit = resume.Resume(state, kind.inspect_fit_input(), callback_list)
        opened = self._lifecycle.open(state, coordinator_of(distribution))
        if fit.restore_now(opened):
            self._restore()
        else:
            fit.defer(opened, self._restore)  # type: ignore[arg-type]
        if signals:
            watch = FitWatch(signals, self)
            watch.install()
            self._lifecycle.watch(watch)

    def _restore(self, iterator: Any = None) -> int:
        """Build what is not built yet, restore the backup, and return the batches to skip."""
        assert self._resume is not None
        self._resume.build(iterator)
        skip = self._resume.restored(self._lifecycle.restore(), iterator)
        if self._epoch_begun:  # a restore at the first step: the other callbacks are set up already
            self._restore_callbacks()
        return skip

    def _restore_callbacks(self) -> None:
        """Hand the other callbacks their backed-up state, once their ``on_train_begin`` reset them."""
        state = self._resume.state if self._resume is not None else None
        if state is not None and state.restored_callbacks:
            callback_state.apply(state.callbacks, state.restored_callbacks)
            state.restored_callbacks = {}

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._resume is not None:
            self._resume.epoch_begin(epoch)
        if not self._epoch_begun:
            self._epoch_begun = True
            self._restore_callbacks()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._boundary(ended=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._boundary(ended=True, epoch_end=True)
        if self._resume is not None:
            self._resume.epoch_end()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._boundary(ended=True)  # nothing is due any more; a signal since the last boundary stops
        self._end(success=True)

    def _boundary(self, ended: bool, epoch_end: bool = False) -> None:
        if self._resume is None or not self._lifecycle.running:
            return
        try:
            self._lifecycle.boundary(
                self._resume.position(ended, self.params.get("steps")), epoch_end=epoch_end
            )
        except BaseException:
            if not self._lifecycle.running:  # a preemption stop ended the fit: nothing of ours stays
                self._end(success=False)
            raise

    def _announce(self, line: str) -> None:
        self._kind.print_msg(line)

    def release(self) -> None:
        self._end(success=False)

    release.__doc__ = BackupCallback.release.__doc__

    def _end(self, success: bool) -> None:
        if self.model is not None:
            resume.clear(self.model)
        self._resume = None
        self._lifecycle.finish(success=success)
