"""``BackupAndRestore`` for Lightning: Trainer hooks translated into lifecycle calls.

One mixin holds the logic; ``lightning_impl.BackupAndRestore`` (``lightning.pytorch``) and
``lightning_impl.pl.BackupAndRestore`` (``pytorch_lightning``) add it to each namespace's Callback.

Hook -> lifecycle::

    on_fit_start          start: lock, verify, fingerprint, load model, datamodule and callbacks;
                          Lightning restores optimizers, LR schedulers and loops right after
    on_train_start        the restore is complete: position the data (exact.py); take the signals over
    on_train_batch_end    boundary(step), after each optimizer step but an epoch's last ...
    on_validation_end     ... or here, when a validation runs right after that batch (see below)
    on_train_epoch_end    the epoch is closing ...
    on_train_epoch_start  ... boundary(epoch end) once it has closed (see below), or in on_train_end
    on_fit_end            finish(success=True): delete the backup (delete_checkpoint)
    on_exception          finish(success=False): keep the backup (Ctrl-C, preemption included)

Why an epoch's boundary waits for the next epoch's start: Lightning runs EarlyStopping's and
ModelCheckpoint's ``on_train_epoch_end`` after every other callback's, and steps ReduceLROnPlateau
after that. A backup taken in ``on_train_epoch_end`` would miss the epoch's early-stopping check and
plateau step, and a resumed run would train one epoch more than an uninterrupted one.

Why a step's boundary waits for a validation that follows its batch: Lightning resumes a checkpoint
from ``on_train_batch_end`` as if that validation had run, and skips it; a backup taken before it
would leave the validation's random draws, and its hooks' state, out of the resumed run.

A preemption stop raises ``TrainingPreempted``, here also an instance of Lightning's
``SIGTERMException`` so that ``on_exception`` code written for it still runs.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning_impl import _private
from lightning_impl.coordinator import LightningCoordinator
from lightning_impl.preemption import LightningWatch
from lightning_impl.state import LightningState
from unified_backup.callback import BackupCallback
from unified_backup.errors import InvalidArgumentError
from unified_backup.state import Position


class BackupAndRestoreMixin(BackupCallback):
    __doc__ = BackupCallback.__doc__  # NOTE: every rank runs the hooks; only global rank 0 commits.

    framework_version = "unknown"  # each namespace's class names its Lightning
    # Where Lightning's rank-zero info goes ("Restoring states from the checkpoint path ..."), shown by
    # the handler Lightning adds to its namespace's logger. Named per namespace: rank_zero_info itself
    # writes to the logger of whichever namespace was imported last (lightning_utilities is shared).
    _message_logger = "lightning.pytorch.utilities.rank_zero"
    _namespace = "lightning.pytorch"  # the namespace whose Trainer this class serves
    _import = "from lightning_impl import BackupAndRestore"
    _trainer_class: Any = None  # that namespace's Trainer

    # What one fit keeps between hooks (class-level: the values before the first fit).
    _state: LightningState | None = None
    _watch: LightningWatch | None = None
    _epoch_first_step = 0  # global step when the epoch in progress began
    _step_seen = 0  # global step at the last batch end: did this batch step?
    _after_validation: Position | None = None  # a step boundary waiting for its validation
    _epoch_closing = False  # an epoch ended in this fit; its boundary is still to come

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_namespace(trainer)
        self._state = LightningState(trainer, self.framework_version)
        signals = self._options.preemption_signals
        self._watch = LightningWatch(signals, trainer) if signals else None  # before Lightning's handlers
        self._after_validation, self._epoch_closing = None, False
        self._lifecycle.start(self._state, LightningCoordinator(trainer))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        restored = self.restored
        if restored is not None:
            self._state_of(trainer).train_start()
        self._lifecycle.training_starts(trainer.global_step)  # loops restored now, also from fit(ckpt_path=)
        self._step_seen = trainer.global_step
        self._epoch_first_step = trainer.global_step - (restored.step_in_epoch if restored else 0)
        if self._watch is not None:
            self._watch.take_over()
            self._lifecycle.watch(self._watch)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._state_of(trainer).exact.epoch_start(trainer)
        self._epoch_closed(trainer, preemption=True)
        self._epoch_first_step = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._state_of(trainer).exact.batch_start()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._state_of(trainer).exact.batch_end(trainer)
        step, stepped = trainer.global_step, trainer.global_step != self._step_seen
        self._step_seen = step
        if not stepped or batch_idx + 1 >= trainer.num_training_batches:  # the last: the epoch's close
            return
        position = Position(trainer.current_epoch, step - self._epoch_first_step, step, batch_idx + 1)
        if _private.validation_follows(trainer):
            self._after_validation = position
        else:
            self._lifecycle.boundary(position, preemption=not _max_steps_reached(trainer))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        position, self._after_validation = self._after_validation, None
        if position is not None and not trainer.sanity_checking:
            self._lifecycle.boundary(position, preemption=not _max_steps_reached(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_closing = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_closed(trainer, preemption=False)  # no step follows: a signal now only gets a warning

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._end(success=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end(success=False)

    def _announce(self, line: str) -> None:
        logging.getLogger(self._message_logger).info(line)  # the lifecycle calls it on global rank 0 only

    def release(self) -> None:
        self._end(success=False)

    release.__doc__ = BackupCallback.release.__doc__

    def _check_namespace(self, trainer: Any) -> None:
        """Refuse a Trainer of the other namespace: its hooks would run, but its state is not ours."""
        if self._trainer_class is None or isinstance(trainer, self._trainer_class):
            return
        roots = [cls.__module__.split(".")[0] for cls in type(trainer).__mro__]  # a user's subclass too
        found = [{"lightning": "lightning.pytorch"}.get(root, root) for root in roots]
        right = [imp for namespace, imp in NAMESPACES if namespace in found]
        hint = f" Use `{right[0]}` with it." if right else ""
        raise InvalidArgumentError(
            f"Expected a {self._namespace} Trainer for this BackupAndRestore (`{self._import}`), found a "
            f"{type(trainer).__module__}.{type(trainer).__qualname__}: its hooks would run, but on state "
            f"this callback cannot see.{hint}"
        )

    def _epoch_closed(self, trainer: Any, preemption: bool) -> None:
        """The boundary of the epoch that ended in this fit, now that every epoch-end hook has run."""
        if self._epoch_closing:
            self._epoch_closing = False
            position = Position.epoch_end(trainer.current_epoch, trainer.global_step)
            self._lifecycle.boundary(position, epoch_end=True, preemption=preemption)

    def _state_of(self, trainer: Any) -> LightningState:
        assert self._state is not None and self._state.trainer is trainer, "on_fit_start did not run"
        return self._state

    def _end(self, success: bool) -> None:
        try:
            self._lifecycle.finish(success)
        finally:
            if self._state is not None:
                self._state.exact.close()
                _private.end_fit(self._state.trainer)
            self._state = self._watch = self._after_validation = None
            self._epoch_closing = False


NAMESPACES = (  # (namespace, the import of its callback)
    ("lightning.pytorch", "from lightning_impl import BackupAndRestore"),
    ("pytorch_lightning", "from lightning_impl.pl import BackupAndRestore"),
)


def _max_steps_reached(trainer: Any) -> bool:
    return trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
