"""Every access to Lightning internals, one small function each.

Lightning has no public way to load a checkpoint into a running ``fit`` from a callback, so the
adapter uses the same private steps that ``Trainer.fit(ckpt_path=...)`` takes.
``tests/lightning/test_private_api.py`` fails loudly when a Lightning release changes any of them.
Verified against lightning / pytorch-lightning 2.6.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pickle
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from unified_backup.errors import BackupError

# Where ``_CheckpointConnector._get_loops_state_dict`` writes the fit loop's epoch counters and the
# training epoch loop's batch counters.
_FIT_LOOP = ("loops", "fit_loop")
_EPOCH_PROGRESS = "epoch_progress"
_BATCH_PROGRESS = "epoch_loop.batch_progress"
_COUNTERS = {"ready", "started", "processed", "completed"}


def restore_modules_and_callbacks(trainer: Any, path: Path) -> None:
    """Load ``path`` with ``weights_only=True``; restore the model, datamodule and callbacks now.

    Lightning itself then restores the optimizers, LR schedulers and loops from the loaded
    checkpoint right after ``on_fit_start`` (``restore_training_state``), and frees it
    (``resume_end``). This is the call ``Trainer._run`` makes for ``fit(ckpt_path=...)``.
    """
    trainer._checkpoint_connector._restore_modules_and_callbacks(path, weights_only=True)


def loaded_checkpoint(trainer: Any) -> dict[str, Any]:
    """The checkpoint dictionary that :func:`restore_modules_and_callbacks` loaded.

    Lightning keeps it until it has restored the training state after ``on_fit_start``; reading our
    entry from it spares a flag that ``on_load_checkpoint`` would have to consult.
    """
    return trainer._checkpoint_connector._loaded_checkpoint


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The checkpoint dictionary ``Trainer.save_checkpoint`` would write, built on every rank.

    ``save_checkpoint`` hands it to the strategy's ``CheckpointIO``, which buffers the whole state
    in memory and writes a temporary file in ``$TMPDIR``; taking the dictionary lets the adapter
    add its own entry directly and write the file into the core's staging folder.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


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


def clear_received_sigterm(trainer: Any) -> bool:
    """Whether Lightning's SIGTERM handler recorded a SIGTERM; forget it, so Lightning does not stop on it.

    ``trainer.received_sigterm`` (read-only) reads this flag; Lightning's loops raise
    ``SIGTERMException`` once it is set.
    """
    connector = trainer._signal_connector
    received = bool(connector.received_sigterm)
    connector.received_sigterm = False
    return received


def slurm_requeue_signal(trainer: Any) -> signal.Signals | None:
    """The signal on which Lightning's SLURM auto-requeue would requeue this job; None where it is off.

    Lightning's signal connector reads the same private ``_accelerator_connector.cluster_environment``
    (the strategy's public ``cluster_environment`` is missing on single-device strategies).
    """
    connector = getattr(trainer, "_accelerator_connector", None)  # renamed: no requeue, never a crash
    environment = getattr(connector, "cluster_environment", None)
    is_slurm = any(cls.__name__ == "SLURMEnvironment" for cls in type(environment).__mro__)  # as isinstance
    if not is_slurm or not getattr(environment, "auto_requeue", False):
        return None
    requeue = getattr(environment, "requeue_signal", None)
    return signal.Signals(requeue) if requeue is not None else None


def spare_from_child_process_observer() -> None:
    """Keep Lightning's DDP launcher from SIGKILLing this process as the other ranks exit with code 143.

    With ``strategy="ddp"``, rank 0 starts the other ranks as its child processes and watches them from
    a thread (``_ChildProcessObserver``, every 5 s): once one has exited with a non-zero code, it SIGKILLs
    every rank, rank 0 included. After a preemption every rank exits with 143 on purpose; rank 0,
    killed a moment before its own exit, would end with -9 instead. With no child left on its list, the
    observer ends at its next check. Only rank 0 runs one.
    """
    for thread in threading.enumerate():
        if type(thread).__name__ == "_ChildProcessObserver" and hasattr(thread, "_child_processes"):
            thread._child_processes = []  # type: ignore[attr-defined]


def mark_epoch_closed(checkpoint: dict[str, Any], step_based: bool) -> None:
    """Make a checkpoint taken after an epoch closed resume at the next epoch's first batch.

    An epoch is closed once every ``on_train_epoch_end`` (EarlyStopping's check included) and the
    plateau LR schedulers have run. Lightning resumes such a state cleanly only from the counters of
    a checkpoint saved at one of its own hooks, and which one depends on ``step_based`` (``max_steps``
    set, when Lightning treats every resume as a restart):

    - epoch-based: those of ``on_train_epoch_end`` (the epoch processed, not yet completed). Lightning
      counts the epoch as completed and starts the next one, plateau schedulers included.
    - step-based: those of ``on_train_epoch_start`` of the next epoch before its first batch (that
      epoch ready, no batch of it counted). The ``on_train_epoch_end`` counters would make Lightning
      run that epoch's end hooks again, and one more batch.
    """
    loops: Any = checkpoint
    for key in _FIT_LOOP:
        loops = loops.get(key) if isinstance(loops, dict) else None
    epochs = _counters(loops, _EPOCH_PROGRESS)
    batches = _counters(loops, _BATCH_PROGRESS)
    for counters in epochs:
        if not counters["started"] == counters["processed"] == counters["completed"] >= 1:
            raise BackupError(
                f"Lightning's epoch counters are {counters} at an epoch boundary; expected started == "
                "processed == completed >= 1. This Lightning version is not supported yet: report it to "
                "unified-backup."
            )
    for counters in epochs:
        if step_based:
            counters["ready"] = counters["completed"] + 1
        else:
            counters["ready"] = counters["processed"]
            counters["completed"] = counters["processed"] - 1
    if step_based:
        batches[1].update(dict.fromkeys(_COUNTERS, 0))
        loops[_BATCH_PROGRESS]["is_last_batch"] = False


def _counters(loops: Any, name: str) -> tuple[dict[str, int], dict[str, int]]:
    """The ``total`` and ``current`` progress counters of ``name`` in the fit loop's state."""
    node = loops.get(name) if isinstance(loops, dict) else None
    found = tuple(node.get(part) if isinstance(node, dict) else None for part in ("total", "current"))
    if not all(isinstance(c, dict) and _COUNTERS <= c.keys() for c in found):
        raise BackupError(
            "Lightning's checkpoint no longer has the fit loop's progress counters where unified-backup "
            f"expects them ({'/'.join(_FIT_LOOP)}/{name}/total|current). This Lightning version is not "
            "supported yet: pin lightning to 2.6, or report it to unified-backup."
        )
    return found  # type: ignore[return-value]


# -- the training data of the epoch in progress -----------------------------------------------
def train_loaders(trainer: Any) -> list[Any]:
    """The training loaders, flattened (``trainer.train_dataloader`` keeps the user's nesting)."""
    combined = trainer.fit_loop._combined_loader
    return list(combined.flattened) if combined is not None else []


def epoch_length(trainer: Any) -> int | None:
    """How many batches the training iterator yields in one epoch, or None when it has no length."""
    combined = trainer.fit_loop._combined_loader
    try:
        length = len(combined) if combined is not None else None
    except (TypeError, NotImplementedError, RuntimeError):
        return None
    return None if length is None or math.isinf(length) else int(length)


def iterator_made_after_epoch_start(trainer: Any) -> bool:
    """Whether this epoch's training iterator is made after ``on_train_epoch_start``.

    The condition of ``_TrainingEpochLoop.on_run_start``; otherwise the iterator is the one that
    ``FitLoop.setup_data`` made before ``on_train_start`` (the first epoch of a ``fit``).
    """
    fit_loop = trainer.fit_loop
    return trainer.current_epoch > 0 and not fit_loop.is_resuming and not fit_loop.epoch_loop.restarting


def validation_follows(trainer: Any) -> bool:
    """In ``on_train_batch_end``: whether Lightning runs a validation right after this batch."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def restart_epoch_data(trainer: Any) -> None:
    """Make the epoch's training iterator again, as ``_TrainingEpochLoop.on_run_start`` does.

    The samplers are told the epoch first (``DistributedSampler`` shuffles by it), as
    ``FitLoop.on_advance_start`` does before each epoch.
    """
    for loader in train_loaders(trainer):
        samplers = {
            id(s): s
            for s in (
                getattr(loader, "sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None),
            )
        }
        for sampler in samplers.values():
            set_epoch = getattr(sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(trainer.current_epoch)
    iter(trainer.fit_loop._data_fetcher)


def skip_batches(trainer: Any, count: int) -> None:
    """Read and drop the epoch's next ``count`` training batches, below Lightning's fetcher.

    The fetcher's own count stays at 0: ``_TrainingEpochLoop.on_run_start`` adds the restored
    batch progress to it, and the epoch ends after its remaining batches.
    """
    combined = trainer.fit_loop._combined_loader
    for _ in range(count):
        next(combined)


class QuietNotResumableWarning:
    """Silence Lightning's "your dataloader is not resumable" warning while a positioned resume starts.

    ``_TrainingEpochLoop.reset`` emits it for every mid-epoch restart of a loader without
    ``state_dict``; after ``skip_batches`` it is wrong. Entered in ``on_train_start``, left at the
    first ``on_train_batch_start`` (``warnings.catch_warnings`` restores the filters as they were).
    """

    _MESSAGE = "You're resuming from a checkpoint that ended before the epoch ended"

    def __init__(self) -> None:
        self._context: Any = warnings.catch_warnings()
        self._context.__enter__()
        warnings.filterwarnings("ignore", message=self._MESSAGE)

    def close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


# -- the epoch's aggregated ``self.log(..., on_epoch=True)`` values ---------------------------------
def _training_results(trainer: Any) -> dict[str, Any]:
    return trainer.fit_loop.epoch_loop._results


def epoch_aggregates(trainer: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The running sums (or extremes) of the values logged with ``on_epoch=True`` in this epoch so far.

    Lightning does not save them: without them, the epoch-end value of an epoch resumed in its
    middle would aggregate only the batches run after the resume.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, metric in _training_results(trainer).items():
        if metric.is_tensor and metric.meta.on_epoch and metric.update_called:
            entry = {"value": metric.value.detach().cpu().clone()}
            if metric.meta.is_mean_reduction:
                entry["cumulated_batch_size"] = metric.cumulated_batch_size.detach().cpu().clone()
            out[key] = entry
    return out


def fold_epoch_aggregates(trainer: Any, saved: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Add the aggregates saved before the resume into the ones of the first batch after it.

    Called once each value holds exactly one batch's update (``0 + x``), this gives
    ``saved + x``: the very operation, in the same order, that the uninterrupted run made.
    Returns the keys that were folded.
    """
    results = _training_results(trainer)
    folded = []
    for key, entry in saved.items():
        metric = results.get(key)
        if metric is None or not metric.is_tensor or not metric.update_called:
            continue
        meta, value = metric.meta, entry["value"].to(metric.value.device)
        if meta.is_mean_reduction:
            metric.value = value + metric.value
            metric.cumulated_batch_size = (
                entry["cumulated_batch_size"].to(metric.cumulated_batch_size.device)
                + metric.cumulated_batch_size
            )
        elif meta.is_sum_reduction:
            metric.value = value + metric.value
        elif meta.is_max_reduction or meta.is_min_reduction:
            metric.value = meta.reduce_fx(value, metric.value)
        else:
            continue
        metric._computed = None  # torchmetrics caches compute()
        folded.append(key)
    return folded


# -- sharded state (ModelParallelStrategy) ------------------------------------------------------
def is_model_parallel(strategy: Any) -> bool:
    """Whether ``strategy`` is (a subclass of) either namespace's ``ModelParallelStrategy`` (FSDP2)."""
    return any(cls.__name__ == "ModelParallelStrategy" for cls in type(strategy).__mro__)


LIGHTNING_METADATA = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint.filesystem._metadata_fn


def pickled_part(path: Path) -> Path:
    """The ``torch.save`` file of a checkpoint at ``path``: the file itself, or, in a sharded
    checkpoint folder, the file of everything but model and optimizers that Lightning writes beside
    the shards."""
    return path / LIGHTNING_METADATA if path.is_dir() else path


def saves_full_state(strategy: Any) -> bool:
    """``ModelParallelStrategy(save_distributed_checkpoint=False)``: it gathers the whole state into
    one file on rank 0 instead of writing shards."""
    return getattr(strategy, "_save_distributed_checkpoint", True) is False


def save_sharded(checkpoint: dict[str, Any], path: Path, write_rest: Any) -> None:
    """(every rank) What ``ModelParallelStrategy.save_checkpoint`` writes (``save_distributed_checkpoint``
    on), in the layout its ``load_checkpoint`` reads: model and optimizer states through
    ``torch.distributed.checkpoint.save`` (each rank its shards; collective), under the keys
    ``state_dict`` and ``optimizer_<i>``; the rest as :data:`LIGHTNING_METADATA`, written by
    ``write_rest(rest, file)`` (None on the ranks that do not write it)."""
    from torch.distributed.checkpoint import save

    converted = {"state_dict": checkpoint.pop("state_dict")}
    for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
        converted[f"optimizer_{i}"] = state
    save(converted, checkpoint_id=path)
    if write_rest is not None:
        write_rest(checkpoint, path / LIGHTNING_METADATA)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file with torch.distributed.checkpoint's own classes only.

    torch reads that file with a plain ``pickle.load``: a crafted one could run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if _allowed(module, name) else None
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not a torch.distributed.checkpoint class")
        return found


def _allowed(module: str, name: str) -> bool:
    if module.startswith("torch.distributed.checkpoint."):  # its classes (dataclasses, enums), no function
        return isinstance(getattr(importlib.import_module(module), name, None), type)
    if module == "torch":
        value = getattr(torch, name, None)
        return value is torch.Size or isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
    return (module, name) in {
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }


def read_dcp_metadata(path: Path) -> Any:
    """The ``.metadata`` of the torch.distributed.checkpoint folder ``path``, unpickled safely."""
    with open(path / DCP_METADATA, "rb") as f:
        return _MetadataUnpickler(f).load()


def shard_files(metadata: Any) -> set[str]:
    """The files of a torch.distributed.checkpoint folder that its ``.metadata`` names."""
    return {info.relative_path for info in metadata.storage_data.values()}


def stored_objects(metadata: Any) -> list[tuple[str, str, int, int, bool]]:
    """Every item that torch.distributed.checkpoint loads with ``torch.load(weights_only=False)``
    (anything but a tensor: e.g. an optimizer's param_groups): ``(name, file, offset, length,
    transformed)``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out = []
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            transformed = bool(getattr(info, "transform_descriptors", None))
            out.append((index.fqn, info.relative_path, int(info.offset), int(info.length), transformed))
    return out


def skip_restore_after_setup(trainer: Any) -> None:
    """Make the restore that ``Trainer._run`` starts after ``on_fit_start`` a no-op, once.

    For strategies with ``restore_checkpoint_after_setup`` (sharded), Lightning loads its
    ``ckpt_path`` there: after a backup was loaded in ``on_fit_start`` it would load the user's
    ``fit(ckpt_path=...)`` over it, or restore the model and callbacks a second time. The backup's
    checkpoint stays loaded for Lightning's ``restore_training_state`` right after. An instance
    attribute that shadows the connector's method and removes itself when called; ``end_fit``
    removes it if the fit ended before.
    """
    connector = trainer._checkpoint_connector

    def skip(*args: Any, **kwargs: Any) -> None:
        connector.__dict__.pop("_restore_modules_and_callbacks", None)

    connector._restore_modules_and_callbacks = skip


def end_fit(trainer: Any) -> None:
    """Remove what :func:`skip_restore_after_setup` left on the trainer, if its restore never came."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    if connector is not None:
        connector.__dict__.pop("_restore_modules_and_callbacks", None)
