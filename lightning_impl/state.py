"""The Lightning training state: what a backup holds, how it is written, checked and loaded.

A backup is one Lightning checkpoint, ``state.ckpt``, written by the public
``Trainer.save_checkpoint`` (model, optimizers, LR schedulers, loops, callbacks, datamodule) and
read back with ``weights_only=True`` only, so loading never runs code stored in the file. The
random-number states that ``exact.py`` adds to it are stored as tensors and plain values for
the same reason (``np.random.get_state()`` itself holds a NumPy array, which that load refuses).
"""

from __future__ import annotations

import contextlib
import pickle
import random
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_impl import _private
from unified_backup.errors import UnsafeBackupError
from unified_backup.fingerprint import describe
from unified_backup.manifest import Manifest

FRAMEWORK = "lightning"
FILENAME = "state.ckpt"


def fingerprint(trainer: Any) -> dict[str, str]:
    """Names, dtypes and shapes of the model's state and of every optimizer's parameters.

    Built from parameters, not from optimizer state, so it is the same before the first step
    (when the optimizer state is still empty) and at every backup.
    """
    entries = {
        f"model/{name}": describe(_dtype(tensor), tensor.shape)
        for name, tensor in trainer.lightning_module.state_dict().items()
    }
    for i, optimizer in enumerate(trainer.optimizers):
        entries[f"optimizer/{i}/class"] = type(optimizer).__name__
        for g, group in enumerate(optimizer.param_groups):
            for p, param in enumerate(group["params"]):
                entries[f"optimizer/{i}/group/{g}/param/{p}"] = describe(_dtype(param), param.shape)
    for i, config in enumerate(trainer.lr_scheduler_configs):
        entries[f"lr_scheduler/{i}/class"] = type(config.scheduler).__name__
    return entries


class LightningState:
    """The :class:`unified_backup.TrainingState` of one ``Trainer.fit``."""

    framework = FRAMEWORK

    def __init__(self, trainer: Any, framework_version: str) -> None:
        self.trainer = trainer
        self.framework_version = framework_version
        self._checked = False

    def fingerprint(self) -> Mapping[str, str]:
        return fingerprint(self.trainer)

    def save(self, directory: Path) -> None:
        """Write the checkpoint; the first one of a ``fit`` is also checked to be safely loadable.

        NOTE: every rank calls this; only global rank 0 writes the file, and it tells the others
        whether the check failed, so that all of them raise.
        """
        path = directory / FILENAME
        with _temporary_files_in(directory):
            self.trainer.save_checkpoint(path, weights_only=False)
        if self._checked:
            return
        self._checked = True
        problem = _refused_by_safe_load(path) if self.trainer.is_global_zero else None
        problem = self.trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise UnsafeBackupError(
                f"The backup just written to {path} could never be restored: torch.load(weights_only=True) "
                f"refuses an object in it ({problem}), and unified-backup does not unpickle arbitrary "
                "objects. Expected only tensors and plain Python values in the checkpoint: keep other "
                "objects (paths, numpy values, custom classes) out of save_hyperparameters() and of "
                "callback state_dict()s, or convert them to plain types."
            )

    def load(self, directory: Path, manifest: Manifest) -> None:
        """Restore model, datamodule and callbacks now; Lightning restores the rest after ``on_fit_start``."""
        path = directory / FILENAME
        try:
            _private.restore_modules_and_callbacks(self.trainer, path)
        except pickle.UnpicklingError as exc:
            raise UnsafeBackupError(
                f"{path} needs to unpickle objects that are not plain tensors or containers "
                f"({_unpickler_reason(exc)}). "
                "Expected a checkpoint that loads with torch.load(weights_only=True); restoring it could "
                "run code stored in the file, so nothing was loaded. Delete the backup to start fresh, and "
                "keep non-tensor objects (numpy arrays, custom classes) out of hyperparameters and callback "
                "states."
            ) from exc


@contextlib.contextmanager
def _temporary_files_in(directory: Path) -> Iterator[None]:
    """Make ``Trainer.save_checkpoint``'s temporary file land in our staging folder, not in $TMPDIR.

    Lightning writes the checkpoint to ``tempfile.mkstemp()`` and then moves it (fsspec's
    transaction). A kill inside that write left a state-sized file in $TMPDIR for good (48 of 200
    kills in the fault campaign); inside the staging folder it goes with the staging folder, and
    the move becomes a rename on the same filesystem.
    """
    previous, tempfile.tempdir = tempfile.tempdir, str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def _refused_by_safe_load(path: Path) -> str | None:
    """Why ``torch.load(path, weights_only=True)`` refuses the file, or None if it loads."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        return _unpickler_reason(exc)
    return None


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's long weights-only error that names the refused object."""
    lines = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
    return lines[0].split(". Please use")[0] if lines else str(exc)


def _dtype(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def rng_state() -> dict[str, Any]:
    """The global random-number states of torch (CPU, and CUDA once initialised), NumPy and ``random``.

    Only tensors, ints, floats and None, so that ``torch.load(weights_only=True)`` reads them back.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "internal": torch.tensor(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> str | None:
    """Put back what :func:`rng_state` returned; say what could not be restored (or None)."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is None:
        return None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(cuda):
        return (
            f"the backup holds the CUDA random-number states of {len(cuda)} device(s), "
            f"this process sees {available}"
        )
    torch.cuda.set_rng_state_all(cuda)
    return None


def loader_generators(loaders: Iterable[Any]) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that the loaders' samplers and worker seeds draw from, in order.

    ``DataLoader(shuffle=True, generator=g)`` draws each epoch's permutation and worker base seed
    from ``g``, not from the global generator, so its state must be saved too.
    """
    found: list[torch.Generator] = []
    for loader in loaders:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (
            loader,
            getattr(loader, "sampler", None),
            batch_sampler,
            getattr(batch_sampler, "sampler", None),
        ):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found
