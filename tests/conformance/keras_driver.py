"""The conformance drivers for Keras 3 and tf_keras (see ``driver.py`` for the contract of each method).

``shuffle=True`` feeds the documented exact reshuffling input. Keras 3: a ``keras.utils.PyDataset``
that draws a new sample order from NumPy's global generator at every epoch's start, read with
``fit(shuffle=True)`` (Keras then also shuffles the batch order with Python's ``random``).
tf_keras (whose ``Sequence`` has no ``on_epoch_begin``): a ``tf_keras.utils.Sequence`` read with
``fit(shuffle=True)``, which draws each epoch's batch order from Python's ``random``. Numpy arrays
with ``fit(shuffle=True)`` draw their order from TensorFlow's global seed, which a restore cannot
override, so a job restarted with another ``seed`` would read another order. tf_keras's Dropout is
made with ``rng_type="stateful"``, whose generator state can be saved.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
import numpy as np

from keras_impl import BackupAndRestore
from tests.harness import worker_argv

from .driver import STEPS_PER_EPOCH, FitResult, Hook, Interrupt

BATCH = 8
CHECKPOINT = "best.weights.h5"  # the file of fit(best_checkpoint=folder)
SAMPLES = STEPS_PER_EPOCH * BATCH


def data() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(1234)
    x = rs.normal(size=(SAMPLES, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * np.sin(3 * x[:, :1])).astype("float32")
    return x, y


class Reshuffled(keras.utils.PyDataset):
    """``x, y`` in batches of ``batch``, in a new order drawn from ``np.random`` at each epoch's start."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int) -> None:
        super().__init__()
        self.x, self.y, self.batch = x, y, batch
        self.order = np.arange(len(x))

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch)

    def on_epoch_begin(self) -> None:
        self.order = np.random.permutation(len(self.x))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch : (index + 1) * self.batch]
        return self.x[rows], self.y[rows]


@functools.cache
def tf_keras_reshuffled() -> type:
    """``Reshuffled`` for tf_keras: batches in a fixed order that ``fit(shuffle=True)`` shuffles."""
    import tf_keras

    class BatchOrderShuffled(tf_keras.utils.Sequence):
        def __init__(self, x: np.ndarray, y: np.ndarray, batch: int) -> None:
            super().__init__()
            self.x, self.y, self.batch = x, y, batch

        def __len__(self) -> int:
            return -(-len(self.x) // self.batch)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            rows = slice(index * self.batch, (index + 1) * self.batch)
            return self.x[rows], self.y[rows]

    return BatchOrderShuffled


@dataclasses.dataclass
class KerasRun:
    model: keras.Model
    seed: int
    shuffle: bool


@functools.cache
def callbacks_of(K: ModuleType) -> tuple[type, type]:
    """The driver's ``_Interrupt`` and ``_EpochRecorder``, made for ``K`` (keras or tf_keras)."""

    class Interrupt(_Interrupt, K.callbacks.Callback):  # type: ignore[misc,name-defined]
        pass

    class EpochRecorder(_EpochRecorder, K.callbacks.Callback):  # type: ignore[misc,name-defined]
        pass

    return Interrupt, EpochRecorder


class _Interrupt:
    """Raises ``RuntimeError("interrupt")`` before batch ``b`` of epoch ``e``, or at the end of fit.

    Under ``steps_per_execution=k``, fit runs batches k at a time: it raises before the execution
    that would train batch ``b``.
    """

    model: Any

    def __init__(self, at: Interrupt) -> None:
        super().__init__()
        self.at = at
        self.epoch = -1

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        per_call = self.model.steps_per_execution  # tf_keras: a (maybe mirrored) variable
        per_call = int(per_call.numpy() if hasattr(per_call, "numpy") else per_call)
        if isinstance(self.at, tuple) and self.epoch == self.at[0] and batch <= self.at[1] < batch + per_call:
            raise RuntimeError("interrupt")

    def on_train_end(self, logs: Any = None) -> None:
        if self.at == "end":
            raise RuntimeError("interrupt")


class _EpochRecorder:
    """The epochs that begin, and each ended epoch's mean loss as ``fit`` reports it; with ``hooks``,
    every training hook call (see ``Driver.fit``)."""

    model: Any

    def __init__(self, hooks: list[Hook] | None = None) -> None:
        super().__init__()
        self.epochs: list[int] = []
        self.losses: dict[int, float] = {}
        self.hooks = hooks
        self.epoch = -1

    def on_train_begin(self, logs: Any = None) -> None:
        self._record("train_begin")

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append(epoch)
        self.epoch = epoch
        self._record("epoch_begin", epoch)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.hooks is not None:
            self._record("batch_begin", self.epoch, batch, int(self.model.optimizer.iterations))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.hooks is not None:
            step = int(self.model.optimizer.iterations)
            self._record("batch_end", self.epoch, batch, step, float(logs["loss"]))

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.losses[epoch] = float(logs["loss"])
        self._record("epoch_end", epoch, self.losses[epoch])

    def on_train_end(self, logs: Any = None) -> None:
        self._record("train_end")

    def _record(self, *call: Any) -> None:
        if self.hooks is not None:
            self.hooks.append(call)


class KerasDriver:
    name = "keras"  # the manifest's framework
    K: ModuleType = keras
    message_logger: str | None = None  # Keras's callbacks print their messages to stdout
    begins_a_resumed_epoch = True

    def new_run(
        self,
        *,
        seed: int = 0,
        width: int = 8,
        optimizer: str = "adam",
        shuffle: bool = False,
        dropout: float = 0.0,
        lr_schedule: bool = False,
        accumulate: int = 1,
    ) -> KerasRun:
        K = self.K
        init = K.initializers.GlorotUniform
        layers = [K.Input((4,)), K.layers.Dense(width, "relu", kernel_initializer=init(seed))]
        if dropout:
            layers.append(K.layers.Dropout(dropout, seed=seed, **self.dropout_options))
        layers.append(K.layers.Dense(1, kernel_initializer=init(seed + 1000)))
        model = K.Sequential(layers)
        lr: Any = K.optimizers.schedules.ExponentialDecay(1e-2, 4, 0.9) if lr_schedule else 1e-2
        opt = K.optimizers.Adam(lr) if optimizer == "adam" else K.optimizers.SGD(lr, momentum=0.9)
        model.compile(optimizer=opt, loss="mse", steps_per_execution=accumulate)
        return KerasRun(model, seed, shuffle)

    def fit(
        self,
        run: KerasRun,
        backup_dir: Path | None,
        *,
        epochs: int,
        save_freq: str | int = "epoch",
        interrupt: Interrupt = None,
        early_stopping: bool = False,
        patience: bool = False,
        backup_first: bool = False,
        record_hooks: bool = False,
        best_checkpoint: Path | None = None,
        **options: Any,
    ) -> FitResult:
        interrupter, recorder_class = callbacks_of(self.K)
        hooks: list[Hook] = []
        recorder = recorder_class(hooks if record_hooks else None)
        callbacks: list[Any] = [recorder]
        if interrupt is not None:
            callbacks.append(interrupter(interrupt))
        if early_stopping:
            callbacks.append(self.K.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=0))
        if patience:  # no epoch after the first improves by 1e9: the LR halves after epoch 2, stop after 3
            callbacks.append(self.K.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=3))
            callbacks.append(
                self.K.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=2, min_delta=1e9)
            )
        checkpoint = None
        if best_checkpoint is not None:
            checkpoint = self.K.callbacks.ModelCheckpoint(
                str(best_checkpoint / CHECKPOINT), monitor="loss", mode="max", save_best_only=True,
                save_weights_only=True,
            )  # fmt: skip
            callbacks.append(checkpoint)
        backup = (
            BackupAndRestore(backup_dir, save_freq=save_freq, **options) if backup_dir is not None else None
        )
        if backup is not None:  # a new instance per fit, as in a restarted job
            callbacks.insert(0, backup) if backup_first else callbacks.append(backup)
        self.K.utils.set_random_seed(run.seed)  # as a restarted job's script does; a restore overrides it
        x, y = data()
        inputs: dict[str, Any] = {"x": x, "y": y, "batch_size": BATCH}
        if run.shuffle:
            inputs = {"x": self.reshuffled()(x, y, BATCH)}
        error = None
        try:
            run.model.fit(**inputs, epochs=epochs, shuffle=run.shuffle, verbose=0, callbacks=callbacks)
        except Exception as exc:  # noqa: BLE001 - returned to the scenario
            error = exc
            if backup is not None:
                # A restarted job is a new process, whose kernel dropped the old one's lock; this
                # process goes on, so release the folder as the process's end would (the backup stays).
                backup.release()
        best = float(checkpoint.best) if checkpoint is not None else None
        return FitResult(
            recorder.epochs, int(run.model.optimizer.iterations), error, recorder.losses, hooks, best
        )

    dropout_options: dict[str, Any] = {}

    @staticmethod
    def reshuffled() -> type:
        return Reshuffled

    def learning_rate(self, run: KerasRun) -> float:
        return float(np.array(run.model.optimizer.learning_rate))

    def weights(self, run: KerasRun) -> list[np.ndarray]:
        return [np.array(w) for w in run.model.get_weights()]

    def checkpoint_weights(self, folder: Path) -> list[np.ndarray]:
        run = self.new_run()
        run.model.load_weights(str(folder / CHECKPOINT))
        return self.weights(run)

    def optimizer_state(self, run: KerasRun) -> list[np.ndarray]:
        """Every optimizer variable: the step counter first, then the slots, in Keras's order."""
        return [np.array(v) for v in run.model.optimizer.variables]

    def demo_command(
        self,
        backup_dir: Path,
        out: Path,
        *,
        epochs: int,
        batch_sleep: float,
        save_freq: str | int = "epoch",
        exact: bool = False,
        preemption: Sequence[str] = (),
        async_backup: bool = False,
    ) -> list[str]:
        return worker_argv(
            self.name, backup_dir, out, epochs=epochs, batch_sleep=batch_sleep, save_freq=save_freq,
            exact=exact, preemption=preemption, async_backup=async_backup,
        )  # fmt: skip


class TfKerasDriver(KerasDriver):
    """The same runs built with tf_keras (legacy ``tf.keras``), through the same ``BackupAndRestore``."""

    name = "tf_keras"
    dropout_options = {"rng_type": "stateful"}

    @property
    def K(self) -> ModuleType:  # type: ignore[override]
        import tf_keras

        return tf_keras

    @staticmethod
    def reshuffled() -> type:
        return tf_keras_reshuffled()
