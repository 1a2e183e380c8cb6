"""Run under two logical CPUs with MirroredStrategy: reference, interrupt, resume; print the outcome as JSON.

``python -m tests.keras.mirrored_worker [keras|tf_keras]``: the models are built with Keras 3
(default) or tf_keras. A script (run by ``test_processes.py`` in its own process) because logical
devices must be set before TensorFlow initialises its devices, and TensorFlow's state is shared by
the whole process.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

if sys.argv[1:] == ["tf_keras"]:
    import tf_keras as keras
else:
    import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_impl import BackupAndRestore  # noqa: E402
from tests.conformance.keras_driver import BATCH, data  # noqa: E402
from unified_backup import Slot  # noqa: E402
from unified_backup.preemption import TrainingPreempted  # noqa: E402

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at, self.epoch = at, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupt")


class Preempt(Interrupt):
    """Sends SIGTERM to this process at the end of batch ``at[1]`` of epoch ``at[0]``."""

    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            signal.raise_signal(signal.SIGTERM)


class Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []
        self.losses = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.losses[epoch] = float(logs["loss"])


def model(seed, unbuilt=False):
    """The MLP; ``unbuilt``: without an Input (built in fit) and with a compiled metric besides the loss."""
    init = keras.initializers.GlorotUniform
    with strategy.scope():
        layers = [
            keras.layers.Dense(8, activation="relu", kernel_initializer=init(seed)),
            keras.layers.Dense(1, kernel_initializer=init(seed + 1000)),
        ]
        run = keras.Sequential(layers if unbuilt else [keras.Input((4,)), *layers])
        run.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"] if unbuilt else None)
    return run


def fit(run, callbacks):
    x, y = data()
    epochs = Epochs()
    run.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=[epochs, *callbacks])
    return epochs


def flat(run):
    return np.concatenate([w.ravel() for w in run.get_weights()])


def scenario(root: Path, save_freq, at, preempt=False, unbuilt=False):
    backup_dir = root / f"backup-{save_freq}-{preempt}-{unbuilt}"
    callback = BackupAndRestore(backup_dir, save_freq=save_freq, save_before_preemption=preempt)
    try:
        fit(model(0, unbuilt), [Preempt(at) if preempt else Interrupt(at), callback])
    except TrainingPreempted:  # it has released the folder and the SIGTERM handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    except RuntimeError:
        callback.release()
    manifest = Slot(backup_dir).read_manifest()
    resumed = model(1, unbuilt)
    epochs = fit(resumed, [BackupAndRestore(backup_dir, save_freq=save_freq)])
    return {
        "counters": [manifest.epoch, manifest.step_in_epoch, manifest.global_step],
        "epochs_run": epochs.seen,
        "losses": epochs.losses,
        "iterations": int(resumed.optimizer.iterations.numpy()),
        "weights": flat(resumed).tolist(),
        "left": backup_dir.exists(),
    }


def main() -> None:
    reference = model(0)
    reference_losses = fit(reference, []).losses
    with tempfile.TemporaryDirectory() as root:
        out = {
            "replicas": strategy.num_replicas_in_sync,
            "reference": flat(reference).tolist(),
            "reference_losses": reference_losses,
            "epoch": scenario(Path(root), "epoch", (2, 3)),
            "steps": scenario(Path(root), 3, (2, 6)),
            "preempted": scenario(Path(root), "epoch", (1, 4), preempt=True),  # SIGTERM after batch 4
            "unbuilt": scenario(Path(root), 3, (2, 6), unbuilt=True),
        }
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
