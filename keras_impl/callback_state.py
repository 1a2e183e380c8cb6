"""The other callbacks' state in a Keras backup: what Lightning restores by itself and Keras does not.

Keras's own ``EarlyStopping``, ``ReduceLROnPlateau`` and ``ModelCheckpoint`` (Keras 3 and tf_keras)
keep their counts in public attributes that their ``on_train_begin`` resets, so a resumed ``fit``
would restart their patience and forget the best score (keras-team/keras#17012). A user's callback
takes part by defining ``state_dict()`` (returning JSON values) and ``load_state_dict(state)``: the
names Lightning gives the same protocol. The states are saved as ``callbacks.json`` in the payload
and applied once every ``on_train_begin`` has run, each to the callback with the same key:

- a callback's ``state_key`` where it has one (Lightning's name for it);
- Keras's own, by class and what they watch, as Lightning keys its ``EarlyStopping`` and
  ``ModelCheckpoint``: ``EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}`` (tf_keras keeps
  no ``mode`` on some: the monitor alone then);
- any other, by class name;

then ``#2``, ``#3`` for a second and third callback with the same key, in list order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unified_backup.errors import CorruptBackupError, InvalidArgumentError

FILE = "callbacks.json"
BUILT_IN = {  # class name -> the attributes that carry its state (the same in Keras 3 and tf_keras)
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
}
log = logging.getLogger(__name__)


def capture(callbacks: Iterable[Any]) -> dict[str, Any]:
    """The state of every callback that has one: the user's protocol first, else a built-in's attributes."""
    states = {}
    for key, callback in _keyed(callbacks):
        if _has_protocol(callback):
            state = callback.state_dict()
        elif (names := _built_in(callback)) is not None:
            state = {name: _plain(getattr(callback, name)) for name in names if hasattr(callback, name)}
        else:
            continue
        try:
            same = json.loads(_dumps(state)) == state
        except (TypeError, ValueError) as exc:
            same, why = False, str(exc)
        else:
            why = "it would not read back the same"
        if not same:
            raise InvalidArgumentError(
                f"{key}.state_dict() returned {state!r}, which is not JSON ({why}). Expected a dict with "
                "string keys and JSON values (numbers, strings, booleans, None, lists and dicts of them)."
            )
        states[key] = state
    return states


def write(directory: Path, states: dict[str, Any]) -> None:
    if states:
        (directory / FILE).write_text(_dumps(states), encoding="utf-8")


def read(directory: Path) -> dict[str, Any]:
    path = directory / FILE
    if not path.exists():  # a backup of a fit without stateful callbacks
        return {}
    try:
        states = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptBackupError(
            f"{path} is not valid JSON ({exc}); its checksum matched, so it was written so. Delete the "
            "backup (`unified-backup delete BACKUP_DIR`) to start fresh."
        ) from exc
    if not isinstance(states, dict):
        raise CorruptBackupError(f"{path} holds {type(states).__name__}; expected a JSON object.")
    return states


def apply(callbacks: Iterable[Any], states: dict[str, Any]) -> None:
    """Give each callback of this ``fit`` the state its namesake had when the backup was made."""
    left = dict(states)
    for key, callback in _keyed(callbacks):
        if key not in left:
            continue
        state = left.pop(key)
        if _has_protocol(callback):
            callback.load_state_dict(state)
            continue
        for name, value in state.items():
            setattr(callback, name, value)
        if getattr(callback, "restore_best_weights", False):
            log.warning(
                "%s(restore_best_weights=True): the best weights seen before the restart are not in the "
                "backup (its patience and best score are); the weights it restores at the end may be "
                "those of an epoch after the restart rather than the best one.",
                key,
            )
    for key in sorted(left):
        log.warning("The backup holds the state of a callback %s that this fit does not have: ignored.", key)


def _dumps(value: Any) -> str:
    # allow_nan: tf_keras starts a best score at +-inf, written as Infinity (Python's json reads it back)
    return json.dumps(value, indent=1, sort_keys=True, allow_nan=True)


def _keyed(callbacks: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    seen: dict[str, int] = {}
    for callback in callbacks:
        key = _key(callback)
        seen[key] = seen.get(key, 0) + 1
        yield (key if seen[key] == 1 else f"{key}#{seen[key]}"), callback


def _key(callback: Any) -> str:
    state_key = getattr(callback, "state_key", None)
    if isinstance(state_key, str):
        return state_key
    name = type(callback).__name__
    if _built_in(callback) is None:
        return name
    watched = {attr: getattr(callback, attr, None) for attr in ("monitor", "mode")}
    return name + repr({attr: value for attr, value in watched.items() if isinstance(value, str)})


def _has_protocol(callback: Any) -> bool:
    return callable(getattr(callback, "state_dict", None)) and callable(
        getattr(callback, "load_state_dict", None)
    )


def _built_in(callback: Any) -> tuple[str, ...] | None:
    """The state's attributes when the callback is (or derives from) one of Keras's own."""
    for cls in type(callback).__mro__:
        if cls.__name__ in BUILT_IN and cls.__module__.split(".")[0] in ("keras", "tf_keras"):
            return BUILT_IN[cls.__name__]
    return None


def _plain(value: Any) -> Any:
    """A JSON value for a counter or score (numpy and TensorFlow scalars included)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
