"""The Keras training state: fingerprint, save and load through ``tf.train.Checkpoint``.

One ``tf.train.CheckpointManager`` writes the model's variables, the optimizer (with its step
counter) and the epoch counters into the folder the core hands over, so weights and counters are
committed together. Loading reads the counters first and checks them against the manifest, then
restores everything and checks that every live object was matched.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import keras
import tensorflow as tf

from unified_backup import Counters, Manifest
from unified_backup.errors import BackupWriteError, CorruptBackupError, IncompatibleBackupError
from unified_backup.fingerprint import describe

_COUNTER_KEYS = {name: f"{name}/.ATTRIBUTES/VARIABLE_VALUE" for name in ("epoch", "step_in_epoch")}
_UNIQUIFIED = re.compile(r"^(.*?)(?:_(\d+))?$")


class KerasTrainingState:
    """A compiled Keras 3 model and its optimizer, as the core's ``TrainingState``.

    Save and load only once the model and its optimizer are built.
    """

    framework = "keras"

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.optimizer = model.optimizer
        self.framework_version = f"{keras.__version__} (tensorflow {tf.__version__})"
        with tf.init_scope():
            self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self._step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._built_checkpoint: tf.train.Checkpoint | None = None

    @property
    def _checkpoint(self) -> tf.train.Checkpoint:
        """Made at first use, once ``fit`` has built the model and its optimizer."""
        if self._built_checkpoint is None:
            # The explicit variable list also saves what the model does not track for tf.train
            # (the seed generators' states of e.g. Dropout, i.e. the layers' RNG states).
            self._built_checkpoint = tf.train.Checkpoint(
                model=self.model,
                optimizer=self.optimizer,
                model_variables=list(self.model.variables),
                epoch=self._epoch,
                step_in_epoch=self._step_in_epoch,
            )
        return self._built_checkpoint

    @property
    def global_step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def fingerprint(self) -> dict[str, str]:
        """``model/<path>`` and ``optimizer/<path>`` of every variable, plus ``optimizer/class``.

        Paths are canonicalised (see :func:`canonical_paths`) so that a model rebuilt in the same
        process, whose layers Keras names ``dense_2`` instead of ``dense``, gives the same keys.
        """
        model_paths = canonical_paths(v.path for v in self.model.variables)
        found = {f"model/{model_paths[v.path]}": describe(v.dtype, v.shape) for v in self.model.variables}
        flat = sorted(((p.replace("/", "_"), c.replace("/", "_")) for p, c in model_paths.items()),
                      key=lambda pair: -len(pair[0]))
        prefix = f"{self.optimizer.name}/"
        for v in self.optimizer.variables:
            name = v.path
            while name.startswith(prefix):  # a name scope may repeat it
                name = name[len(prefix):]
            for original, canonical in flat:
                if name.startswith(original + "_"):
                    name = canonical + name[len(original):]
                    break
            found[f"optimizer/{name}"] = describe(v.dtype, v.shape)
        found["optimizer/class"] = type(self.optimizer).__name__
        return found

    def record(self, counters: Counters) -> None:
        """Set the counters that the next :meth:`save` writes along with the weights."""
        self._epoch.assign(counters.epoch)
        self._step_in_epoch.assign(counters.step_in_epoch)

    def save(self, directory: Path) -> None:
        try:
            tf.train.CheckpointManager(self._checkpoint, str(directory), max_to_keep=1).save()
        except tf.errors.OpError as exc:
            raise BackupWriteError(
                errno.EIO, f"TensorFlow could not write the checkpoint into {directory}: {exc.message}"
            ) from exc

    def load(self, directory: Path, manifest: Manifest) -> None:
        prefix = _checkpoint_prefix(directory)
        try:
            reader = tf.train.load_checkpoint(prefix)
            stored = {name: int(reader.get_tensor(key)) for name, key in _COUNTER_KEYS.items()}
        except (tf.errors.OpError, ValueError, IndexError) as exc:
            raise CorruptBackupError(
                f"The checkpoint {prefix} cannot be read ({exc}). Expected the checkpoint that the "
                "manifest's checksums vouch for; nothing was loaded. Delete the backup to start fresh."
            ) from exc
        expected = {"epoch": manifest.epoch, "step_in_epoch": manifest.step_in_epoch}
        if stored != expected:
            raise CorruptBackupError(
                f"The checkpoint {prefix} holds counters {stored}, but the manifest says {expected}. "
                "They are committed together, so the backup was altered; nothing was loaded. "
                "Delete the backup to start fresh."
            )
        try:
            self._checkpoint.restore(prefix).assert_existing_objects_matched()
        except (AssertionError, ValueError) as exc:
            raise IncompatibleBackupError(
                f"The checkpoint {prefix} does not match the model and optimizer being trained ({exc}). "
                "Restore the original model and optimizer to resume, or delete the backup to start fresh."
            ) from exc
        except (tf.errors.OpError, IndexError) as exc:
            raise CorruptBackupError(
                f"Restoring the checkpoint {prefix} failed ({exc}). Delete the backup to start fresh."
            ) from exc
        if self.global_step != manifest.global_step:
            raise CorruptBackupError(
                f"The optimizer's step counter restored from {prefix} is {self.global_step}, but the "
                f"manifest says global_step={manifest.global_step}. Delete the backup to start fresh."
            )


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


def _checkpoint_prefix(directory: Path) -> str:
    """The prefix (``.../ckpt-N``) of the one checkpoint in ``directory``, relative to it."""
    state = tf.train.get_checkpoint_state(str(directory))
    if state is None or not state.model_checkpoint_path:
        raise CorruptBackupError(
            f"{directory} holds no TensorFlow checkpoint state file ('checkpoint'). Expected the files "
            "tf.train.CheckpointManager writes; delete the backup to start fresh."
        )
    return str(directory / Path(state.model_checkpoint_path).name)
