"""unified-backup for Keras on TensorFlow, Keras 3 and tf_keras alike: ``BackupAndRestore``.

``model.fit(x, y, epochs=10, callbacks=[BackupAndRestore("backup/")])`` resumes by itself after a crash;
the model tells which Keras it is (a ``tf_keras.Model``, also ``tf.keras`` under ``TF_USE_LEGACY_KERAS=1``,
or a Keras 3 ``keras.Model``).
"""

from __future__ import annotations

import os

from unified_backup.errors import MissingFrameworkError, UnsupportedEnvironmentError

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

try:
    import keras
    import tensorflow  # noqa: F401
except ImportError as exc:
    raise MissingFrameworkError(
        f"keras_impl needs TensorFlow and Keras 3, but importing them failed ({exc}). "
        "Install them with: pip install 'unified-backup[keras]'"
    ) from exc

if keras.backend.backend() != "tensorflow":
    raise UnsupportedEnvironmentError(
        f"keras_impl needs Keras on the TensorFlow backend; found backend {keras.backend.backend()!r}. "
        "Set KERAS_BACKEND=tensorflow before Keras is first imported (or in ~/.keras/keras.json)."
    )

from keras_impl.callback import BackupAndRestore  # noqa: E402

__all__ = ["BackupAndRestore"]
