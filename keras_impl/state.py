"""The Keras training state (Keras 3 or tf_keras): fingerprint, save and load through ``tf.train.Checkpoint``.

One ``tf.train.CheckpointManager`` writes the model's variables (the Dropout seed generators'
states included), the optimizer (with its step counter) and the epoch counters into the folder the
core hands over, so weights and counters are committed together. Next to it, ``resume_state.npz``
holds the random-number generator states (:mod:`keras_impl.rng`) and the compiled metrics'
accumulators, so that an epoch resumed in its middle reports the same mean loss. Loading reads the
counters first and checks them against the manifest, then restores everything and checks that every
live object was matched.
"""

from __future__ import annotations

import copy
import errno
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_impl import _private, callback_state, rng, strategies
from keras_impl.flavour import Keras3
from keras_impl.flavour import of as flavour_of
from unified_backup.coordinator import Coordinator, SingleProcess
from unified_backup.errors import (
    BackupWriteError,
    CorruptBackupError,
    IncompatibleBackupError,
    UnsupportedEnvironmentError,
)
from unified_backup.fingerprint import describe
from unified_backup.manifest import Manifest
from unified_backup.state import Position

_COUNTER_KEYS = {name: f"{name}/.ATTRIBUTES/VARIABLE_VALUE" for name in ("epoch", "step_in_epoch")}
_BATCH_KEY = "batch_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"
_UNIQUIFIED = re.compile(r"^(.*?)(?:_(\d+))?$")
EXTRA_FILE = "resume_state.npz"
_METRICS = "metrics/"
_HOST = ("python_random/", "numpy_random/")
_WORKER = "worker-{}/"  # another worker's host generator states


class KerasTrainingState:
    """A compiled Keras model (Keras 3 or tf_keras) and its optimizer, as the core's ``TrainingState``.

    Save and load only once the model and its optimizer are built.
    """

    def __init__(self, model: keras.Model, flavour: Keras3 | None = None) -> None:
        flavour = flavour or flavour_of(model)
        self.model = model
        self.flavour = flavour
        self.optimizer = model.optimizer
        self.framework = flavour.name
        self.framework_version = flavour.version
        self.topology = strategies.topology(model.distribute_strategy)
        with tf.init_scope():
            self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self._step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self._batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._built_checkpoint: tf.train.Checkpoint | None = None
        self._epoch_start_host = rng.capture_host()
        self._restored_metrics: rng.Arrays = {}
        self.restored_tf_seed: int | None = None
        self.restored_batch_in_epoch = 0
        self.callbacks: list[Any] = []  # the fit's other callbacks, whose state is backed up (callback_state)
        self.restored_callbacks: dict[str, Any] = {}

    @property
    def _checkpoint(self) -> tf.train.Checkpoint:
        """Made at first use, once ``fit`` has built the model and its optimizer."""
        if self._built_checkpoint is None:
            # The explicit variable list also saves what the model does not track for tf.train
            # (the seed generators' states of e.g. Dropout, i.e. the layers' RNG states).
            self._built_checkpoint = tf.train.Checkpoint(
                model=self.model,
                optimizer=self.optimizer,
                model_variables=list(self.model.variables) + self.flavour.rng_variables(self.model),
                epoch=self._epoch,
                step_in_epoch=self._step_in_epoch,
                batch_in_epoch=self._batch_in_epoch,
            )
        return self._built_checkpoint

    @property
    def global_step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    @property
    def position(self) -> tuple[int, int]:
        """(optimizer steps, training batches) so far; they differ under gradient accumulation."""
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)  # e.g. LossScaleOptimizer
        if getattr(optimizer, "gradient_accumulation_steps", None):
            return self.global_step, _private.batches_trained(optimizer)
        return self.global_step, self.global_step

    def fingerprint(self) -> dict[str, str]:
        """``model/<path>`` and ``optimizer/<path>`` of every variable, plus ``optimizer/class``.

        Paths are canonicalised (see :func:`canonical_paths`) so that a model rebuilt in the same
        process, whose layers Keras names ``dense_2`` instead of ``dense``, gives the same keys.
        """
        path = lambda v: self.flavour.path(v, self.model)  # noqa: E731
        model_paths = canonical_paths(path(v) for v in self.model.variables)
        found = {f"model/{model_paths[path(v)]}": describe(v.dtype, v.shape) for v in self.model.variables}
        # Keras 3 names a slot after the variable's path with "/" as "_"; tf_keras keeps the "/".
        renames = sorted(
            [(p.replace("/", "_"), c.replace("/", "_")) for p, c in model_paths.items()]
            + [(p, c) for p, c in model_paths.items()],
            key=lambda pair: -len(pair[0]),
        )
        prefix = f"{self.flavour.optimizer_name(self.optimizer)}/"
        for v in self.flavour.optimizer_variables(self.optimizer):
            name = path(v)
            while name.startswith(prefix):  # a name scope may repeat it
                name = name[len(prefix) :]
            for original, canonical in renames:
                at = name.find(original)
                end = at + len(original)
                if at >= 0 and name[at - 1 : at] in ("", "/") and name[end : end + 1] in ("", "/", "_"):
                    name = name[:at] + canonical + name[end:]
                    break
            found[f"optimizer/{name}"] = describe(v.dtype, v.shape)
        found["optimizer/class"] = type(self.optimizer).__name__
        return found

    def note_epoch_start(self) -> None:
        """Note the host generators as the next epoch starts, before its input pipeline draws the order."""
        self._epoch_start_host = rng.capture_host()

    def save(self, directory: Path, position: Position, coordinator: Coordinator) -> None:
        """Write the checkpoint of ``position`` and, next to it, the RNG states and the metrics' sums.

        Inside an epoch the host generators saved are those of the epoch's start (the resumed epoch
        draws its order again and replays the skipped batches' draws); at an epoch end, the current ones.
        """
        extra, callbacks = self._host_state(position, coordinator)
        _write(self._checkpoint, directory, extra, callbacks)

    def snapshot(self, position: Position, coordinator: Coordinator) -> Callable[[Path], None]:
        """(``async_backup``, one process) Copy everything ``save`` writes into host memory; the returned
        call writes the copy, as ``save`` would have, while training goes on."""
        extra, callbacks = self._host_state(position, coordinator)
        callbacks = copy.deepcopy(callbacks)  # a user's state_dict() may hand out its live containers
        try:
            frozen = _private.frozen_checkpoint(self._checkpoint)
        except TypeError as exc:
            raise UnsupportedEnvironmentError(
                f"async_backup=True cannot take a snapshot of this model's state ({exc}). Expected variables "
                "and trackables that save through tf.train.Checkpoint's current protocol; pass "
                "async_backup=False."
            ) from exc
        return lambda directory: _write(frozen, directory, extra, callbacks)

    def _host_state(self, position: Position, coordinator: Coordinator) -> tuple[rng.Arrays, dict[str, Any]]:
        """Set the counters to ``position``; the arrays of ``resume_state.npz`` and the callbacks' state.

        Every collective first (see TrainingState.save): the gathers here, then the checkpoint's own
        reductions of sync-on-read variables, which TensorFlow makes before it writes a byte.
        """
        self._epoch.assign(position.epoch)
        self._step_in_epoch.assign(position.step_in_epoch)
        self._batch_in_epoch.assign(position.batches)
        host = rng.capture_host() if position.at_epoch_end else self._epoch_start_host
        host, metrics = _with_every_worker(host, self._metric_values(), coordinator)
        metrics = {f"{_METRICS}{path}": value for path, value in metrics.items()}
        extra = {**host, **rng.capture_device(), **metrics}
        return extra, callback_state.capture(self.callbacks)

    def load(self, directory: Path, manifest: Manifest, coordinator: Coordinator) -> None:
        prefix = _checkpoint_prefix(directory)
        try:
            reader = tf.train.load_checkpoint(prefix)
            stored = {name: int(reader.get_tensor(key)) for name, key in _COUNTER_KEYS.items()}
            batch_in_epoch = int(reader.get_tensor(_BATCH_KEY))
        except (tf.errors.OpError, ValueError, IndexError) as exc:
            raise CorruptBackupError(
                f"The checkpoint {prefix} cannot be read ({exc}). Expected the checkpoint that the "
                "manifest's checksums vouch for; nothing was loaded. Delete the backup "
                "(`unified-backup delete BACKUP_DIR`) to start fresh."
            ) from exc
        extra = _read_extra(directory / EXTRA_FILE)
        callbacks = callback_state.read(directory)
        expected = {"epoch": manifest.epoch, "step_in_epoch": manifest.step_in_epoch}
        if stored != expected:
            raise CorruptBackupError(
                f"The checkpoint {prefix} holds counters {stored}, but the manifest says {expected}. "
                "They are committed together, so the backup was altered; nothing was loaded. "
                "Delete the backup (`unified-backup delete BACKUP_DIR`) to start fresh."
            )
        try:
            self._checkpoint.restore(prefix).assert_existing_objects_matched()
        except (AssertionError, ValueError) as exc:
            raise IncompatibleBackupError(
                f"The checkpoint {prefix} does not match the model and optimizer being trained ({exc}). "
                "Restore the original model and optimizer to resume, or delete the backup "
                "(`unified-backup delete BACKUP_DIR`) to start fresh."
            ) from exc
        except (tf.errors.OpError, IndexError) as exc:
            raise CorruptBackupError(
                f"Restoring the checkpoint {prefix} failed ({exc}). Delete the backup (`unified-backup "
                "delete BACKUP_DIR`) to start fresh."
            ) from exc
        if self.global_step != manifest.global_step:
            raise CorruptBackupError(
                f"The optimizer's step counter restored from {prefix} is {self.global_step}, but the "
                f"manifest says global_step={manifest.global_step}. Delete the backup (`unified-backup "
                "delete BACKUP_DIR`) to start fresh."
            )
        host = _own_host(extra, coordinator)
        rng.restore_device(extra)  # first: creating Keras's global seed generator draws from `random`
        rng.restore_host(host)
        self._epoch_start_host = host
        self.restored_batch_in_epoch = batch_in_epoch
        self.restored_tf_seed = rng.stored_tf_seed(extra)
        self.restored_callbacks = callbacks
        self._restored_metrics = _own_rows(
            {k[len(_METRICS) :]: v for k, v in extra.items() if k.startswith(_METRICS)}, coordinator
        )

    def _metric_variables(self) -> list[tuple[str, keras.Variable]]:
        """(canonical path, variable) of each compiled metric's accumulator."""
        found = self.flavour.metric_variables(self.model)
        paths = canonical_paths(path for path, _ in found)
        return [(paths[path], v) for path, v in found]

    def _metric_values(self) -> dict[str, np.ndarray]:
        """Each metric variable's per-replica values, stacked (metrics sum over replicas when read)."""
        return {
            path: np.stack([np.asarray(part) for part in self.flavour.components(v)])
            for path, v in self._metric_variables()
        }

    def restore_metrics(self) -> bool:
        """Put back the compiled metrics' accumulators of a backup made inside an epoch.

        Call it once ``fit`` has reset the metrics for the resumed epoch and built them. Returns False
        (and restores nothing) when the metrics differ from those backed up.
        """
        saved, self._restored_metrics = self._restored_metrics, {}
        live = {path: self.flavour.components(v) for path, v in self._metric_variables()}
        if (
            not saved
            or set(saved) != set(live)
            or any(saved[path].shape != (len(parts), *parts[0].shape) for path, parts in live.items())
        ):
            return False
        for path, parts in live.items():
            for part, value in zip(parts, saved[path], strict=True):
                part.assign(value)
        return True


def _write(
    checkpoint: tf.train.Checkpoint, directory: Path, extra: rng.Arrays, callbacks: dict[str, Any]
) -> None:
    """Write ``checkpoint`` (live, or a snapshot's), ``resume_state.npz`` and the callbacks' state."""
    try:
        tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=1).save()
    except tf.errors.OpError as exc:
        raise BackupWriteError(
            errno.EIO, f"TensorFlow could not write the checkpoint into {directory}: {exc.message}"
        ) from exc
    np.savez(directory / EXTRA_FILE, **extra)  # type: ignore[arg-type]
    callback_state.write(directory, callbacks)


def _with_every_worker(
    host: rng.Arrays, metrics: rng.Arrays, coordinator: Coordinator
) -> tuple[rng.Arrays, rng.Arrays]:
    """What the chief's file holds of every worker, in one gather (one worker: its own, as it is).

    Host generator states: this process's, and every other worker's as ``worker-<rank>/<name>``
    (each worker's Python and NumPy generators are its own). Metric values: every worker's rows,
    worker 0's first, since each worker's accumulators hold the sums of the batches it read.
    """
    if isinstance(coordinator, SingleProcess):
        return host, metrics
    gathered = coordinator.gather(
        {
            "host": {name: value.tolist() for name, value in host.items()},
            "metrics": {path: value.tolist() for path, value in metrics.items()},
        }
    )
    every_host = dict(host)
    for rank, theirs in enumerate(gathered[1:], start=1):
        prefix = _WORKER.format(rank)
        every_host.update({prefix + n: np.asarray(v, host[n].dtype) for n, v in theirs["host"].items()})
    every_metrics = {
        path: np.concatenate([np.asarray(theirs["metrics"][path], value.dtype) for theirs in gathered])
        for path, value in metrics.items()
    }
    return every_host, every_metrics


def _own_host(extra: rng.Arrays, coordinator: Coordinator) -> rng.Arrays:
    """This worker's host generator states from a backup (the chief's when the backup has none of its)."""
    chief = {name: value for name, value in extra.items() if name.startswith(_HOST)}
    prefix = _WORKER.format(coordinator.rank)
    own = {name[len(prefix) :]: value for name, value in extra.items() if name.startswith(prefix)}
    return own if coordinator.rank > 0 and set(own) == set(chief) else chief


def _own_rows(saved: rng.Arrays, coordinator: Coordinator) -> rng.Arrays:
    """This worker's rows of the metric values every worker saved (all of them in one process).

    With another number of workers than the backup's, the rows do not split evenly: then nothing
    (the metrics of the resumed epoch start from zero, and ``restore_metrics`` says so).
    """
    if isinstance(coordinator, SingleProcess) or not saved:
        return saved
    workers = coordinator.workers  # type: ignore[attr-defined]
    own = {}
    for path, rows in saved.items():
        if len(rows) % workers:
            return {}
        per_worker = len(rows) // workers
        own[path] = rows[coordinator.rank * per_worker : (coordinator.rank + 1) * per_worker]
    return own


def canonical_paths(paths: Iterable[str]) -> Mapping[str, str]:
    """Map each variable path to the name a fresh process would give it.

    Keras makes auto-generated names unique per process (``dense``, ``dense_1``, ...), so a model
    rebuilt in the same process has other paths. Renumbering each name's suffix in order of first
    appearance undoes that, while two layers of the same kind keep distinct names.
    """
    renamed: dict[str, str] = {}
    seen: dict[str, int] = {}
    result = {}
    for path in paths:
        parts = []
        for part in path.split("/"):
            if part not in renamed:
                base = _UNIQUIFIED.match(part).group(1) or part  # type: ignore[union-attr]
                count = seen.get(base, 0)
                renamed[part] = base if count == 0 else f"{base}_{count}"
                seen[base] = count + 1
            parts.append(renamed[part])
        result[path] = "/".join(parts)
    return result


def _read_extra(path: Path) -> rng.Arrays:
    """The arrays of ``resume_state.npz``; never unpickles."""
    if not path.exists():
        raise CorruptBackupError(
            f"{path} is missing. Expected the random-number generator and metric state saved with every "
            "checkpoint; nothing was loaded. Delete the backup (`unified-backup delete BACKUP_DIR`) to "
            "start fresh."
        )
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CorruptBackupError(
            f"{path} cannot be read ({exc}). Expected the RNG and metric state written with the checkpoint; "
            "nothing was loaded. Delete the backup (`unified-backup delete BACKUP_DIR`) to start fresh."
        ) from exc


def _checkpoint_prefix(directory: Path) -> str:
    """The prefix (``.../ckpt-N``) of the one checkpoint in ``directory``, relative to it."""
    state = tf.train.get_checkpoint_state(str(directory))
    if state is None or not state.model_checkpoint_path:
        raise CorruptBackupError(
            f"{directory} holds no TensorFlow checkpoint state file ('checkpoint'). Expected the files "
            "tf.train.CheckpointManager writes; delete the backup (`unified-backup delete BACKUP_DIR`) "
            "to start fresh."
        )
    return str(directory / Path(state.model_checkpoint_path).name)
