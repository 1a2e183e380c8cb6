"""The Lightning training state: what a backup holds, how it is written, checked and loaded.

A backup is one Lightning checkpoint: the dictionary Lightning itself builds for
``Trainer.save_checkpoint`` (model, optimizers, LR schedulers, loops, callbacks, datamodule),
with our entry added under ``"unified_backup"`` (random-number states, data position and epoch
aggregates from :mod:`lightning_impl.exact`, and whether training was stopping). Two layouts:

- replicated state (one process, DDP and its launchers): ``state.ckpt``, which rank 0 writes with
  ``torch.save`` straight into the staging folder the core hands over (no whole-state buffer, no
  temporary file elsewhere; the core's manifest makes it visible atomically). It is read back
  through the trainer's ``CheckpointIO``; a plugin must read files written by ``torch.save``
  (Lightning's default and ``AsyncCheckpointIO`` do).
- sharded state (``ModelParallelStrategy``, FSDP2): ``state/``, a ``torch.distributed.checkpoint``
  folder written by the strategy itself: one file of shards per rank, the checkpoint's
  ``.metadata``, and ``meta.pt`` (everything but model and optimizers) from rank 0. Every rank
  writes into the one staging folder; the core commits once all are in. The strategy loads it on
  any world size (resharding), so a job of another size resumes, with the core's warning.

Loading never unpickles arbitrary objects, so it never runs code stored in the files: the file
loads with ``weights_only=True``, and a sharded folder is loaded only once
:func:`lightning_impl.shards.refused` found nothing but plain values in it.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from lightning_impl import _private, shards
from lightning_impl.exact import ExactResume
from lightning_impl.snapshot import HostCopies
from unified_backup.coordinator import Coordinator, SingleProcess
from unified_backup.errors import (
    BackupError,
    UnsafeBackupError,
    UnsupportedEnvironmentError,
)
from unified_backup.fingerprint import describe
from unified_backup.hashing import HashingWriter
from unified_backup.manifest import Manifest
from unified_backup.state import REPLICATED, SHARDED, Position

FRAMEWORK = "lightning"
FILENAME = "state.ckpt"  # replicated state
FOLDER = "state"  # sharded state: a torch.distributed.checkpoint folder
KEY = "unified_backup"  # our entry in the checkpoint
log = logging.getLogger(__name__)


def fingerprint(trainer: Any) -> dict[str, str]:
    """Names, dtypes and shapes of the model's state and of every optimizer's parameters.

    Built from parameters, not from optimizer state, so it is the same before the first step
    (when the optimizer state is still empty) and at every backup.
    """
    entries = {
        f"model/{name}": describe(_dtype(tensor), tensor.shape)
        for name, tensor in trainer.lightning_module.state_dict().items()
    }
    for i, optimizer in enumerate(trainer.optimizers):
        entries[f"optimizer/{i}/class"] = type(optimizer).__name__
        for g, group in enumerate(optimizer.param_groups):
            for p, param in enumerate(group["params"]):
                entries[f"optimizer/{i}/group/{g}/param/{p}"] = describe(_dtype(param), param.shape)
    for i, config in enumerate(trainer.lr_scheduler_configs):
        entries[f"lr_scheduler/{i}/class"] = type(config.scheduler).__name__
    return entries


def topology(trainer: Any, sharded: bool) -> dict[str, Any]:
    """The shape of the job, as the manifest records it: strategy, processes (workers), data-parallel
    replicas, nodes and the state's layout. A restore on another shape warns (see the core's lifecycle)."""
    world = int(trainer.world_size)
    replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return {
        "strategy": type(trainer.strategy).__name__.removesuffix("Strategy"),  # e.g. DDP, ModelParallel
        "workers": world,
        "replicas": int(replicas.get("num_replicas", world)),
        "nodes": int(trainer.num_nodes),
        "layout": SHARDED if sharded else REPLICATED,
    }


def check_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` writes sharded state; raise for a strategy that is not supported."""
    if not strategy.restore_checkpoint_after_setup:
        return False  # replicated: one process, DDP and its launchers
    if _private.is_model_parallel(strategy) and not _private.saves_full_state(strategy):
        return True
    if _private.is_model_parallel(strategy):
        raise UnsupportedEnvironmentError(
            "BackupAndRestore needs ModelParallelStrategy(save_distributed_checkpoint=True) (the default): "
            "found save_distributed_checkpoint=False, which gathers the whole state into one file on rank 0. "
            "Pass save_distributed_checkpoint=True; every rank then writes its own shards."
        )
    name = type(strategy).__name__
    raise UnsupportedEnvironmentError(
        f"BackupAndRestore does not support the {name} strategy: it restores checkpoints after setup and "
        "its sharded checkpoints are not tested with BackupAndRestore (FSDPStrategy and DeepSpeed need a "
        "GPU, none of which the project's tests have). Expected a single-device or DDP strategy, or "
        "ModelParallelStrategy (FSDP2, fully_shard in configure_model). Use one of those, or remove "
        "BackupAndRestore and use Lightning's ModelCheckpoint."
    )


class LightningState:
    """The :class:`unified_backup.TrainingState` of one ``Trainer.fit``."""

    framework = FRAMEWORK

    def __init__(self, trainer: Any, framework_version: str) -> None:
        self.sharded = check_strategy(trainer.strategy)
        self.trainer = trainer
        self.framework_version = framework_version
        self.topology = topology(trainer, self.sharded)
        self.exact = ExactResume()
        self._user_ckpt_path = trainer.ckpt_path  # the load replaces it; put back in train_start
        self._checked = False
        self._host_copies = HostCopies()  # async_backup's snapshots

    @property
    def global_step(self) -> int:
        return int(self.trainer.global_step)

    def fingerprint(self) -> Mapping[str, str]:
        return fingerprint(self.trainer)

    def save(self, directory: Path, position: Position, coordinator: Coordinator) -> dict[str, str] | None:
        """Write the checkpoint of ``position``; the first of a ``fit`` is also checked to be safely loadable.
        Returns the checksum of the file computed while writing it (replicated state, primary).

        NOTE: every rank builds the checkpoint (callbacks' states, a gather of every rank's RNG
        states). Replicated state: only the primary writes the file. Sharded state: every rank writes
        its shards (the strategy's collectives make a failure on one rank fail them all). The primary
        then tells the others how its part went, so that every rank raises the same error or none does.
        """
        return self._persist(self._checkpoint(position, coordinator), directory, coordinator)

    def snapshot(
        self, position: Position, coordinator: Coordinator
    ) -> Callable[[Path], dict[str, str] | None]:
        """(``async_backup``, one process) Copy the checkpoint of ``position`` into host memory, every
        tensor included; the returned call writes the copy as ``save`` writes the live checkpoint (the
        core refuses ``async_backup`` for sharded state)."""
        checkpoint = self._host_copies.of(self._checkpoint(position, coordinator))
        return lambda directory: self._persist(checkpoint, directory, SingleProcess())  # no collectives

    def _checkpoint(self, position: Position, coordinator: Coordinator) -> dict[str, Any]:
        """Lightning's checkpoint of the live training at ``position``, with our entry."""
        trainer = self.trainer
        checkpoint = _private.dump_checkpoint(trainer)
        if position.at_epoch_end:
            _private.mark_epoch_closed(checkpoint, step_based=trainer.max_steps != -1)
        exact = self.exact.entry(trainer, coordinator.gather, position.batches)
        checkpoint[KEY] = {"should_stop": bool(trainer.should_stop), **exact}
        return checkpoint

    def _persist(
        self, checkpoint: dict[str, Any], directory: Path, coordinator: Coordinator
    ) -> dict[str, str] | None:
        """Write ``checkpoint`` into ``directory`` (see ``save``); the checksums computed on the way."""
        target = directory / (FOLDER if self.sharded else FILENAME)
        outcome: dict[str, Any] = {"path": str(target)}
        failure: BaseException | None = None
        checksums = None
        if self.sharded or coordinator.is_primary:
            try:
                if self.sharded:
                    _write_shards(checkpoint, target, coordinator.is_primary)
                else:
                    checksums = {FILENAME: _write(checkpoint, target)}
                if coordinator.is_primary and not self._checked:
                    outcome["unsafe"] = _refused_by_safe_load(target)
            except Exception as exc:  # the other ranks wait for the outcome: they must hear of it
                failure = exc
                strerror = exc.strerror if isinstance(exc, OSError) else None
                outcome["errno"] = getattr(exc, "errno", None)
                outcome["error"] = strerror or f"{type(exc).__name__}: {exc}"
                outcome["class"] = type(exc).__name__
        outcome = coordinator.broadcast(outcome)
        self._checked = self._checked or "error" not in outcome
        if failure is not None and not coordinator.is_primary:
            raise failure  # this rank's own shards (the core reports the first rank that failed)
        path = outcome["path"]  # the primary's file
        if outcome.get("error"):
            if outcome["errno"] is not None:
                raise OSError(outcome["errno"], f"{outcome['error']}: {path}")
            if outcome["class"] == UnsupportedEnvironmentError.__name__:
                raise UnsupportedEnvironmentError(outcome["error"].split(": ", 1)[-1])
            raise BackupError(f"Writing {path} failed ({outcome['error']}).")
        if outcome.get("unsafe"):
            raise UnsafeBackupError(
                f"The backup just written to {path} could never be restored: torch.load(weights_only=True) "
                f"refuses an object in it ({outcome['unsafe']}), and unified-backup does not unpickle "
                "arbitrary objects. Expected only tensors and plain Python values in the checkpoint: keep "
                "other objects (paths, numpy values, custom classes) out of save_hyperparameters() and of "
                "callback state_dict()s, or convert them to plain types."
            )
        return checksums

    def load(self, directory: Path, manifest: Manifest, coordinator: Coordinator) -> None:
        """Restore model, datamodule and callbacks now; Lightning restores the rest after ``on_fit_start``.

        Sharded state (a strategy that restores after setup, and whose model and optimizers exist by
        now): the strategy loads model and optimizer shards here too, resharded to this job's size.
        """
        path = directory / (FOLDER if self.sharded else FILENAME)
        unsafe = shards.refused(path) if self.sharded else None  # torch's reader would unpickle it all
        if unsafe is not None:
            raise UnsafeBackupError(
                f"{path} holds objects that are not plain tensors or containers ({unsafe}). Expected a "
                "checkpoint that loads without unpickling arbitrary objects; restoring it could run code "
                "stored in the files, so nothing was loaded. Delete the backup (`unified-backup delete "
                "BACKUP_DIR`) to start fresh."
            )
        try:
            _private.restore_modules_and_callbacks(self.trainer, path)
            if self.sharded:  # else Lightning would restore again after on_fit_start, or load fit(ckpt_path=)
                _private.skip_restore_after_setup(self.trainer)
        except CheckpointException as exc:  # a BaseException: every rank must turn it into an error alike
            raise BackupError(
                f"Loading the shards in {path} failed: {_first_cause(exc)}. Expected shards that fit this "
                "model and its optimizers; the backup is left as it is. Resume with the model it was made "
                "for, or delete the backup (`unified-backup delete BACKUP_DIR`) to start fresh."
            ) from exc
        except pickle.UnpicklingError as exc:
            raise UnsafeBackupError(
                f"{path} needs to unpickle objects that are not plain tensors or containers "
                f"({shards.unpickler_reason(exc)}). "
                "Expected a checkpoint that loads with torch.load(weights_only=True); restoring it could "
                "run code stored in the file, so nothing was loaded. Delete the backup "
                "(`unified-backup delete BACKUP_DIR`) to start fresh, and "
                "keep non-tensor objects (numpy arrays, custom classes) out of hyperparameters and callback "
                "states."
            ) from exc
        entry = _private.loaded_checkpoint(self.trainer).get(KEY) or {}
        if entry.get("should_stop"):
            self.trainer.should_stop = True  # an early-stopped run resumes as stopped instead of training on
        self.exact.load(self.trainer, entry, coordinator.rank, str(directory.parent))
        if self._user_ckpt_path:
            log.warning(
                "Resumed from the backup in %s, not from fit(ckpt_path=%r): the backup is the later state.",
                directory.parent,
                str(self._user_ckpt_path),
            )

    def train_start(self) -> None:
        """``on_train_start`` after a restore: hand back the user's ``ckpt_path``; position the data."""
        _private.set_ckpt_path(self.trainer, self._user_ckpt_path)
        self.exact.train_start(self.trainer)


def _write(checkpoint: dict[str, Any], path: Path) -> str:
    """(primary) Write the checkpoint as Lightning's default ``TorchCheckpointIO`` does, minus its
    whole-state buffer and its temporary file in ``$TMPDIR``, checksummed on the way; the checksum.
    Always ``torch.save``, whatever ``CheckpointIO`` plugin the trainer has: a plugin may write later
    (``AsyncCheckpointIO``) or elsewhere, and the core commits the file as soon as this returns."""
    with open(path, "wb") as f, HashingWriter(f) as sink:
        try:
            torch.save(checkpoint, sink)  # type: ignore[arg-type]  # any object with write()
        except RuntimeError as exc:  # torch reports a failed write (e.g. a full disk) as its own error
            if sink.error is not None:
                raise sink.error from exc
            raise
    size = path.stat().st_size
    if size != sink.written:  # the checksum covers what was handed over: it must all be in the file
        raise BackupError(f"{path} has {size} bytes after torch.save wrote {sink.written}.")
    return sink.hexdigest()


def _write_shards(checkpoint: dict[str, Any], path: Path, primary: bool) -> None:
    """(every rank) Write the shards into ``path``, and on the primary the rest of the checkpoint, then
    check that every rank's shards are there. A failed write on any rank raises on every rank (torch's
    collectives), as the ``OSError`` behind it when there is one (so ``on_write_error`` applies)."""
    try:
        _private.save_sharded(checkpoint, path, _write if primary else None)
    except CheckpointException as exc:  # a BaseException: it would pass every ``except Exception``
        oserror = next((cause for cause in _causes(exc) if isinstance(cause, OSError)), None)
        if oserror is not None:
            raise OSError(oserror.errno, oserror.strerror or str(oserror)) from exc
        raise BackupError(f"Writing the shards into {path} failed: {_first_cause(exc)}") from exc
    missing = shards.missing(path) if primary else []
    if missing:
        raise UnsupportedEnvironmentError(
            f"The shards {', '.join(missing)} that other processes wrote into {path} are not there as the "
            "primary sees it. Expected a backup_dir on a filesystem every process sees (e.g. NFS); put "
            "backup_dir on one."
        )


def _causes(exc: CheckpointException) -> list[BaseException]:
    return [failure[0] if isinstance(failure, tuple) else failure for failure in exc.failures.values()]


def _first_cause(exc: CheckpointException) -> str:
    causes = _causes(exc)
    return f"{type(causes[0]).__name__}: {causes[0]}" if causes else str(exc)


def _refused_by_safe_load(path: Path) -> str | None:
    """Why the checkpoint at ``path`` (a file, or a sharded folder) could not be loaded without
    unpickling arbitrary objects; None if it can."""
    if path.is_dir():
        return shards.refused(path)
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        return shards.unpickler_reason(exc)
    return None


def _dtype(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")
