"""The state protocol: what an adapter hands the lifecycle, and where training stands when it does.

An adapter supplies one :class:`TrainingState` per ``fit`` and reports each step or epoch
boundary as a :class:`Position`. The core decides whether to back up and where the files go; the
state only writes its framework's files into the folder it is given, and reads them back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from unified_backup.coordinator import Coordinator
from unified_backup.manifest import Counters, Manifest

SHARDED, REPLICATED = "sharded", "replicated"  # a topology's "layout": how the state lies across processes


@dataclasses.dataclass(frozen=True)
class Position(Counters):
    """Where training stands at a step or epoch boundary: the :class:`Counters` the manifest records,
    and ``batches``, the training batches the epoch in progress has consumed, which a resume reads
    again and skips (0 at an epoch end; more than ``step_in_epoch`` under gradient accumulation).
    """

    batches: int

    @classmethod
    def epoch_end(cls, epochs_done: int, global_step: int) -> Position:
        """The boundary after ``epochs_done`` whole epochs."""
        return cls(epochs_done, 0, global_step, 0)

    @property
    def counters(self) -> Counters:
        """What the manifest records of this position."""
        return Counters(self.epoch, self.step_in_epoch, self.global_step)

    @property
    def at_epoch_end(self) -> bool:
        return self.batches == 0


class TrainingState(Protocol):
    """One framework's training, as the lifecycle sees it.

    NOTE: in a distributed run every process has its own state and the lifecycle calls ``save``
    and ``load`` on every process; the primary's ``directory`` is the one that gets committed,
    the others get a scratch folder that is removed after the commit. A ``save`` that needs
    collectives (e.g. to gather every process's values into the primary's files) must make them all
    before its first write that can fail: the lifecycle then gathers the failures, and a process
    that failed between two collectives would pair its failure report with the others' next call.

    A state may also have ``topology``, a JSON-able mapping of the job's shape (strategy, workers,
    replicas) that the manifest records; a backup restored by a job of another shape is loaded with
    a warning (state replicated on every process). A state whose files depend on the shape (shards)
    must reshard them in ``load``, or refuse another shape there.

    A state may also be ``sharded`` (True, and ``"layout": "sharded"`` in its topology): each process
    holds part of the state and writes its own
    files. Every process is then handed the primary's staging folder (it must be on a filesystem that
    every process sees), writes names no other process writes, and the commit lists every process's
    files with their checksums; a restore verifies them all before any process loads.
    """

    framework: str
    framework_version: str

    @property
    def global_step(self) -> int:
        """Optimizer steps so far (the count ``save_freq=N`` is measured in)."""

    def fingerprint(self) -> Mapping[str, str]:
        """``{variable name: "dtype[shape]"}`` of model and optimizer (see :mod:`fingerprint`)."""

    def save(self, directory: Path, position: Position, coordinator: Coordinator) -> Mapping[str, str] | None:
        """Write the training state at ``position`` into the empty ``directory``.

        May return the checksums of files it computed while writing them (``{relative name:
        digest}``, see :mod:`unified_backup.hashing`): the commit then does not read them again.
        Only the primary's are used (it commits); the files of other processes are read.
        """

    def load(self, directory: Path, manifest: Manifest, coordinator: Coordinator) -> None:
        """Restore the training state from a verified, compatible backup."""


class Snapshot(Protocol):
    """What ``async_backup`` needs of a state besides :class:`TrainingState` (one process only).

    ``snapshot`` copies the state at ``position`` out of the live training, into memory, and
    returns the call that writes that copy: training goes on as soon as ``snapshot`` returns, while
    a background thread makes the call with an empty folder. The call must not touch the live
    training (it may run during the next steps) and returns what ``save`` returns. The lifecycle
    takes a snapshot only once the previous snapshot's call has returned, so a state may reuse the
    previous snapshot's memory.
    """

    def snapshot(
        self, position: Position, coordinator: Coordinator
    ) -> Callable[[Path], Mapping[str, str] | None]: ...
