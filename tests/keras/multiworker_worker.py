"""One task of a MultiWorkerMirrored or ParameterServer training, as ``tests.keras.cluster`` starts it.

``python -m tests.keras.multiworker_worker OUT [options] JOB INDEX`` (TF_CONFIG set by the launcher):
trains the tf_keras MLP of the conformance suite with ``BackupAndRestore`` and writes
``OUT/<job>-<index>.json`` (weights, optimizer variables, epochs run, what was restored) when ``fit``
returns. ``--raise-at E B`` raises in this task at batch B of epoch E; ``--sigterm-at E B`` sends
SIGTERM to this task after batch B of epoch E (both only on the task named by ``--on``);
``--no-callback`` trains without it (the reference, or stock Keras 3 under MultiWorkerMirrored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--backup-dir", type=Path)
parser.add_argument("--save-freq", default="epoch")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--flavour", choices=["tf_keras", "keras"], default="tf_keras")
parser.add_argument("--raise-at", type=int, nargs=2)
parser.add_argument("--sigterm-at", type=int, nargs=2)
parser.add_argument("--on", default="worker-1")
parser.add_argument("--batch-sleep", type=float, default=0.0)
parser.add_argument("--preemption", action="store_true")
parser.add_argument("--no-callback", action="store_true")
parser.add_argument("--shuffle", action="store_true")
parser.add_argument("--steps-per-execution", type=int, default=1)
parser.add_argument("--hidden", type=int, default=8)
parser.add_argument("--on-write-error", default="raise")
parser.add_argument("--file-size-limit", type=int, help="RLIMIT_FSIZE (bytes) of the task named by --on")
parser.add_argument("--probe-refusal", action="store_true", help="call on_train_begin outside fit; report")
parser.add_argument("job")
parser.add_argument("index", type=int)
args = parser.parse_args()
me = f"{args.job}-{args.index}"
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
logging.getLogger("unified_backup").setLevel(logging.INFO)
logging.getLogger("keras_impl").setLevel(logging.INFO)

if args.flavour == "tf_keras":
    import tf_keras as keras
else:
    import keras  # noqa: E402

from keras_impl import BackupAndRestore  # noqa: E402
from tests.conformance.keras_driver import BATCH, data  # noqa: E402
from unified_backup import BackupError  # noqa: E402
from unified_backup.preemption import TrainingPreempted  # noqa: E402

PS = "ps" in json.loads(os.environ["TF_CONFIG"])["cluster"]


class Epochs(keras.callbacks.Callback):
    """What every task reports of the epochs it ran; ``--raise-at E -1`` raises as epoch E begins (the
    only interruption with epoch hooks alone, which is all ParameterServerStrategy allows)."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch, self.seen, self.losses, self.draws = -1, [], {}, {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.seen.append(epoch)
        self.draws[epoch] = [random.getrandbits(30), int(np.random.randint(1 << 30))]  # this worker's own
        print(f"epoch {epoch} begins", flush=True)
        if args.raise_at and me == args.on and args.raise_at == [epoch, -1]:
            raise RuntimeError(f"interrupt on {me}")

    def on_epoch_end(self, epoch, logs=None):
        self.losses[epoch] = float(logs["loss"])
        print(f"epoch {epoch} ends", flush=True)
        if args.sigterm_at and me == args.on and args.sigterm_at == [epoch, -1]:
            os.kill(os.getpid(), signal.SIGTERM)


class Faults(Epochs):
    """The interruption this task takes at a batch: raise before it, or SIGTERM after it."""

    def on_train_batch_begin(self, batch, logs=None):
        if args.raise_at and me == args.on and [self.epoch, batch] == args.raise_at:
            raise RuntimeError(f"interrupt on {me}")

    def on_train_batch_end(self, batch, logs=None):
        if args.batch_sleep:
            time.sleep(args.batch_sleep)
        if args.sigterm_at and me == args.on and [self.epoch, batch] == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


def model(strategy):
    init = keras.initializers.GlorotUniform
    with strategy.scope():
        run = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(args.hidden, activation="relu", kernel_initializer=init(0)),
                keras.layers.Dense(1, kernel_initializer=init(1000)),
            ]
        )
        run.compile(
            optimizer=keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=args.steps_per_execution
        )
    return run


def flat(values) -> list[float]:
    return np.concatenate([np.asarray(v).ravel() for v in values]).tolist()


def worker() -> None:
    if args.file_size_limit and me == args.on:  # a real write error (EFBIG) in this task's saves only
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.file_size_limit, hard))  # lifted for the report
    if PS:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(7)
    run = model(strategy)
    random.seed(100 + args.index)  # each worker's host generators their own
    np.random.seed(100 + args.index)
    faults = Epochs() if PS else Faults()
    callbacks: list = [faults]
    backup = None
    if not args.no_callback:
        save_freq = args.save_freq if args.save_freq in ("epoch", "False") else int(args.save_freq)
        backup = BackupAndRestore(
            args.backup_dir,
            save_freq=False if save_freq == "False" else save_freq,
            save_before_preemption=args.preemption,
            on_write_error=args.on_write_error,
        )
        callbacks.append(backup)
    if args.probe_refusal:
        backup.set_model(run)
        try:
            backup.on_train_begin()
            refusal = None
        except BackupError as exc:
            refusal = f"{type(exc).__name__}: {exc}"
        (args.out / f"{me}.json").write_text(json.dumps({"refusal": refusal}))
        return
    x, y = data()
    if PS:
        # Every batch is the whole data set: under PSS each worker reads its own copy of the data and the
        # workers take steps in a random interleaving, so batches of distinct samples would reach the
        # variables in another order in every run (and a resumed run restarts each worker's copy).
        def dataset_fn(context):
            return tf.data.Dataset.from_tensors((x, y)).repeat()

        creator = keras.utils.experimental.DatasetCreator(dataset_fn)
        fit_input = dict(x=creator, steps_per_epoch=len(x) // BATCH)
    else:
        fit_input = dict(x=x, y=y, batch_size=2 * BATCH, shuffle=args.shuffle)
    print("fit begins", flush=True)
    try:
        run.fit(**fit_input, epochs=args.epochs, verbose=0, callbacks=callbacks)
    except TrainingPreempted as exc:
        print(f"preempted: {exc}", flush=True)
        raise SystemExit(exc.code) from None
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.getrlimit(resource.RLIMIT_FSIZE)[1],) * 2)
    restored = backup.restored if backup is not None else None
    report = {
        "epochs_run": faults.seen,
        "losses": faults.losses,
        "draws": faults.draws,
        "iterations": int(run.optimizer.iterations.numpy()),
        "weights": flat(run.get_weights()),
        "optimizer": flat(v.numpy() for v in run.optimizer.variables()),
        "restored": [restored.epoch, restored.step_in_epoch, restored.global_step] if restored else None,
        "topology": dict(restored.topology) if restored else None,
        "batch_hooks": backup._implements_train_batch_hooks() if backup is not None else None,
    }
    (args.out / f"{me}.json").write_text(json.dumps(report))


def server() -> None:
    """A ParameterServer worker or ps: serve until the launcher ends the job."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = tf.distribute.Server(
        resolver.cluster_spec(), job_name=args.job, task_index=args.index, protocol="grpc", start=True
    )
    print("serving", flush=True)
    server.join()


if __name__ == "__main__":
    if PS and args.job in ("worker", "ps"):
        server()
    else:
        worker()
