"""``BackupAndRestore`` for Lightning: Trainer hooks mapped to the core lifecycle.

One mixin holds the logic; ``lightning_impl.BackupAndRestore`` (``lightning.pytorch``) and
``lightning_impl.pl.BackupAndRestore`` (``pytorch_lightning``) add it to each namespace's Callback.

Hook -> lifecycle::

    on_fit_start          start(state): lock, verify, check the fingerprint, load model, datamodule and
                          callbacks; Lightning restores optimizers, LR schedulers and loops right after
    on_train_start        the restore is done: a mid-epoch resume positions the data (see exact.py);
                          save_before_preemption: the watch takes its signals over (see preemption.py)
    on_train_batch_end    save_freq=N: backup() once N optimizer steps have run since the last backup ...
    on_validation_end     ... or here, when a validation runs right after that batch (see below)
    on_train_epoch_end    save_freq="epoch": the epoch's backup is now due ...
    on_train_epoch_start  ... and taken here, or in on_train_end after the last epoch: once the epoch is
    on_train_end          closed (see below); the preemption watch is removed
    on_fit_end            finish(success=True): delete the backup (delete_checkpoint)
    on_exception          finish(success=False): keep the backup (Ctrl-C, preemption included)

Preemption: every step boundary where a step backup could be taken (after an optimizer step, after
the validation that follows it, after an epoch closed) asks all processes whether one received a
signal; if so, each one backs up that step (the same path as step backups, so the resume is exact),
logs one line, releases the folder and raises ``TrainingPreempted`` (exit code 143), also an
instance of Lightning's ``SIGTERMException`` so that ``on_exception`` code written for it still runs.

Why not back up in ``on_train_epoch_end``: Lightning runs EarlyStopping's and ModelCheckpoint's
``on_train_epoch_end`` after every other callback's, and steps ReduceLROnPlateau after that. A
backup taken there misses the epoch's early-stopping check and plateau step, and a resumed run
trains one epoch more than an uninterrupted one. The backup of a closed epoch is saved with the
epoch counters of a checkpoint that Lightning resumes at the first batch of the next epoch
(``_private.mark_epoch_closed``).

Why a step backup waits for a validation that follows its batch: Lightning resumes a checkpoint
from ``on_train_batch_end`` as if that validation had run, and skips it; a backup taken before it
would leave the validation's random draws, and its hooks' state, out of the resumed run.

Random-number states, the data position and the epoch's logged aggregates (``exact.py``) travel in
the same checkpoint, under the ``"unified_backup"`` key, so that a resumed run changes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from lightning_impl import _private
from lightning_impl.coordinator import LightningCoordinator
from lightning_impl.exact import ExactResume
from lightning_impl.preemption import LightningPreemption
from lightning_impl.state import LightningState
from unified_backup.callback import BackupCallback
from unified_backup.coordinator import SingleProcess
from unified_backup.errors import UnsupportedEnvironmentError
from unified_backup.manifest import Counters
from unified_backup.options import EPOCH, RAISE
from unified_backup.preemption import TrainingPreempted, stop_message

log = logging.getLogger(__name__)
_KEY = "unified_backup"  # our entry in the checkpoints we write: {"should_stop": bool, **ExactResume.entry}


def _max_steps_reached(trainer: Any) -> bool:
    return trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps


class BackupAndRestoreMixin(BackupCallback):
    __doc__ = BackupCallback.__doc__  # NOTE: every rank runs the hooks; only global rank 0 commits.

    _framework_version: str = "unknown"
    _preempted: type[TrainingPreempted] = TrainingPreempted  # each namespace adds its SIGTERMException

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int = EPOCH,
        delete_checkpoint: bool = True,
        save_before_preemption: bool | Sequence[str | int] = False,
        *,
        on_write_error: str = RAISE,
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
        self._state: LightningState | None = None
        self._close_pending = False  # an epoch ended (or a due step backup hit its last batch)
        self._saving: str | None = None  # "close" or "step" while our own save runs
        self._saving_batches = 0  # with "step": the training batches the epoch has consumed
        self._after_validation: tuple[Counters, int] | None = None  # a step backup waiting for validation
        self._loading = False  # our own load is running
        self._user_ckpt_path: Any = None
        self._last_backup_step = 0
        self._epoch_first_step = 0
        self._exact = ExactResume()
        self._coordinator: LightningCoordinator | None = None
        self._preemption: LightningPreemption | None = None
        self._step_seen = 0  # global step at the last on_train_batch_end: did this batch step?
        self._committed_step = -1  # global step of the last backup this fit committed
        self._stop_after_validation: tuple[Counters, int] | None = None  # a preemption check waiting
        self._epoch_closed = False  # an epoch ended in this fit: its close is a step boundary

    # -- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.strategy.restore_checkpoint_after_setup:
            raise UnsupportedEnvironmentError(
                f"BackupAndRestore does not support the {type(trainer.strategy).__name__} strategy yet: it "
                "restores checkpoints after setup and writes them sharded (FSDP, DeepSpeed, ModelParallel). "
                "Expected a strategy that writes one checkpoint file from rank 0 (single device, DDP). Use "
                "such a strategy, or remove BackupAndRestore and use Lightning's ModelCheckpoint."
            )
        self._state = LightningState(trainer, self._framework_version)
        self._coordinator = LightningCoordinator(trainer)
        self._lifecycle.coordinator = self._coordinator
        self._user_ckpt_path = trainer.ckpt_path
        self._close_pending = self._epoch_closed = False
        self._exact.fit_start()
        if self._options.preemption_signals:
            self._preemption = LightningPreemption(self._options.preemption_signals)
            self._preemption.fit_start()
        self._loading = True
        try:
            restored = self._lifecycle.start(self._state)
        finally:
            self._loading = False
        if restored is not None and self._user_ckpt_path:
            log.warning(
                "Resumed from the backup in %s, not from fit(ckpt_path=%r): the backup is the later state.",
                self.backup_dir,
                str(self._user_ckpt_path),
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        restored = self.restored
        if restored is not None:
            _private.set_ckpt_path(trainer, self._user_ckpt_path)
            self._exact.train_start(trainer, str(self.backup_dir))
        self._last_backup_step = self._step_seen = trainer.global_step
        self._committed_step = -1
        self._epoch_first_step = trainer.global_step - (restored.step_in_epoch if restored else 0)
        if self._preemption is not None:
            self._preemption.train_start(trainer)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._exact.epoch_start(trainer, str(self.backup_dir))
        preempted = self._epoch_closed and self._preemption_agreed()
        self._epoch_closed = False
        self._close_pending |= preempted
        self._back_up_closed_epoch(trainer)
        if preempted:
            self._stop(Counters(trainer.current_epoch, 0, trainer.global_step))
        self._epoch_first_step = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._exact.batch_start()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._exact.batch_end(trainer)
        step, batches = trainer.global_step, batch_idx + 1
        stepped, self._step_seen = step != self._step_seen, step
        due = self._options.step_backup_due(step, self._last_backup_step)
        if batches >= trainer.num_training_batches:
            self._close_pending |= due  # the epoch's last batch: its boundary is the epoch's close
            return
        check = self._preemption is not None and stepped and not _max_steps_reached(trainer)
        if not (due or check):
            return
        counters = Counters(trainer.current_epoch, step - self._epoch_first_step, step)
        if _private.validation_follows(trainer):  # the boundary is after it
            if due:
                self._after_validation = (counters, batches)
            if check:
                self._stop_after_validation = (counters, batches)
            return
        if due:
            self._back_up(trainer, counters, batches=batches)
        if check:
            self._stop_if_preempted(trainer, counters, batches)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        if self._after_validation is not None:
            (counters, batches), self._after_validation = self._after_validation, None
            self._back_up(trainer, counters, batches=batches)
        if self._stop_after_validation is not None:
            (counters, batches), self._stop_after_validation = self._stop_after_validation, None
            self._stop_if_preempted(trainer, counters, batches)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_closed = True
        if self._options.per_epoch:
            self._close_pending = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._back_up_closed_epoch(trainer)
        if self._preemption is not None:
            self._preemption.train_end()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(success=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(success=False)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._saving is None:
            return
        if self._saving == "close":
            _private.mark_epoch_closed(checkpoint, step_based=trainer.max_steps != -1)
        assert self._coordinator is not None, "on_fit_start did not run"
        exact = self._exact.entry(trainer, self._coordinator.gather, self._saving_batches)
        checkpoint[_KEY] = {"should_stop": bool(trainer.should_stop), **exact}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if not self._loading:
            return
        entry = checkpoint.get(_KEY, {})
        if entry.get("should_stop"):
            trainer.should_stop = True  # an early-stopped run resumes as stopped instead of training on
        self._exact.load(trainer, entry, str(self.backup_dir))

    # -- helpers -----------------------------------------------------------------------------
    def _back_up_closed_epoch(self, trainer: Any) -> None:
        if not self._close_pending:
            return
        self._close_pending = False
        self._back_up(trainer, Counters(trainer.current_epoch, 0, trainer.global_step), "close")

    def _back_up(self, trainer: Any, counters: Counters, kind: str = "step", batches: int = 0) -> None:
        assert self._state is not None, "on_fit_start did not run"
        self._saving, self._saving_batches = kind, batches
        backups = self._lifecycle.stats.backups
        try:
            self._lifecycle.backup(self._state, counters)
        finally:
            self._saving = None
        self._last_backup_step = counters.global_step
        if self._lifecycle.stats.backups > backups:  # not skipped (on_write_error="warn")
            self._committed_step = counters.global_step

    def _preemption_agreed(self) -> bool:
        """Whether any process received a preemption signal (a collective: every rank asks at once)."""
        assert self._coordinator is not None, "on_fit_start did not run"
        return self._preemption is not None and self._preemption.agreed(self._coordinator)

    def _stop_if_preempted(self, trainer: Any, counters: Counters, batches: int) -> None:
        """At a step boundary inside an epoch: when preempted, back up this step (once) and stop."""
        if self._preemption_agreed():
            if self._last_backup_step != counters.global_step:
                self._back_up(trainer, counters, batches=batches)
            self._stop(counters)

    def _stop(self, counters: Counters) -> None:
        """Log the one line, release the folder and the signals, and raise ``TrainingPreempted``."""
        assert self._coordinator is not None and self._preemption is not None, "on_fit_start did not run"
        _private.spare_from_child_process_observer()  # before the other ranks can exit (the gather below)
        committed = self._committed_step == counters.global_step
        message = stop_message(
            self._preemption.received_by(self._coordinator), counters, self.backup_dir, committed
        )
        if self._coordinator.is_primary:
            log.warning(message)
        self._finish(success=False)
        raise self._preempted(message)

    def _finish(self, success: bool) -> None:
        try:
            self._lifecycle.finish(success)
        finally:
            if self._preemption is not None:
                self._preemption.close()
                self._preemption = None
            self._lifecycle.coordinator = SingleProcess()
            self._coordinator = None
            self._state = None
            self._user_ckpt_path = None
            self._close_pending = self._epoch_closed = False
            self._after_validation = self._stop_after_validation = None
            self._exact.close()
