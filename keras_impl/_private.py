"""Every access to Keras and TensorFlow internals, one small function each, with why it is needed.

Keras 3 gives a callback no public way to say where ``fit`` starts, to restore before the model is
built, to skip batches, or to see the input it trains on; TensorFlow has no public reader for its
global seed or its global generator that leaves them untouched. ``tests/keras/test_private_api.py``
fails with a message starting "CHANGED" when a release moves any of these.
Verified against keras 3.15 and tensorflow 2.21.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

import keras

# -- where fit starts and what it runs -------------------------------------------------------------


class _Epoch(int):
    """An epoch index that is true even when 0, so that ``fit`` prefers it to its ``initial_epoch``."""

    def __bool__(self) -> bool:
        return True


def set_initial_epoch(model: keras.Model, epoch: int | None) -> None:
    """Make the running ``fit`` start at ``epoch`` (None: forget it).

    ``fit`` reads ``self._initial_epoch or initial_epoch`` right after ``on_train_begin``: the
    attribute Keras 3's own BackupAndRestore sets. It is never reset by Keras, so it must be cleared
    once the first epoch has begun, or a later ``fit`` of the model would skip epochs.
    """
    model._initial_epoch = None if epoch is None else _Epoch(epoch)


def build_from_spec(model: keras.Model, element_spec: Any) -> None:
    """Build the model (and its compiled metrics) from one batch's structure, as ``fit`` does under a
    strategy, so that a backup can be fingerprinted and restored before the first step."""
    model._symbolic_build(data_batch=element_spec)


def compiled_metrics_built(model: keras.Model) -> bool:
    """Whether the compiled metrics exist yet (``fit`` builds them in its first step)."""
    metrics = getattr(model, "_compile_metrics", None)
    return metrics is None or bool(metrics.built)


def train_function(model: keras.Model) -> Callable[[Any], Any] | None:
    """The function ``fit`` calls once per ``steps_per_execution`` batches, with the epoch's iterator
    (None before the model's first ``fit``)."""
    return getattr(model, "train_function", None)


def set_train_function(model: keras.Model, function: Callable[[Any], Any]) -> None:
    """Replace it for the next calls of the running ``fit`` (which reads the attribute at every step)."""
    model.train_function = function


def batches_trained(optimizer: keras.optimizers.Optimizer) -> int:
    """Batches the optimizer has seen; under gradient accumulation ``iterations`` counts applied steps."""
    return int(optimizer._iterations.numpy())


# -- random-number generators ----------------------------------------------------------------------


def keras_global_seed_generator() -> Any:
    """Keras's global ``SeedGenerator`` (unseeded ``keras.random`` ops draw from it), or None if unused."""
    from keras.src.backend.common import global_state

    return global_state.get_global_attribute("global_seed_generator")


def make_keras_global_seed_generator() -> Any:
    """Keras's global ``SeedGenerator``, created (drawing its seed from Python's ``random``) if needed."""
    from keras.src.random.seed_generator import global_seed_generator

    return global_seed_generator()


def tf_global_seed() -> int | None:
    """TensorFlow's global seed (``tf.random.set_seed``), read without drawing an op seed."""
    from tensorflow.python.eager import context

    return context.global_seed()


def tf_global_generator() -> Any:
    """TensorFlow's global ``tf.random.Generator`` if it exists; ``tf.random.get_global_generator()``
    would create one (and refuses to under op determinism)."""
    from tensorflow.python.ops import stateful_random_ops

    return getattr(stateful_random_ops, "global_generator", None)


# -- the fit that is running -------------------------------------------------------------------------


def fit_frames(callback: Any, start: FrameType | None) -> list[FrameType]:
    """The frames of ``fit`` calls of the callback's model, from ``start`` outwards, whose callbacks
    include ``callback``. Keras gives callbacks no handle on ``fit``: its locals are read instead."""
    found = []
    frame = start
    while frame is not None:
        local = frame.f_locals if frame.f_code.co_name == "fit" else {}
        callbacks = getattr(local.get("callbacks"), "callbacks", None) or ()
        if local.get("self") is callback.model and any(c is callback for c in callbacks):
            found.append(frame)
        frame = frame.f_back
    return found


def fit_code(callback: Any) -> CodeType | None:
    """The code of the ``fit`` that is calling the caller with ``callback``, or None (no ``fit``)."""
    frames = fit_frames(callback, sys._getframe(1))
    return frames[0].f_code if frames else None


def fit_is_running(code: CodeType, callback: Any) -> bool:
    """Whether a ``fit`` with that code and ``callback`` is on the stack of the thread that asks."""
    return any(frame.f_code is code for frame in fit_frames(callback, sys._getframe(1)))


def fit_epoch_iterator(max_depth: int = 12) -> Any:
    """The ``epoch_iterator`` local of the running ``fit`` (a ``keras.src`` ``EpochIterator``), or None.

    Call it from a callback hook of that ``fit``: Keras gives callbacks no handle on the data.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        candidate = frame.f_locals.get("epoch_iterator") if frame.f_code.co_name == "fit" else None
        if candidate is not None and hasattr(candidate, "data_adapter"):
            return candidate
        frame = frame.f_back
    return None


def element_spec(epoch_iterator: Any) -> Any:
    """The structure of one batch that the iterator yields (to build a model before its first step)."""
    return getattr(getattr(epoch_iterator, "_distributed_dataset", None), "element_spec", None)


# -- what the input pipeline is ----------------------------------------------------------------------


def array_shuffle(adapter: Any) -> Any:
    """The ``shuffle`` argument an ``ArrayDataAdapter`` was made with (False, True or "batch")."""
    return adapter._shuffle


def adapted_dataset(adapter: Any) -> Any:
    """The ``tf.data.Dataset`` a ``TFDatasetAdapter`` reads."""
    return adapter._dataset


def dataset_inputs(node: Any) -> list[Any] | None:
    """The datasets a ``tf.data.Dataset`` node reads from, or None when it cannot be walked."""
    inputs = getattr(node, "_inputs", None)
    return None if inputs is None else list(inputs())


def reshuffles_each_iteration(node: Any) -> bool:
    """Whether a dataset node reshuffles in every iteration (a seed generator it cannot save)."""
    return bool(getattr(node, "_reshuffle_each_iteration", False)) or type(node).__name__ == "_RandomDataset"
