"""The Lightning training state: what a backup holds, how it is written, checked and loaded.

A backup is one Lightning checkpoint, ``state.ckpt``, written by the public
``Trainer.save_checkpoint`` (model, optimizers, LR schedulers, loops, callbacks, datamodule) and
read back with ``weights_only=True`` only, so loading never runs code stored in the file.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_impl import _private
from unified_backup.errors import UnsafeBackupError
from unified_backup.fingerprint import describe
from unified_backup.manifest import Manifest

FRAMEWORK = "lightning"
FILENAME = "state.ckpt"


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


class LightningState:
    """The :class:`unified_backup.TrainingState` of one ``Trainer.fit``."""

    framework = FRAMEWORK

    def __init__(self, trainer: Any, framework_version: str) -> None:
        self.trainer = trainer
        self.framework_version = framework_version
        self._checked = False

    def fingerprint(self) -> Mapping[str, str]:
        return fingerprint(self.trainer)

    def save(self, directory: Path) -> None:
        """Write the checkpoint; the first one of a ``fit`` is also checked to be safely loadable.

        NOTE: every rank calls this; only global rank 0 writes the file, and it tells the others
        whether the check failed, so that all of them raise.
        """
        path = directory / FILENAME
        self.trainer.save_checkpoint(path, weights_only=False)
        if self._checked:
            return
        self._checked = True
        problem = _refused_by_safe_load(path) if self.trainer.is_global_zero else None
        problem = self.trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise UnsafeBackupError(
                f"The backup just written to {path} could never be restored: torch.load(weights_only=True) "
                f"refuses an object in it ({problem}), and unified-backup does not unpickle arbitrary "
                "objects. Expected only tensors and plain Python values in the checkpoint: keep other "
                "objects (paths, numpy values, custom classes) out of save_hyperparameters() and of "
                "callback state_dict()s, or convert them to plain types."
            )

    def load(self, directory: Path, manifest: Manifest) -> None:
        """Restore model, datamodule and callbacks now; Lightning restores the rest after ``on_fit_start``."""
        path = directory / FILENAME
        try:
            _private.restore_modules_and_callbacks(self.trainer, path)
        except pickle.UnpicklingError as exc:
            raise UnsafeBackupError(
                f"{path} needs to unpickle objects that are not plain tensors or containers "
                f"({_unpickler_reason(exc)}). "
                "Expected a checkpoint that loads with torch.load(weights_only=True); restoring it could "
                "run code stored in the file, so nothing was loaded. Delete the backup to start fresh, and "
                "keep non-tensor objects (numpy arrays, custom classes) out of hyperparameters and callback "
                "states."
            ) from exc


def _refused_by_safe_load(path: Path) -> str | None:
    """Why ``torch.load(path, weights_only=True)`` refuses the file, or None if it loads."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        return _unpickler_reason(exc)
    return None


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's long weights-only error that names the refused object."""
    lines = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
    return lines[0].split(". Please use")[0] if lines else str(exc)


def _dtype(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")
