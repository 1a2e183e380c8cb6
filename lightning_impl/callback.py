"""``BackupAndRestore`` for Lightning: Trainer hooks mapped to the core lifecycle.

One mixin holds the logic; ``lightning_impl.BackupAndRestore`` (``lightning.pytorch``) and
``lightning_impl.pl.BackupAndRestore`` (``pytorch_lightning``) add it to each namespace's Callback.

Hook -> lifecycle::

    on_fit_start          start(state): lock, verify, check the fingerprint, load model, datamodule and
                          callbacks; Lightning restores optimizers, LR schedulers and loops right after
    on_train_start        the restore is done: a mid-epoch resume positions the data (see exact.py)
    on_train_batch_end    save_freq=N: backup() once N optimizer steps have run since the last backup ...
    on_validation_end     ... or here, when a validation runs right after that batch (see below)
    on_train_epoch_end    save_freq="epoch": the epoch's backup is now due ...
    on_train_epoch_start  ... and taken here, or in on_train_end after the last epoch: once the epoch is
    on_train_end          closed (see below)
    on_fit_end            finish(success=True): delete the backup (delete_checkpoint)
    on_exception          finish(success=False): keep the backup (Ctrl-C included)

Why not back up in ``on_train_epoch_end``: Lightning runs EarlyStopping's and ModelCheckpoint's
``on_train_epoch_end`` after every other callback's, and steps ReduceLROnPlateau after that. A
backup taken there misses the epoch's early-stopping check and plateau step, and a resumed run
trains one epoch more than an uninterrupted one. The backup of a closed epoch is saved with the
epoch counters that a checkpoint from ``on_train_epoch_end`` carries (``_private.mark_epoch_closed``),
so that Lightning resumes it at the first batch of the next epoch.

Why a step backup waits for a validation that follows its batch: Lightning resumes a checkpoint
from ``on_train_batch_end`` as if that validation had run, and skips it; a backup taken before it
would leave the validation's random draws, and its hooks' state, out of the resumed run.

Random-number states, the data position and the epoch's logged aggregates (``exact.py``) travel in
the same checkpoint, under the ``"unified_backup"`` key, so that a resumed run changes nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning_impl import _private
from lightning_impl.coordinator import LightningCoordinator
from lightning_impl.exact import ExactResume
from lightning_impl.state import LightningState
from unified_backup.callback import BackupCallback
from unified_backup.coordinator import SingleProcess
from unified_backup.errors import UnsupportedEnvironmentError
from unified_backup.manifest import Counters
from unified_backup.options import EPOCH, RAISE

log = logging.getLogger(__name__)
_KEY = "unified_backup"  # our entry in the checkpoints we write: {"should_stop": bool, **ExactResume.entry}


class BackupAndRestoreMixin(BackupCallback):
    __doc__ = BackupCallback.__doc__  # NOTE: every rank runs the hooks; only global rank 0 commits.

    _framework_version: str = "unknown"

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int = EPOCH,
        delete_checkpoint: bool = True,
        save_before_preemption: bool = False,
        *,
        on_write_error: str = RAISE,
    ) -> None:
        super().__init__(
            backup_dir, save_freq, delete_checkpoint, save_before_preemption, on_write_error=on_write_error
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
        self._close_pending = False
        self._exact.fit_start()
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
        self._last_backup_step = trainer.global_step
        self._epoch_first_step = trainer.global_step - (restored.step_in_epoch if restored else 0)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._exact.epoch_start(trainer, str(self.backup_dir))
        self._back_up_closed_epoch(trainer)
        self._epoch_first_step = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._exact.batch_start()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._exact.batch_end(trainer)
        step = trainer.global_step
        if not self._options.step_backup_due(step, self._last_backup_step):
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            self._close_pending = True  # the epoch's last batch: back up once the epoch is closed
        else:
            counters = Counters(trainer.current_epoch, step - self._epoch_first_step, step)
            if _private.validation_follows(trainer):
                self._after_validation = (counters, batch_idx + 1)
            else:
                self._back_up(trainer, counters, batches=batch_idx + 1)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._after_validation is not None and not trainer.sanity_checking:
            (counters, batches), self._after_validation = self._after_validation, None
            self._back_up(trainer, counters, batches=batches)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._options.per_epoch:
            self._close_pending = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._back_up_closed_epoch(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(success=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(success=False)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._saving is None:
            return
        if self._saving == "close":
            _private.mark_epoch_closed(checkpoint)
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
        try:
            self._lifecycle.backup(self._state, counters)
        finally:
            self._saving = None
        self._last_backup_step = counters.global_step

    def _finish(self, success: bool) -> None:
        try:
            self._lifecycle.finish(success)
        finally:
            self._lifecycle.coordinator = SingleProcess()
            self._coordinator = None
            self._state = None
            self._user_ckpt_path = None
            self._close_pending = False
            self._after_validation = None
            self._exact.close()
