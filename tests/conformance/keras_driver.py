"""The conformance driver for Keras 3 on TensorFlow (see ``driver.py`` for the contract of each method)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_impl import BackupAndRestore

from .driver import STEPS_PER_EPOCH, FitResult, Interrupt

BATCH = 8
SAMPLES = STEPS_PER_EPOCH * BATCH


def data() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(1234)
    x = rs.normal(size=(SAMPLES, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * np.sin(3 * x[:, :1])).astype("float32")
    return x, y


class _Interrupt(keras.callbacks.Callback):
    """Raises ``RuntimeError("interrupt")`` before batch ``b`` of epoch ``e``, or at the end of fit."""

    def __init__(self, at: Interrupt) -> None:
        super().__init__()
        self.at = at
        self.epoch = -1

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if isinstance(self.at, tuple) and (self.epoch, batch) == self.at:
            raise RuntimeError("interrupt")

    def on_train_end(self, logs: Any = None) -> None:
        if self.at == "end":
            raise RuntimeError("interrupt")


class _EpochRecorder(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append(epoch)


class KerasDriver:
    name = "keras"

    def new_run(self, *, seed: int = 0, width: int = 8, optimizer: str = "adam") -> keras.Model:
        init = keras.initializers.GlorotUniform
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(width, activation="relu", kernel_initializer=init(seed)),
                keras.layers.Dense(1, kernel_initializer=init(seed + 1000)),
            ]
        )
        opt = keras.optimizers.Adam(1e-2) if optimizer == "adam" else keras.optimizers.SGD(1e-2, momentum=0.9)
        model.compile(optimizer=opt, loss="mse")
        return model

    def fit(
        self,
        run: keras.Model,
        backup_dir: Path | None,
        *,
        epochs: int,
        save_freq: str | int = "epoch",
        interrupt: Interrupt = None,
        early_stopping: bool = False,
    ) -> FitResult:
        recorder = _EpochRecorder()
        callbacks: list[keras.callbacks.Callback] = [recorder]
        if interrupt is not None:
            callbacks.append(_Interrupt(interrupt))
        if early_stopping:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=0))
        backup = BackupAndRestore(backup_dir, save_freq=save_freq) if backup_dir is not None else None
        if backup is not None:
            callbacks.append(backup)  # a new instance per fit, as in a restarted job
        x, y = data()
        error = None
        try:
            run.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
        except Exception as exc:  # noqa: BLE001 - returned to the scenario
            error = exc
            if backup is not None:
                # A restarted job is a new process, whose kernel dropped the old one's lock; this
                # process goes on, so drop the lock as the process's end would (the backup stays).
                backup._lifecycle.finish(success=False)
        return FitResult(recorder.epochs, int(run.optimizer.iterations), error)

    def weights(self, run: keras.Model) -> list[np.ndarray]:
        return [np.array(w) for w in run.get_weights()]

    def demo_command(self, backup_dir: Path, out: Path, *, epochs: int, batch_sleep: float) -> list[str]:
        return [
            sys.executable, "-m", "keras_impl.demo",
            "--backup-dir", str(backup_dir), "--out", str(out),
            "--epochs", str(epochs), "--batch-sleep", str(batch_sleep),
        ]
