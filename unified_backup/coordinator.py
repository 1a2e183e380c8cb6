"""Coordinators: how the processes of one training agree on who writes and when.

Every collective the library makes goes through these four operations, so a single process and
every distributed strategy take the same path; adapters supply the distributed ones (Lightning:
the strategy's ``barrier``/``broadcast``; TensorFlow: the cluster resolver and collective ops).

NOTE: every process must make the same calls, in the same order, with the same names.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@runtime_checkable
class Coordinator(Protocol):
    """The processes of one training, as seen by one of them."""

    @property
    def is_primary(self) -> bool:
        """True on exactly one process: the one that commits, deletes and holds the lock."""

    @property
    def rank(self) -> int:
        """This process's index, 0 on the primary."""

    def barrier(self, name: str) -> None:
        """Return once every process has called ``barrier`` with this name."""

    def broadcast(self, value: T) -> T:
        """Return the primary's ``value`` on every process (JSON-like values only)."""

    def any(self, flag: bool) -> bool:
        """Return True on every process if any process passed True."""

    def gather(self, value: T) -> list[T]:
        """Return every process's ``value``, in rank order, on every process (picklable values)."""


class SingleProcess:
    """The coordinator of a training that runs in one process: every call is immediate."""

    is_primary = True
    rank = 0

    def barrier(self, name: str) -> None:
        return None

    def broadcast(self, value: T) -> T:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def gather(self, value: T) -> list[T]:
        return [value]
