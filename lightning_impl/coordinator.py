"""The core's :class:`unified_backup.Coordinator` for a Lightning ``Trainer``, through its strategy.

One implementation serves every strategy (single device, DDP, DDP spawn, ...): the strategy
knows its ranks and its collectives. NOTE: every rank must make the same calls in the same order.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from unified_backup.errors import UnsupportedEnvironmentError

T = TypeVar("T")


class LightningCoordinator:
    """The processes of one ``Trainer.fit``, as seen by one of them."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    @property
    def is_primary(self) -> bool:
        return bool(self._trainer.is_global_zero)

    @property
    def rank(self) -> int:
        return int(self._trainer.global_rank)

    def barrier(self, name: str) -> None:
        self._trainer.strategy.barrier(name)

    def broadcast(self, value: T) -> T:
        return self._trainer.strategy.broadcast(value, src=0)

    def any(self, flag: bool) -> bool:
        return bool(self._trainer.strategy.reduce_boolean_decision(flag, all=False))

    def gather(self, value: T) -> list[T]:
        world = int(self._trainer.world_size)
        if world == 1:
            return [value]
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise UnsupportedEnvironmentError(
                f"BackupAndRestore needs torch.distributed to coordinate the {world} processes of this "
                f"training, but no process group is initialised ({type(self._trainer.strategy).__name__}). "
                "Expected a DDP strategy; use one, or train in one process."
            )
        out: list[Any] = [None] * world
        torch.distributed.all_gather_object(out, value)
        return out
