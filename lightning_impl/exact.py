"""What a resume needs beyond weights and optimizer to change nothing: RNG states, data position, epoch sums.

Lightning saves none of it. Each backup adds, for every process (rank 0 writes them all):

- ``epoch_start``: the random-number states that the training iterator of the epoch in progress
  was made from (torch CPU and CUDA, NumPy, ``random``, and each loader's ``torch.Generator``), and
  when it was made: ``"fit"``, by Lightning's setup after ``on_fit_start`` (the first epoch of a
  ``fit``), or ``"epoch"``, right after ``on_train_epoch_start``.
- in the middle of an epoch only: the random-number states at the backup, how many batches the
  epoch has consumed, and the epoch's running aggregates of the values logged with ``on_epoch=True``.

Each state is restored in the hook that captured it, so the draws in between replay as they were:

- backup at an epoch end: in ``on_train_epoch_start`` of the next epoch, restore the states and
  make that epoch's iterator again (Lightning's setup made one earlier, from other states);
- backup mid-epoch: for ``"fit"``, restore during the load in ``on_fit_start``, and Lightning's setup
  makes the same iterator; for ``"epoch"``, restore in ``on_train_start`` and make it again. Then read
  and drop the batches already trained on, restore the states of the backup, and fold the saved
  epoch aggregates in once the first batch has logged its values.

Reading the epoch's data again up to the backup is exact for a ``DataLoader`` over a map-style
dataset (any sampler, any ``num_workers``): the sampler order, the worker seeds and any random
transforms replay as they were. It costs the time of loading those batches, not of training on
them. With ``persistent_workers=True`` the workers' own random-number states are not in the backup
(a warning says so). A loader that keeps its own position (``state_dict`` and
``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``) is positioned by Lightning; only the
random-number states are restored. Any other loader (an ``IterableDataset``, another iterable) is
not positioned, since reading it again need not give the same batches: a warning says so once, at
restore time, and Lightning's own behaviour follows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from lightning_impl import _private
from lightning_impl.rng import loader_generators, rng_state, set_rng_state

log = logging.getLogger(__name__)

FIT, EPOCH = "fit", "epoch"
NOT_POSITIONED = (
    "Resuming in the middle of epoch %d, after %d of its batches, but the training data cannot be "
    "positioned there: %s. Lightning reads the training data again from its first batch, so the batches "
    "already trained on in this epoch are trained on again%s. For an exact resume use save_freq='epoch', "
    "a DataLoader over a map-style dataset (any sampler), or a loader that saves its position "
    "(state_dict/load_state_dict, e.g. torchdata's StatefulDataLoader)."
)
NOT_EXACT = "The resume from %s is not exact: %s. Training goes on from the backup."
PERSISTENT_WORKERS = (
    "The resume from %s is exact only if the dataset draws no random numbers in its worker processes: "
    "DataLoader(persistent_workers=True) keeps its workers, and their random-number states, from one "
    "epoch to the next, and those states are not in the backup; the resumed run starts new workers. "
    "Random augmentation in the workers therefore differs from the interrupted run from here on. Use "
    "persistent_workers=False for an exact resume."
)


class ExactResume:
    """The bookkeeping of one ``fit`` behind an exact resume, driven by ``BackupAndRestore``'s hooks.

    Made in ``on_fit_start``, before the restore: it notes the states the first epoch's iterator
    will be made from.
    """

    def __init__(self) -> None:
        self._epoch_start: dict[str, Any] = {"mode": FIT, "rng": rng_state()}
        self._restored: dict[str, Any] | None = None  # this process's part of the backup, until applied
        self._batches = 0
        self._aggregates: dict[str, Any] | None = None
        self._quiet: _private.QuietNotResumableWarning | None = None
        self._source = ""  # the backup_dir restored from, for warnings

    def load(self, trainer: Any, entry: Mapping[str, Any], rank: int, source: str) -> None:
        """During the restore: keep this process's part; replay a ``"fit"`` iterator's states now."""
        self._source = source
        if "ranks" not in entry:
            log.warning(NOT_EXACT, source, "the backup holds no random-number states")
            return
        ranks = entry["ranks"]
        if len(ranks) != trainer.world_size:
            log.warning(
                NOT_EXACT,
                source,
                f"the backup holds the random-number states of {len(ranks)} process(es), "
                f"this run has {trainer.world_size}",
            )
        self._restored = ranks[min(rank, len(ranks) - 1)]
        self._batches = int(entry["batches"])
        self._epoch_start = self._restored["epoch_start"]
        if self._batches and self._epoch_start["mode"] == FIT:
            self._set(self._epoch_start["rng"])

    def train_start(self, trainer: Any) -> None:
        """``on_train_start``: a mid-epoch resume positions the data, then restores the backup's states."""
        if self._restored is None or not self._batches:
            return
        restored, self._restored = self._restored, None
        loaders = _private.train_loaders(trainer)
        problem = _why_not_positionable(loaders)
        if problem:
            length = _private.epoch_length(trainer)
            left = (
                f" and, as the epoch still ends after {length} batches, its last {self._batches} are not"
                if length
                else ""
            )
            log.warning(NOT_POSITIONED, trainer.current_epoch, self._batches, problem, left)
        elif not _stateful(loaders):
            if self._epoch_start["mode"] == EPOCH:
                self._replay_epoch_start(trainer, loaders)
            _private.skip_batches(trainer, self._batches)
            self._quiet = _private.QuietNotResumableWarning()
        self._set(restored["rng"])
        self._aggregates = restored.get("aggregates")

    def epoch_start(self, trainer: Any) -> None:
        """``on_train_epoch_start``: note the states the epoch's iterator is made from, or replay them."""
        loaders = _private.train_loaders(trainer)
        if self._restored is not None:  # restored at an epoch end: this epoch's iterator is made again
            self._epoch_start, self._restored = self._restored["epoch_start"], None
            self._replay_epoch_start(trainer, loaders)  # stateful loaders too: a new epoch
        elif _private.iterator_made_after_epoch_start(trainer):
            generators = [g.get_state() for g in loader_generators(loaders)]
            self._epoch_start = {"mode": EPOCH, "rng": rng_state(), "generators": generators}

    def batch_start(self) -> None:
        """``on_train_batch_start``: the resumed epoch is under way; Lightning's warning is past."""
        if self._quiet is not None:
            self._quiet.close()
            self._quiet = None

    def batch_end(self, trainer: Any) -> None:
        """``on_train_batch_end``: after the first resumed batch, add the saved epoch aggregates in."""
        if self._aggregates is not None:
            folded = _private.fold_epoch_aggregates(trainer, self._aggregates)
            missing = sorted(set(self._aggregates) - set(folded))
            if missing:
                log.warning(
                    "The epoch-end values of %s will aggregate only the batches after the resume: they "
                    "were not logged (self.log(..., on_epoch=True)) in the first training_step after it.",
                    ", ".join(missing),
                )
            self._aggregates = None

    def entry(self, trainer: Any, gather: Any, batches: int) -> dict[str, Any]:
        """What a backup taken now adds to the checkpoint: every process's states, gathered on all ranks.

        ``batches``: training batches the epoch in progress has consumed (0 at an epoch end, where
        the states now are those the next epoch's iterator is made from).
        NOTE: a collective; every rank calls it while building the same backup.
        """
        if batches:
            mine = {
                "epoch_start": self._epoch_start,
                "rng": rng_state(),
                "aggregates": _private.epoch_aggregates(trainer),
            }
        else:
            generators = [g.get_state() for g in loader_generators(_private.train_loaders(trainer))]
            mine = {"epoch_start": {"mode": EPOCH, "rng": rng_state(), "generators": generators}}
        return {"batches": batches, "ranks": gather(mine)}

    def close(self) -> None:
        """End of ``fit`` (or a new one): drop everything, leave no warning filter behind."""
        self.batch_start()
        self._restored = None
        self._aggregates = None
        self._batches = 0

    def _replay_epoch_start(self, trainer: Any, loaders: list[Any]) -> None:
        """Make the epoch's training iterator again from the states the interrupted run made it from."""
        self._set(self._epoch_start["rng"])
        self._set_generators(self._epoch_start["generators"], loaders)
        if any(getattr(dl, "persistent_workers", False) and getattr(dl, "num_workers", 0) for dl in loaders):
            log.warning(PERSISTENT_WORKERS, self._source)
        _private.restart_epoch_data(trainer)

    def _set(self, state: Mapping[str, Any]) -> None:
        problem = set_rng_state(state)
        if problem:
            log.warning(NOT_EXACT, self._source, problem)

    def _set_generators(self, states: list[Any], loaders: list[Any]) -> None:
        generators = loader_generators(loaders)
        if len(generators) != len(states):
            log.warning(
                NOT_EXACT,
                self._source,
                f"the training loaders draw from {len(generators)} torch.Generator(s), the backup holds the "
                f"states of {len(states)}, so the data order is not the one the interrupted run had",
            )
            return
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)


def _stateful(loaders: list[Any]) -> bool:
    """Whether Lightning saves and restores the position of every training loader (its ``_Stateful`` test)."""
    return bool(loaders) and all(
        callable(getattr(dl, "state_dict", None)) and callable(getattr(dl, "load_state_dict", None))
        for dl in loaders
    )


def _why_not_positionable(loaders: list[Any]) -> str | None:
    """Why the epoch's training data cannot be read again up to the backup's batch (None: it can)."""
    if _stateful(loaders):
        return None  # Lightning restores their position
    stateful = [type(dl).__name__ for dl in loaders if callable(getattr(dl, "state_dict", None))]
    if stateful:
        return (
            f"some training loaders save their position ({', '.join(stateful)}) and others do not, so they "
            "cannot be positioned together"
        )
    others = sorted(
        {
            type(dl.dataset if isinstance(dl, DataLoader) else dl).__name__
            for dl in loaders
            if not isinstance(dl, DataLoader) or isinstance(dl.dataset, IterableDataset)
        }
    )
    if others:
        return (
            f"{', '.join(others)} is not a DataLoader over a map-style dataset (an IterableDataset, or "
            "another iterable), and reading it again need not give the same batches"
        )
    return None
