"""One-process strategies in this process: OneDeviceStrategy resumes bit-identical, in both flavours;
a strategy outside the supported list is refused by name, and the topology is what the manifest records.

(MirroredStrategy needs two logical devices set before TensorFlow starts: ``test_processes.py``;
multi-process clusters: ``test_multiworker.py``.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from keras_impl import BackupAndRestore, strategies
from tests.conformance.keras_driver import BATCH, data
from unified_backup import UnsupportedEnvironmentError

FLAVOURS = [
    pytest.param("keras", marks=pytest.mark.keras),
    pytest.param("tf_keras", marks=pytest.mark.tf_keras),
]


def keras_module(flavour: str):
    if flavour == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    return keras


def model(K, strategy, seed: int = 0):
    init = K.initializers.GlorotUniform
    with strategy.scope():
        run = K.Sequential(
            [
                K.Input((4,)),
                K.layers.Dense(8, activation="relu", kernel_initializer=init(seed)),
                K.layers.Dense(1, kernel_initializer=init(seed + 1000)),
            ]
        )
        run.compile(optimizer=K.optimizers.Adam(1e-2), loss="mse")
    return run


class Interrupt:
    """Raises before batch ``at[1]`` of epoch ``at[0]``."""

    def __new__(cls, K, at):
        class _Interrupt(K.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_begin(self, batch, logs=None):
                if (self.epoch, batch) == at:
                    raise RuntimeError("interrupt")

        return _Interrupt()


def weights(run) -> list[np.ndarray]:
    return [*run.get_weights(), *(np.asarray(v) for v in optimizer_variables(run))]


def optimizer_variables(run):
    variables = run.optimizer.variables
    return variables() if callable(variables) else variables


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_device_strategy_resumes_bit_identical_and_records_its_topology(tmp_path, flavour):
    K = keras_module(flavour)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    x, y = data()
    fit = dict(x=x, y=y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    reference = model(K, strategy)
    reference.fit(**fit)

    backup_dir = tmp_path / "b"
    interrupted = model(K, strategy)
    callback = BackupAndRestore(backup_dir, save_freq=3)
    with pytest.raises(RuntimeError, match="interrupt"):
        interrupted.fit(**fit, callbacks=[Interrupt(K, (1, 4)), callback])
    callback.release()
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    assert manifest["topology"] == {"strategy": "OneDevice", "workers": 1, "replicas": 1, "cluster": {}}

    resumed = model(K, strategy, seed=1)
    resumed.fit(**fit, callbacks=[BackupAndRestore(backup_dir, save_freq=3)])
    assert all(np.array_equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))
    assert not backup_dir.exists()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_strategy_outside_the_supported_list_is_refused_by_name(tmp_path, flavour):
    K = keras_module(flavour)
    strategy = tf.distribute.experimental.CentralStorageStrategy()
    x, y = data()
    run = model(K, strategy)
    callback = BackupAndRestore(tmp_path / "b")
    callback.set_model(run)
    with pytest.raises(UnsupportedEnvironmentError) as refused:
        callback.on_train_begin()
    message = str(refused.value)
    assert "does not support CentralStorageStrategy" in message and strategies.SUPPORTED in message
    assert not (tmp_path / "b" / "manifest.json").exists()
    # the fit itself is refused the same way, and the folder is left as it was
    with pytest.raises(UnsupportedEnvironmentError, match="does not support CentralStorageStrategy"):
        run.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[BackupAndRestore(tmp_path / "b")])


def test_the_kind_of_each_one_process_strategy():
    assert strategies.kind(tf.distribute.get_strategy()) == "default"
    assert strategies.kind(tf.distribute.OneDeviceStrategy("/cpu:0")) == "OneDevice"
    assert strategies.kind(tf.distribute.MirroredStrategy(["/cpu:0"])) == "Mirrored"
    assert strategies.topology(tf.distribute.MirroredStrategy(["/cpu:0"])) == {
        "strategy": "Mirrored",
        "workers": 1,
        "replicas": 1,
        "cluster": {},
    }


@pytest.mark.tf_keras
def test_a_backup_of_another_strategy_of_the_same_shape_restores_exactly_without_a_warning(tmp_path, caplog):
    """OneDevice and no strategy: one worker, one replica. The shapes match; only the names differ.
    (A backup of another shape warns: tests/core/test_lifecycle.py; the shapes of real clusters are
    asserted in test_multiworker.py.)"""
    import logging

    K = keras_module("tf_keras")
    x, y = data()
    fit = dict(x=x, y=y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    reference = model(K, tf.distribute.get_strategy())
    reference.fit(**fit)
    backup_dir = tmp_path / "b"
    interrupted = model(K, tf.distribute.OneDeviceStrategy("/cpu:0"))
    callback = BackupAndRestore(backup_dir)
    with pytest.raises(RuntimeError, match="interrupt"):
        interrupted.fit(**fit, callbacks=[Interrupt(K, (2, 1)), callback])
    callback.release()

    resumed = model(K, tf.distribute.get_strategy(), seed=1)
    callback = BackupAndRestore(backup_dir)
    with caplog.at_level(logging.WARNING, logger="unified_backup"):
        resumed.fit(**fit, callbacks=[callback])
    assert callback.restored is not None and callback.restored.topology["strategy"] == "OneDevice"
    assert "another shape" not in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(weights(resumed), weights(reference), strict=True))
