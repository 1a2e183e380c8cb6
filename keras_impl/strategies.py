"""The ``tf.distribute`` strategies ``BackupAndRestore`` runs under, what each allows, the job's topology.

=========================== ========== ========== ==============================================
strategy                    Keras 3    tf_keras   backups
=========================== ========== ========== ==============================================
none / OneDevice / Mirrored yes        yes        epoch, step, preemption (one process)
MultiWorkerMirrored         refused*   yes        epoch, step, preemption; every worker saves,
                                                  the chief commits
ParameterServer             refused**  yes        epoch and preemption, on the coordinator;
                                                  an integer ``save_freq`` is refused
TPU                         untested   untested   as one process: the client commits
anything else               refused    refused
=========================== ========== ========== ==============================================

\\* with more than one worker: Keras 3's ``fit`` fails under MultiWorkerMirrored before any callback
runs (keras-team/keras#20585). One worker is one process, as for Mirrored.
\\** Keras 3 has no ParameterServer support in ``fit``.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from keras_impl import coordinator
from unified_backup.errors import InvalidArgumentError, UnsupportedEnvironmentError

SUPPORTED = (
    "no strategy, OneDeviceStrategy, MirroredStrategy, TPUStrategy (untested); with tf_keras also "
    "MultiWorkerMirroredStrategy and ParameterServerStrategy (epoch backups)"
)
_ONE_PROCESS = ("_DefaultDistributionStrategy", "OneDeviceStrategy", "MirroredStrategy")


def kind(strategy: tf.distribute.Strategy) -> str:
    """The strategy's kind: ``default``, ``OneDevice``, ``Mirrored``, ``MultiWorkerMirrored``,
    ``ParameterServer``, ``TPU``, or its class name for any other."""
    if coordinator.is_multi_worker_mirrored(strategy):
        return "MultiWorkerMirrored"
    if is_parameter_server(strategy):
        return "ParameterServer"
    if "TPUStrategy" in type(strategy).__name__:
        return "TPU"
    name = type(strategy).__name__.replace("V1", "").replace("V2", "")
    if name == "_DefaultDistributionStrategy":
        return "default"
    if name in _ONE_PROCESS:
        return name.removesuffix("Strategy")
    return type(strategy).__name__


def is_parameter_server(strategy: tf.distribute.Strategy | None) -> bool:
    return isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)


def check(strategy: tf.distribute.Strategy, flavour: Any, per_epoch: bool, background: bool = False) -> None:
    """Refuse a strategy (or a ``save_freq``, or ``async_backup`` under it) that this adapter cannot
    back up exactly."""
    found = kind(strategy)
    if background and found not in ("default", "OneDevice", "Mirrored"):
        raise UnsupportedEnvironmentError(
            f"async_backup=True needs a strategy that trains in one process (no strategy, OneDeviceStrategy "
            f"or MirroredStrategy), found {type(strategy).__name__}: its variables live on other processes. "
            "Pass async_backup=False."
        )
    workers = coordinator.workers(strategy)
    if found == "MultiWorkerMirrored" and flavour.name == "keras" and workers > 1:
        raise UnsupportedEnvironmentError(
            f"BackupAndRestore for Keras 3 cannot run under MultiWorkerMirroredStrategy ({workers} workers): "
            "Keras 3's fit does not train under it (keras-team/keras#20585, open). Train the multi-worker "
            "job with tf_keras (import tf_keras, or TF_USE_LEGACY_KERAS=1), which this callback supports."
        )
    if found == "ParameterServer":
        if flavour.name == "keras":
            raise UnsupportedEnvironmentError(
                "BackupAndRestore for Keras 3 cannot run under ParameterServerStrategy: Keras 3's fit has "
                "no ParameterServer support. Train with tf_keras, which this callback supports there."
            )
        if not per_epoch:
            raise InvalidArgumentError(
                "save_freq must be 'epoch' (or False) under ParameterServerStrategy, but an integer was "
                "given: the workers run steps asynchronously, so no step is a point that every variable "
                "has reached and a step backup could not resume exactly. Use save_freq='epoch'."
            )
    if found not in ("default", "OneDevice", "Mirrored", "MultiWorkerMirrored", "ParameterServer", "TPU"):
        raise UnsupportedEnvironmentError(
            f"BackupAndRestore does not support {type(strategy).__name__}; supported: {SUPPORTED}."
        )


def topology(strategy: tf.distribute.Strategy) -> dict[str, Any]:
    """The shape of the job, as the manifest records it: strategy kind, processes that run ``fit``
    (workers), replicas, and the cluster's jobs."""
    found = kind(strategy)
    return {
        "strategy": found,
        "workers": coordinator.workers(strategy) if found == "MultiWorkerMirrored" else 1,
        "replicas": int(strategy.num_replicas_in_sync),
        "cluster": coordinator.cluster_jobs(strategy),
    }
