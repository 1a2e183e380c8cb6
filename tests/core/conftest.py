"""Helpers for the core's unit tests: an in-memory training state (the core is framework-free)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unified_backup import BackupOptions, Coordinator, Counters, Lifecycle, Manifest, Position


class FakeState:
    """A training state held in memory: a byte string stands for the weights.

    ``failure``: an exception that ``save`` raises after writing part of the payload (a disk fault).
    """

    framework = "fake"
    framework_version = "1.0"

    def __init__(self, weights: bytes = b"w0", shape: str = "float32[4]") -> None:
        self.weights = weights
        self.shape = shape
        self.loads = 0
        self.global_step = 0
        self.failure: BaseException | None = None

    def fingerprint(self) -> dict[str, str]:
        return {"model/w": self.shape, "optimizer/class": "Adam"}

    def save(self, directory: Path, position: Position, coordinator: Coordinator) -> None:
        (directory / "weights.bin").write_bytes(self.weights if self.failure is None else b"partial")
        if self.failure is not None:
            raise self.failure
        (directory / "sub").mkdir()
        (directory / "sub" / "extra.bin").write_bytes(self.weights[::-1])

    def load(self, directory: Path, manifest: Manifest, coordinator: Coordinator) -> None:
        self.weights = (directory / "weights.bin").read_bytes()
        self.global_step = manifest.global_step
        self.loads += 1


def epoch_end(lifecycle: Lifecycle, state: FakeState, weights: bytes, counters: Counters) -> Manifest | None:
    """The fit of ``state`` ends an epoch at ``counters`` with ``weights``; per-epoch backups commit here."""
    state.weights = weights
    position = Position(counters.epoch, counters.step_in_epoch, counters.global_step, 0)
    return lifecycle.boundary(position, epoch_end=True)


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    return tmp_path / "backup"


@pytest.fixture
def committed(backup_dir: Path) -> Path:
    """A backup_dir holding one committed backup of FakeState(b"committed"), lock released."""
    lifecycle, state = Lifecycle(BackupOptions(backup_dir)), FakeState()
    lifecycle.start(state)
    epoch_end(lifecycle, state, b"committed", Counters(2, 0, 16))
    lifecycle.finish(success=False)
    return backup_dir
