"""The core's :class:`unified_backup.Coordinator` for a ``tf.distribute`` strategy, and the job's topology.

One process per ``fit`` (no strategy, OneDevice, Mirrored, the coordinator of ParameterServer, the
client of a TPU) is :class:`unified_backup.coordinator.SingleProcess`. Under MultiWorkerMirrored
every worker runs ``fit``, and the processes agree through the strategy's own collectives: a sum
of integer tensors over the workers (:meth:`TfCoordinator._all_sum`), which carries flags, barriers
and JSON values alike. Those collectives go through the same channel as the training steps', so
they need nothing else open between the workers. NOTE: every worker must make the same calls in
the same order, as for the training step itself.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
import tensorflow as tf

from keras_impl import _private
from unified_backup.coordinator import Coordinator, SingleProcess
from unified_backup.errors import UnsupportedEnvironmentError

T = TypeVar("T")

_WORKER_JOBS = ("chief", "worker")  # the jobs that run fit under MultiWorkerMirrored, chief first


class TfCoordinator:
    """The workers of one MultiWorkerMirrored ``fit``, as seen by one of them.

    Rank 0 is the chief (or worker 0 when the cluster has none): the worker TensorFlow lets write
    checkpoints (``strategy.extended.should_checkpoint``).
    """

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self._strategy = strategy
        resolver = strategy.cluster_resolver
        tasks = [
            (job, i)
            for job, count in cluster_jobs(strategy).items()
            if job in _WORKER_JOBS
            for i in range(count)
        ]
        self._tasks = sorted(tasks, key=lambda task: (_WORKER_JOBS.index(task[0]), task[1]))
        me = (resolver.task_type, int(resolver.task_id))
        if me not in self._tasks:
            raise UnsupportedEnvironmentError(
                f"BackupAndRestore runs in the tasks that train under MultiWorkerMirroredStrategy (chief "
                f"and worker), but found fit called in task {me[0]} {me[1]}. Leave the callback out of an "
                "evaluator's fit, or train only in the chief and worker tasks."
            )
        self.rank = self._tasks.index(me)
        self.is_primary = bool(strategy.extended.should_checkpoint)
        if self.is_primary != (self.rank == 0):
            raise UnsupportedEnvironmentError(
                f"Expected the chief (or worker 0 without a chief) to be the worker that checkpoints; "
                f"found should_checkpoint={self.is_primary} on {resolver.task_type} {resolver.task_id}."
            )

    @property
    def workers(self) -> int:
        return len(self._tasks)

    def barrier(self, name: str) -> None:
        self._all_sum(np.zeros(1, np.int64))

    def broadcast(self, value: T) -> T:
        return self._exchange(value, only_primary=True)[0]

    def any(self, flag: bool) -> bool:
        return bool(self._all_sum(np.array([int(bool(flag))], np.int64))[0])

    def gather(self, value: T) -> list[T]:
        """Every worker's ``value`` in rank order (JSON-like values: the lifecycle gathers reports)."""
        return self._exchange(value, only_primary=False)

    def _exchange(self, value: Any, only_primary: bool) -> list[Any]:
        """Every worker's JSON-encoded ``value`` (only rank 0's when ``only_primary``), in two sums."""
        data = json.dumps(value).encode() if (self.rank == 0 or not only_primary) else b""
        lengths = np.zeros(self.workers, np.int64)
        lengths[self.rank] = len(data)
        lengths = self._all_sum(lengths)
        matrix = np.zeros((self.workers, max(1, int(lengths.max()))), np.int64)
        matrix[self.rank, : len(data)] = np.frombuffer(data, np.uint8)
        matrix = self._all_sum(matrix)
        rows = range(1) if only_primary else range(self.workers)
        return [json.loads(bytes(matrix[r, : lengths[r]].astype(np.uint8))) for r in rows]

    def _all_sum(self, array: np.ndarray) -> np.ndarray:
        """The sum over workers of each worker's ``array`` (its first replica gives it, the others 0)."""
        value = tf.constant(array)
        given: list[bool] = []

        def per_replica(context: tf.distribute.experimental.ValueContext) -> tf.Tensor:
            if given:
                return tf.zeros_like(value)
            given.append(True)
            return value

        values = self._strategy.experimental_distribute_values_from_function(per_replica)
        return self._strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()


def cluster_jobs(strategy: tf.distribute.Strategy) -> dict[str, int]:
    """``{job: task count}`` of the strategy's cluster ({} for a strategy without one)."""
    resolver = _private.cluster_resolver(strategy)
    if resolver is None or "TPUStrategy" in type(strategy).__name__:  # a TPU's resolver may call its API
        return {}
    try:
        spec = resolver.cluster_spec().as_dict()
    except (ValueError, RuntimeError):  # e.g. a TPU resolver that cannot reach its TPU
        return {}
    return {job: len(tasks) for job, tasks in spec.items()}


def workers(strategy: tf.distribute.Strategy) -> int:
    """The processes that run ``fit`` (the chief and worker tasks), 1 without a cluster."""
    jobs = cluster_jobs(strategy)
    return max(1, sum(jobs.get(job, 0) for job in _WORKER_JOBS))


def coordinator_of(strategy: tf.distribute.Strategy) -> Coordinator:
    """The processes that run this ``fit``: the workers under MultiWorkerMirrored, else this one."""
    if is_multi_worker_mirrored(strategy) and workers(strategy) > 1:
        return TfCoordinator(strategy)
    return SingleProcess()


def is_multi_worker_mirrored(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
