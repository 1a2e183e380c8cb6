"""The Keras demo worker: trains the demo model with ``BackupAndRestore`` and reports events.

``python -m keras_impl.demo`` trains with Keras 3, ``python -m keras_impl.tf_keras_demo`` with tf_keras;
both take ``--backup-dir DIR --out OUT.json [--epochs 10] [--seed 0]
[--batch-sleep 0.0] [--save-freq epoch|N|false] [--shuffle] [--dropout RATE] [--hidden 16]
[--save-before-preemption [SIGNAL ...]] [--keep-previous] [--mirrored]``

Prints ``UB-EVENT {json}`` lines on stdout (start, epoch with its loss, done); writes the final weights
to OUT.json (and their ``weights_sha256``: of the float64 little-endian bytes, in the same order; and
``losses``: epoch -> loss for the epochs this run trained).
Run it again with the same ``--backup-dir`` after a kill, and it resumes; the final weights equal
those of an uninterrupted run. ``--shuffle`` reshuffles the samples at every epoch's start (a
``keras.utils.PyDataset`` drawing from NumPy's global generator, read with ``fit(shuffle=True)``;
tf_keras: a ``Sequence`` whose batch order ``fit(shuffle=True)`` draws from Python's ``random``);
``--dropout RATE`` adds a Dropout layer after the hidden one (tf_keras: ``rng_type="stateful"``):
the result is still bit-identical.
``--save-before-preemption`` alone stops on SIGTERM, with names (``SIGTERM SIGUSR1``) on those: the
worker backs up the step, logs one warning on stderr and exits with code 143. ``--keep-previous``
passes ``keep_previous=True`` (the second slot). ``--mirrored`` trains under ``MirroredStrategy`` on two
logical CPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from unified_backup.demo import callback_options, emit, worker_parser

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def parse(argv: Sequence[str] | None, module: str = "keras_impl.demo") -> argparse.Namespace:
    parser = worker_parser(module, __doc__.splitlines()[0])
    parser.add_argument(
        "--mirrored", action="store_true", help="train under MirroredStrategy on two logical CPUs"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, framework: str = "keras") -> int:
    """Run the worker with Keras 3 (``framework="keras"``) or tf_keras (``"tf_keras"``)."""
    args = parse(argv, "keras_impl.demo" if framework == "keras" else "keras_impl.tf_keras_demo")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # stderr
    for name in ("unified_backup", "keras_impl"):
        logging.getLogger(name).setLevel(logging.INFO)

    import numpy as np
    import tensorflow as tf

    # Before TensorFlow starts its thread pools: one thread each, so every run computes alike.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.mirrored:  # before TensorFlow initialises its devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    devices = ["/cpu:0", "/cpu:1"]
    strategy = tf.distribute.MirroredStrategy(devices) if args.mirrored else tf.distribute.get_strategy()

    if framework == "tf_keras":
        import tf_keras as keras
    else:
        import keras

    from keras_impl import BackupAndRestore

    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    rs = np.random.RandomState(args.seed)
    x = rs.normal(size=(256, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * np.sin(3 * x[:, :1])).astype(np.float32)

    class Reshuffled(getattr(keras.utils, "PyDataset", None) or keras.utils.Sequence):  # type: ignore[misc]
        """The samples in batches of 16; Keras 3: in a new order drawn from ``np.random`` at each epoch's
        start (tf_keras has no such hook: ``fit(shuffle=True)`` shuffles the batches' order)."""

        def __init__(self) -> None:
            super().__init__()
            self.order = np.arange(len(x))

        def __len__(self) -> int:
            return len(x) // 16

        def on_epoch_begin(self) -> None:
            self.order = np.random.permutation(len(x))

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            rows = self.order[index * 16 : (index + 1) * 16]
            return x[rows], y[rows]

    layers = [keras.Input((4,)), keras.layers.Dense(args.hidden, activation="relu")]
    if args.dropout:
        stateful = {"rng_type": "stateful"} if framework == "tf_keras" else {}
        layers.append(keras.layers.Dropout(args.dropout, seed=args.seed, **stateful))
    with strategy.scope():
        model = keras.Sequential([*layers, keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    backup = BackupAndRestore(args.backup_dir, **callback_options(args))
    epochs_run: list[int] = []
    losses: dict[int, float] = {}  # epoch -> its mean training loss, for epochs trained in this fit

    class Events(keras.callbacks.Callback):
        """Sees the restore (BackupAndRestore's ``on_train_begin`` runs first, as listed) and reports
        each epoch once its backup is done: BackupAndRestore's other hooks run after every other
        callback's, so an epoch's line waits for the next hook (the next epoch's begin, or the end)."""

        ended: int | None = None  # an epoch whose line waits for its backup

        def report(self) -> None:
            if self.ended is not None:
                emit("epoch", epoch=self.ended, loss=losses[self.ended])
                self.ended = None

        def on_train_begin(self, logs: Any = None) -> None:
            restored = backup.restored
            emit(
                "start",
                restored_epoch=None if restored is None else restored.epoch,
                global_step=int(model.optimizer.iterations.numpy()),
            )

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.report()
            epochs_run.append(epoch)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if args.batch_sleep > 0:
                time.sleep(args.batch_sleep)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            losses[epoch] = float(logs["loss"])
            self.ended = epoch

        def on_train_end(self, logs: Any = None) -> None:
            self.report()

    data: dict[str, Any] = {"x": Reshuffled()} if args.shuffle else {"x": x, "y": y, "batch_size": 16}
    model.fit(**data, epochs=args.epochs, shuffle=args.shuffle, verbose=0, callbacks=[backup, Events()])
    emit(
        "done",
        backups=backup.stats.backups,
        backup_seconds=round(backup.stats.seconds, 4),
        epochs_run=len(epochs_run),
    )
    weights = np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in model.get_weights()])
    with open(args.out, "w", encoding="utf-8") as f:
        digest = hashlib.sha256(weights.astype("<f8").tobytes()).hexdigest()
        json.dump(
            {
                "framework": framework,
                "weights": weights.tolist(),
                "weights_sha256": digest,
                "losses": {str(epoch): loss for epoch, loss in losses.items()},
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
