"""The random-number generators a Keras training draws from, captured as plain arrays (no pickle).

Host generators (Python's ``random``, NumPy's global ``np.random``) are drawn by the input pipeline:
when an epoch starts (``fit(shuffle=True)`` on a ``PyDataset``, ``PyDataset.on_epoch_begin``) and
while batches are read (augmentation in ``__getitem__``). They are captured as they were at the
start of the epoch, so that a resumed epoch draws its order again, and reading the skipped batches
again replays their draws. The global device generators (TensorFlow's ``tf.random.Generator``,
Keras's unseeded ``keras.random`` ops) are drawn by training steps: they are captured as they are at
the backup. Per-layer seed generators (Dropout) are model variables and travel in the checkpoint.
TensorFlow's global seed is not a state, but Keras's array shuffling draws its order from it.
"""

from __future__ import annotations

import random

import numpy as np
import tensorflow as tf

from keras_impl import _private

Arrays = dict[str, np.ndarray]

_NO_SEED = np.array([], dtype=np.int64)


def capture_host() -> Arrays:
    """Python's and NumPy's global generator states."""
    version, internal, gauss = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert algorithm == "MT19937"
    return {
        "python_random/version": np.array(version, dtype=np.int64),
        "python_random/internal": np.array(internal, dtype=np.int64),
        "python_random/gauss": np.array([] if gauss is None else [gauss], dtype=np.float64),
        "numpy_random/keys": np.array(keys, dtype=np.uint32),
        "numpy_random/pos": np.array(pos, dtype=np.int64),
        "numpy_random/has_gauss": np.array(has_gauss, dtype=np.int64),
        "numpy_random/cached_gaussian": np.array(cached, dtype=np.float64),
    }


def restore_host(arrays: Arrays) -> None:
    gauss = arrays["python_random/gauss"]
    random.setstate(
        (
            int(arrays["python_random/version"]),
            tuple(int(v) for v in arrays["python_random/internal"]),
            float(gauss[0]) if gauss.size else None,
        )
    )
    np.random.set_state(
        (
            "MT19937",
            arrays["numpy_random/keys"].astype(np.uint32),
            int(arrays["numpy_random/pos"]),
            int(arrays["numpy_random/has_gauss"]),
            float(arrays["numpy_random/cached_gaussian"]),
        )
    )


def capture_device() -> Arrays:
    """The global ``tf.random.Generator`` and Keras's global ``SeedGenerator`` (where they exist),
    and TensorFlow's global seed. Nothing is created: a generator never used is not saved."""
    seed = _private.tf_global_seed()
    arrays: Arrays = {"tf_global_seed": _NO_SEED if seed is None else np.array([seed])}
    generator = _private.tf_global_generator()
    if generator is not None:
        arrays["tf_generator/state"] = generator.state.numpy()
        arrays["tf_generator/algorithm"] = np.array(int(generator.algorithm), dtype=np.int64)
    keras_generator = _private.keras_global_seed_generator()
    if keras_generator is not None:
        arrays["keras_seed_generator/state"] = np.asarray(keras_generator.state.numpy())
    return arrays


def restore_device(arrays: Arrays) -> None:
    """Put the global device generators back; call before :func:`restore_host` (making Keras's
    global seed generator draws from Python's ``random``)."""
    if "tf_generator/state" in arrays:
        state, algorithm = arrays["tf_generator/state"], int(arrays["tf_generator/algorithm"])
        generator = _private.tf_global_generator()
        if generator is not None and int(generator.algorithm) == algorithm:
            generator.reset(state)
        else:
            with tf.init_scope():
                tf.random.set_global_generator(tf.random.Generator.from_state(state, algorithm))
    if "keras_seed_generator/state" in arrays:
        _private.make_keras_global_seed_generator().state.assign(arrays["keras_seed_generator/state"])


def stored_tf_seed(arrays: Arrays) -> int | None:
    seed = arrays.get("tf_global_seed", _NO_SEED)
    return int(seed[0]) if seed.size else None
