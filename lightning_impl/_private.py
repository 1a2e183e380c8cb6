"""Every access to Lightning internals, one small function each.

Lightning has no public way to load a checkpoint into a running ``fit`` from a callback, so the
adapter uses the same private steps that ``Trainer.fit(ckpt_path=...)`` takes.
``tests/lightning/test_private_api.py`` fails loudly when a Lightning release changes any of them.
Verified against lightning / pytorch-lightning 2.6.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from unified_backup.errors import BackupError

# The keys that ``_CheckpointConnector._get_loops_state_dict`` writes for the fit loop's epoch counters.
_EPOCH_PROGRESS = ("loops", "fit_loop", "epoch_progress")


def restore_modules_and_callbacks(trainer: Any, path: Path) -> None:
    """Load ``path`` with ``weights_only=True``; restore the model, datamodule and callbacks now.

    Lightning itself then restores the optimizers, LR schedulers and loops from the loaded
    checkpoint right after ``on_fit_start`` (``restore_training_state``), and frees it
    (``resume_end``). This is the call ``Trainer._run`` makes for ``fit(ckpt_path=...)``.
    """
    trainer._checkpoint_connector._restore_modules_and_callbacks(path, weights_only=True)


def has_restore_modules_and_callbacks(trainer: Any) -> bool:
    """Whether this Lightning still has the restore entry point with a ``weights_only`` parameter."""
    method = getattr(getattr(trainer, "_checkpoint_connector", None), "_restore_modules_and_callbacks", None)
    return method is not None and "weights_only" in inspect.signature(method).parameters


def set_ckpt_path(trainer: Any, value: Any) -> None:
    """Put back ``trainer.ckpt_path`` without touching who manages it (the public setter would).

    Loading sets it to the backup's file; left there, a later ``fit`` of a trainer whose user set
    ``trainer.ckpt_path`` would try to load a backup that has been deleted since.
    """
    trainer._checkpoint_connector._ckpt_path = value


def mark_epoch_closed(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint taken after an epoch closed look like one saved in ``on_train_epoch_end``.

    An epoch is closed once every ``on_train_epoch_end`` (EarlyStopping's check included) and the
    plateau LR schedulers have run. Lightning resumes such a state only from the counters that a
    checkpoint saved in ``on_train_epoch_end`` carries (processed, but not yet completed): it then
    counts the epoch as completed and starts the next one at its first batch, calling its hooks.
    """
    node: Any = checkpoint
    for key in _EPOCH_PROGRESS:
        node = node.get(key) if isinstance(node, dict) else None
    for part in ("total", "current"):
        counters = node.get(part) if isinstance(node, dict) else None
        if (
            not isinstance(counters, dict)
            or not {"ready", "started", "processed", "completed"} <= counters.keys()
        ):
            raise BackupError(
                "Lightning's checkpoint no longer has the fit loop's epoch counters where unified-backup "
                f"expects them ({'/'.join(_EPOCH_PROGRESS)}/{part}). This Lightning version is not supported "
                "yet: pin lightning to 2.6, or report it to unified-backup."
            )
        if not counters["started"] == counters["processed"] == counters["completed"] >= 1:
            raise BackupError(
                f"Lightning's epoch counters are {counters} at an epoch boundary; expected started == "
                "processed == completed >= 1. This Lightning version is not supported yet: report it to "
                "unified-backup."
            )
        counters["ready"] = counters["processed"]
        counters["completed"] = counters["processed"] - 1
