"""Keras 3 and tf_keras: what differs between the two Keras flavours that one ``BackupAndRestore`` serves.

The flavour is told by the model ``fit`` trains: a ``tf_keras.Model`` (also ``tf.keras`` under
``TF_USE_LEGACY_KERAS=1``) or a Keras 3 ``keras.Model``. Everything else in the adapter (the
lifecycle calls, the checkpoint, the batch skipping, the RNG states) is shared; this module holds
the few places where the two differ: how ``fit`` is told its first epoch, what a variable is
called, where the metrics and the layers' generators live, how an unbuilt model is built, and what
input ``fit`` reads. Backups of the two flavours are not interchangeable (the manifests'
``framework`` differs: "keras" and "tf_keras"), since their checkpoints name the same model differently.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import keras
import tensorflow as tf

from keras_impl import _private, pipeline
from unified_backup.errors import UnsupportedEnvironmentError


class Keras3:
    """Keras 3 on the TensorFlow backend."""

    name = "keras"
    label = "Keras 3"
    own_callback_name = "keras.callbacks.BackupAndRestore"

    @property
    def version(self) -> str:
        return f"{keras.__version__} (tensorflow {tf.__version__})"

    def set_initial_epoch(self, model: Any, epoch: int | None) -> None:
        _private.set_initial_epoch(model, epoch)

    def print_msg(self, line: str) -> None:
        """Show ``line`` where this flavour's callbacks print their ``verbose`` messages."""
        _private.print_msg(line)

    def own_callback(self) -> type:
        """The framework's own ``BackupAndRestore``, which must not run in the same ``fit``."""
        return keras.callbacks.BackupAndRestore

    def check_alone(self, model: Any, callbacks: list[Any] | None = None) -> None:
        """Refuse a fit whose callbacks include the framework's own ``BackupAndRestore``."""
        if any(isinstance(cb, self.own_callback()) for cb in callbacks or ()):
            raise UnsupportedEnvironmentError(
                f"{self.label}'s own BackupAndRestore ({self.own_callback_name}) is in the same fit as "
                "unified-backup's: both would restore and back up the model. Keep one of them in callbacks."
            )

    def path(self, variable: Any, model: Any) -> str:
        """The variable's name as the fingerprint keys it."""
        return str(variable.path)

    def optimizer_name(self, optimizer: Any) -> str:
        return str(optimizer.name)

    def optimizer_variables(self, optimizer: Any) -> list[Any]:
        return list(optimizer.variables)

    def metric_variables(self, model: Any) -> list[tuple[str, Any]]:
        """(path, variable) of each compiled metric's accumulator."""
        return [(v.path, v) for v in model.metrics_variables]

    def components(self, variable: Any) -> list[tf.Variable]:
        """The per-replica parts of a metric variable (one part without a distribution strategy)."""
        value = variable.value
        return list(getattr(value, "values", None) or [value])

    def rng_variables(self, model: Any) -> list[tf.Variable]:
        """Generator states the checkpoint must hold besides ``model.variables`` (Keras 3's seed
        generators are among the model's variables already)."""
        return []

    def rng_problem(self, model: Any) -> str | None:
        return None

    def inspect_fit_input(self) -> pipeline.InputPipeline:
        return pipeline.inspect_fit_input()

    def build_from_spec(self, model: Any, element_spec: Any) -> None:
        _private.build_from_spec(model, element_spec)

    def compiled_metrics_built(self, model: Any) -> bool:
        return _private.compiled_metrics_built(model)

    def build_optimizer(self, model: Any) -> None:
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)


class TfKeras(Keras3):
    """tf_keras (Keras 2), also reached as ``tf.keras`` under ``TF_USE_LEGACY_KERAS=1``."""

    name = "tf_keras"
    label = "tf_keras"
    own_callback_name = "tf.keras.callbacks.BackupAndRestore"

    @property
    def version(self) -> str:
        import tf_keras

        return f"{tf_keras.__version__} (tensorflow {tf.__version__})"

    def set_initial_epoch(self, model: Any, epoch: int | None) -> None:
        _private.set_tf_keras_initial_epoch(model, epoch)

    def print_msg(self, line: str) -> None:
        _private.print_msg(line, tf_keras=True)

    def own_callback(self) -> type:
        import tf_keras

        return tf_keras.callbacks.BackupAndRestore

    def check_alone(self, model: Any, callbacks: list[Any] | None = None) -> None:
        super().check_alone(model, callbacks)
        # Left by tf_keras's own callback in a fit that raised; ``fit`` would resume from it.
        if not _private.tf_keras_started_here(model):
            _private.set_tf_keras_initial_epoch(model, None)

    def path(self, variable: Any, model: Any) -> str:
        """``v.name`` without ":0" and without the model's own name scope, which tf_keras adds to a
        subclassed model's variables built inside ``fit`` (``regressor/dense/kernel``) but not to
        those built by ``model.build`` (``dense/kernel``)."""
        name = str(variable.name)
        name = name[: -len(":0")] if name.endswith(":0") else name
        return re.sub(rf"(^|/){re.escape(model.name)}/", r"\1", name)

    def optimizer_name(self, optimizer: Any) -> str:
        # A legacy optimizer has no ``name``; a LossScaleOptimizer's config has none.
        name = getattr(optimizer, "name", None) or optimizer.get_config().get("name")
        return str(name or type(optimizer).__name__)

    def optimizer_variables(self, optimizer: Any) -> list[Any]:
        found = optimizer.variables
        return list(found() if callable(found) else found)  # a method on a legacy optimizer

    def metric_variables(self, model: Any) -> list[tuple[str, Any]]:
        # Metric variables are named "total", "count", ...: the metric's name tells them apart.
        return [(f"{m.name}/{self.path(v, model)}", v) for m in model.metrics for v in m.variables]

    def components(self, variable: Any) -> list[tf.Variable]:
        return list(getattr(variable, "values", None) or [variable])

    def rng_variables(self, model: Any) -> list[tf.Variable]:
        return [g.state for _, _, g in _private.layer_generators(model) if g is not None]

    def rng_problem(self, model: Any) -> str | None:
        legacy = [
            name for name, kind, g in _private.layer_generators(model) if g is None and kind != "stateless"
        ]
        if not legacy:
            return None
        return (
            f"the layer(s) {', '.join(legacy)} draw from tf_keras's default legacy stateful random ops, "
            "whose state lives inside TensorFlow's kernels and cannot be saved, so their masks differ from "
            "an uninterrupted run's after a resume. Create them with rng_type='stateful' (e.g. "
            "Dropout(0.2, rng_type='stateful')) or call "
            "tf.keras.backend.experimental.enable_tf_random_generator() before building the model."
        )

    def inspect_fit_input(self) -> pipeline.InputPipeline:
        return pipeline.inspect_tf_keras_fit_input()

    def build_from_spec(self, model: Any, element_spec: Any) -> None:
        """Build the model (by ``model.build``, else by calling it on zeros) and its compiled metrics
        from one batch's structure, as the first step would."""
        element_spec = _private.per_replica_spec(element_spec)
        inputs = element_spec[0] if isinstance(element_spec, tuple) else element_spec
        if not model.built:
            _build(model, inputs)
        if isinstance(element_spec, tuple) and len(element_spec) > 1:
            try:
                _private.build_tf_keras_compiled_metrics(model, element_spec)
            except Exception:  # noqa: BLE001 - e.g. unknown shapes: the first step makes them
                pass

    def compiled_metrics_built(self, model: Any) -> bool:
        return _private.tf_keras_compiled_metrics_built(model)

    def build_optimizer(self, model: Any) -> None:
        optimizer = model.optimizer
        if hasattr(optimizer, "build"):
            optimizer.build(model.trainable_variables)  # does nothing once built
        else:  # a tf_keras.optimizers.legacy optimizer
            _private.build_legacy_optimizer(optimizer, model.trainable_variables)


def _build(model: Any, inputs: Any) -> None:
    """Build an unbuilt tf_keras model from its inputs' specs, or say how to build it before ``fit``."""
    try:
        model.build(tf.nest.map_structure(lambda spec: spec.shape, inputs))
        return
    except Exception:  # noqa: BLE001 - e.g. inputs that are not float tensors: try a call instead
        pass
    try:
        zeros = tf.nest.map_structure(
            lambda spec: tf.zeros([1 if d is None else d for d in spec.shape], spec.dtype), inputs
        )
        model(zeros, training=False)
    except Exception as exc:  # noqa: BLE001 - reported with what to do
        raise UnsupportedEnvironmentError(
            f"BackupAndRestore found a backup to restore, but could not build the tf_keras model "
            f"{model.name!r} before its first step ({type(exc).__name__}: {exc}). Build it before fit "
            "(model.build(input_shape), or call it once on a batch); the backup is kept."
        ) from exc


KERAS3 = Keras3()
TF_KERAS = TfKeras()


def of(model: Any) -> Keras3:
    """The flavour of ``model``: tf_keras for a ``tf_keras.Model``, else Keras 3."""
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(model, tf_keras.Model):
        return TF_KERAS
    if isinstance(model, keras.Model):
        return KERAS3
    raise UnsupportedEnvironmentError(
        f"BackupAndRestore trains Keras models: expected a keras.Model (Keras 3) or a tf_keras.Model "
        f"(tf.keras under TF_USE_LEGACY_KERAS=1); found {type(model).__module__}.{type(model).__name__}."
    )
