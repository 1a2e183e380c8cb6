"""Every access to Keras, tf_keras and TensorFlow internals, one small function each, with why.

Keras (3 and tf_keras) gives a callback no public way to say where ``fit`` starts, to restore before
the model is built, to skip batches, or to see the input it trains on; TensorFlow has no public
reader for its global seed or its global generator that leaves them untouched.
``tests/keras/test_private_api.py`` fails with a message starting "CHANGED" when a release moves
any of these. Verified against keras 3.15, tf_keras 2.21 and tensorflow 2.21.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

import keras
import tensorflow as tf

# -- messages ---------------------------------------------------------------------------------------


def print_msg(line: str, tf_keras: bool = False) -> None:
    """Print ``line`` as Keras's own callbacks do with ``verbose=1`` (EarlyStopping, ModelCheckpoint):
    to stdout, or to absl logging when interactive logging is off. ``io_utils`` is not public."""
    if tf_keras:
        from tf_keras.src.utils import io_utils
    else:
        from keras.src.utils import io_utils
    io_utils.print_msg(line)


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


def fit_callback_list(callback: Any) -> Any:
    """The ``CallbackList`` of the ``fit`` that is calling the caller with ``callback``, or None."""
    frames = fit_frames(callback, sys._getframe(1))
    return frames[0].f_locals["callbacks"] if frames else None


class HeldTrainBatchHooks:
    """Routes a ``fit``'s calls of ``callback_list.on_train_batch_begin/end`` to ``begin`` and ``end``
    until :meth:`release`.

    ``fit`` calls them through the list object it made for this ``fit`` (Keras 3 and tf_keras alike):
    instance attributes shadow the class's methods for that object only. ``own_begin`` and
    ``own_end`` are what was there before (the list's methods, or someone else's patch of that
    object), which :meth:`release` puts back.
    """

    NAMES = ("on_train_batch_begin", "on_train_batch_end")

    def __init__(self, callback_list: Any, begin: Callable[..., None], end: Callable[..., None]) -> None:
        self.callback_list = callback_list
        self.own_begin = callback_list.on_train_batch_begin
        self.own_end = callback_list.on_train_batch_end
        self.displaced = {
            name: vars(callback_list)[name] for name in self.NAMES if name in vars(callback_list)
        }
        callback_list.on_train_batch_begin = begin
        callback_list.on_train_batch_end = end

    def release(self) -> None:
        for name in self.NAMES:
            vars(self.callback_list).pop(name, None)
        vars(self.callback_list).update(self.displaced)


def run_last(callback: Any) -> None:
    """From the next hook on, call ``callback`` after every other callback of the running ``fit``.

    So that what it backs up at a step or epoch end includes what the others did there (an
    EarlyStopping count, a ReduceLROnPlateau cut). ``CallbackList`` loops over its ``callbacks``
    list at every hook; a new list object leaves the loop in progress untouched.
    """
    frames = fit_frames(callback, sys._getframe(1))
    if frames:
        callback_list = frames[0].f_locals["callbacks"]
        callback_list.callbacks = [c for c in callback_list.callbacks if c is not callback] + [callback]


def fit_code(callback: Any) -> CodeType | None:
    """The code of the ``fit`` that is calling the caller with ``callback``, or None (no ``fit``)."""
    frames = fit_frames(callback, sys._getframe(1))
    return frames[0].f_code if frames else None


def fit_is_running(code: CodeType, callback: Any) -> bool:
    """Whether a ``fit`` with that code and ``callback`` is on the stack of the thread that asks."""
    return any(frame.f_code is code for frame in fit_frames(callback, sys._getframe(1)))


def fit_local(name: str, has: str, max_depth: int = 16) -> tuple[Any, dict[str, Any]]:
    """The local ``name`` of the running ``fit`` (an object with attribute ``has``) and all of that
    frame's locals; (None, {}) when not found.

    Call it from a callback hook of that ``fit``: Keras gives callbacks no handle on the data.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        local = frame.f_locals if frame.f_code.co_name == "fit" else {}
        candidate = local.get(name)
        if candidate is not None and hasattr(candidate, has):
            return candidate, dict(local)
        frame = frame.f_back
    return None, {}


def fit_epoch_iterator(max_depth: int = 16) -> Any:
    """Keras 3: the ``epoch_iterator`` local of the running ``fit`` (an ``EpochIterator``), or None."""
    return fit_local("epoch_iterator", "data_adapter", max_depth)[0]


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


# -- tf_keras ----------------------------------------------------------------------------------------


class TfKerasHooks:
    """What tf_keras's ``CallbackList`` asks of every callback besides the ``on_*`` hooks.

    tf_keras calls these on each callback (Keras 3's ``Callback`` has none of them): the batch
    hooks are called for this callback, and it takes the logs as tensors (it never reads them, so
    tf_keras need not copy them to numpy after every batch for it).
    """

    _supports_tf_logs = True

    def _implements_train_batch_hooks(self) -> bool:
        """None under ParameterServerStrategy, whose steps run asynchronously on the workers (no batch
        end is a point to back up at; a preemption waits for the epoch end). Asked after set_model."""
        strategy = getattr(getattr(self, "model", None), "distribute_strategy", None)
        return not isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)

    def _implements_test_batch_hooks(self) -> bool:
        return False

    def _implements_predict_batch_hooks(self) -> bool:
        return False


class _StartAt:
    """Stands in for tf_keras's ``WorkerTrainingState`` as ``model._training_state``: the one method
    ``fit`` calls on it, right after ``on_train_begin``, says where training starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def maybe_load_initial_counters_from_ckpt(
        self, steps_per_epoch: Any, initial_epoch: int, mode: Any = None
    ) -> tuple[int, int]:
        return self.epoch, 0  # step 0: the skipped batches are read by the train-function stand-in


def tf_keras_training_state(model: Any) -> Any:
    """What ``model._training_state`` holds (tf_keras's own BackupAndRestore sets it; None otherwise)."""
    return getattr(model, "_training_state", None)


def set_tf_keras_initial_epoch(model: Any, epoch: int | None) -> None:
    """Make the running tf_keras ``fit`` start at ``epoch`` (None: forget it).

    ``fit`` asks ``self._training_state`` for its first epoch and step right after
    ``on_train_begin``. The attribute must go back to None, never be deleted: a later ``fit``
    reads it (tf_keras's own callback deletes it, and breaks that ``fit``).
    """
    model._training_state = None if epoch is None else _StartAt(epoch)


def tf_keras_started_here(model: Any) -> bool:
    """Whether ``model._training_state`` is ours (or empty), not tf_keras's own callback's."""
    state = tf_keras_training_state(model)
    return state is None or isinstance(state, _StartAt)


def per_replica_spec(spec: Any) -> Any:
    """One replica's part of a distributed dataset's element spec (``PerReplicaSpec`` has no shape)."""

    def one(part: Any) -> Any:
        return part._value_specs[0] if type(part).__name__ == "PerReplicaSpec" else part

    return tf_nest().map_structure(one, spec)


def tf_nest() -> Any:
    return tf.nest


def fit_data_handler(max_depth: int = 16) -> tuple[Any, dict[str, Any]]:
    """tf_keras: the ``data_handler`` local of the running ``fit`` (a ``DataHandler``) and ``fit``'s
    locals (its arguments: ``workers``, ``use_multiprocessing``, ...)."""
    return fit_local("data_handler", "_adapter", max_depth)


def handler_adapter(handler: Any) -> Any:
    """The data adapter a tf_keras ``DataHandler`` reads through."""
    return handler._adapter


def handler_first_epoch(handler: Any) -> int:
    """The epoch ``fit`` was asked to start at (its ``initial_epoch``): the handler's dataset repeats
    for the epochs from there. Read it in ``on_train_begin``, before ``fit`` overrides it."""
    return int(handler._initial_epoch)


def handler_element_spec(handler: Any) -> Any:
    """The structure of one batch the handler's dataset yields."""
    return getattr(getattr(handler, "_dataset", None), "element_spec", None)


def tensor_like_shuffle(adapter: Any) -> Any:
    """The ``shuffle`` argument a ``TensorLikeDataAdapter`` was made with (False, True or "batch")."""
    return adapter._shuffle


def sequence_of(adapter: Any) -> tuple[Any, bool]:
    """The ``keras.utils.Sequence`` a ``KerasSequenceAdapter`` reads, and whether it shuffles its order."""
    return adapter._keras_sequence, bool(adapter._shuffle_sequence)


def tf_keras_dataset(adapter: Any) -> Any:
    """The ``tf.data.Dataset`` a tf_keras ``DatasetAdapter`` reads."""
    return adapter._dataset


def layer_generators(model: Any) -> list[tuple[str, str, Any]]:
    """(layer name, rng type, ``tf.random.Generator`` or None) of each tf_keras layer that draws
    random numbers (Dropout, noise, random augmentation).

    tf_keras keeps a layer's generator out of ``layer.weights`` and out of checkpoints; its state
    must be saved by hand. With the default "legacy_stateful" type the state lives inside the
    TensorFlow op kernels, where nothing can read it.
    """
    found = []
    for layer in model._flatten_layers(include_self=False):
        generator = getattr(layer, "_random_generator", None)
        if generator is not None and hasattr(generator, "_rng_type"):
            generator._maybe_init()
            found.append((layer.name, generator._rng_type, getattr(generator, "_generator", None)))
    return found


def build_legacy_optimizer(optimizer: Any, variables: list[Any]) -> None:
    """Create a tf_keras legacy optimizer's slots (they appear in its first step otherwise)."""
    optimizer._create_all_weights(variables)


def tf_keras_compiled_metrics_built(model: Any) -> bool:
    """Whether tf_keras's compiled loss and metrics containers made their metrics (in the first step)."""
    containers = (getattr(model, "compiled_loss", None), getattr(model, "compiled_metrics", None))
    return all(c is None or c.built for c in containers)


def build_tf_keras_compiled_metrics(model: Any, element_spec: Any) -> None:
    """Make tf_keras's compiled loss and metrics from one batch's structure, as the first step would,
    so that a resumed epoch's metric sums can be put back before it."""
    x, y = element_spec[0], element_spec[1]
    outputs = getattr(model, "outputs", None)  # a Functional or Sequential model's symbolic outputs
    if outputs:
        y_pred = outputs[0] if len(outputs) == 1 else list(outputs)
    else:
        y_pred = model.compute_output_signature(x)
    if model.compiled_loss is not None and not model.compiled_loss.built:
        model.compiled_loss.build(y_pred)
    if model.compiled_metrics is not None and not model.compiled_metrics.built:
        model.compiled_metrics.build(y_pred, y)


# -- tf.distribute ---------------------------------------------------------------------------------


def cluster_resolver(strategy: Any) -> Any:
    """The strategy's cluster resolver; ParameterServerStrategy keeps it as ``_cluster_resolver``
    (its public ``cluster_resolver`` property reads ``extended``, where PSS has none)."""
    return strategy.cluster_resolver or getattr(strategy, "_cluster_resolver", None)


# -- snapshots (async_backup) ----------------------------------------------------------------------
# TensorFlow's own async checkpoint (CheckpointOptions(experimental_enable_async_checkpoint=True))
# fails on Keras 3 variables ("tf.function only supports singleton tf.Variables", from
# keras.src.backend.tensorflow.core.Variable._copy_trackable_to_cpu), so the snapshot is ours: a copy
# of the object graph through the hooks every trackable implements for tf.train.Checkpoint.


class _Frozen(tf.__internal__.tracking.Trackable):  # type: ignore[misc,name-defined]
    """One trackable of a checkpoint's object graph, as it was: copies of its tensors, frozen children."""

    def __init__(self) -> None:
        self._frozen_tensors: dict[str, Any] = {}
        self._frozen_children: dict[str, Any] = {}

    def _serialize_to_tensors(self) -> dict[str, Any]:
        return dict(self._frozen_tensors)

    def _trackable_children(self, save_type: str = "checkpoint", **kwargs: Any) -> dict[str, Any]:
        return dict(self._frozen_children)


def keeps_slot_variables(optimizer: Any) -> bool:
    """Whether ``optimizer`` keeps slot variables that a checkpoint saves outside its object graph
    (``tf_keras.optimizers.legacy``), asked as TensorFlow's ``serialize_slot_variables`` asks."""
    return "get_slot_names" in dir(optimizer)  # before its first step it has none yet, but will


def frozen_checkpoint(checkpoint: tf.train.Checkpoint) -> tf.train.Checkpoint:
    """A ``tf.train.Checkpoint`` with the object graph of ``checkpoint`` (so it writes the same keys and
    restores into it) whose every saved tensor is a copy in host memory, taken now: the live variables
    may change while it is written. Uses ``Trackable._trackable_children`` and ``_serialize_to_tensors``
    (TensorFlow's protocol for custom trackables) and ``saveable_object_util``; raises ``TypeError`` for
    a trackable that saves through the legacy ``_gather_saveables_for_checkpoint`` only, and for an
    optimizer with slot variables (``tf_keras.optimizers.legacy``), which the checkpoint saves apart."""
    from tensorflow.python.training.saving import saveable_object, saveable_object_util

    def copied(value: Any) -> Any:
        if isinstance(value, dict):  # {slice spec: tensor}
            return {key: copied(item) for key, item in value.items()}
        if isinstance(value, saveable_object.SaveSpec):  # e.g. a variable's read, made at save time
            value = value.tensor
        with tf.device("/device:CPU:0"):
            return tf.raw_ops.DeepCopy(x=value)

    memo: dict[int, tuple[Any, _Frozen]] = {}  # the node too: its id stays its own while frozen

    def freeze(node: Any) -> _Frozen:
        if id(node) in memo:  # shared (a variable of the model and of model_variables): one node
            return memo[id(node)][1]
        frozen = _Frozen()
        memo[id(node)] = (node, frozen)
        if saveable_object_util.trackable_has_serialize_to_tensor(node):
            frozen._frozen_tensors = {
                key: copied(value) for key, value in node._serialize_to_tensors().items()
            }
        elif node._gather_saveables_for_checkpoint():
            raise TypeError(f"{type(node).__name__} saves through legacy SaveableObjects only")
        if keeps_slot_variables(node):
            raise TypeError(
                f"{type(node).__name__} keeps slot variables outside the object graph (a legacy optimizer)"
            )
        children = node._trackable_children(save_type="checkpoint")
        frozen._frozen_children = {name: freeze(child) for name, child in children.items()}
        return frozen

    children = checkpoint._trackable_children(save_type="checkpoint")
    return tf.train.Checkpoint(
        **{name: freeze(child) for name, child in children.items() if name != "save_counter"}
    )
