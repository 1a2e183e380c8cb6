"""Helpers for the core's unit tests: an in-memory training state (the core is framework-free)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unified_backup import BackupOptions, Lifecycle, Manifest


class FakeState:
    """A training state held in memory: a byte string stands for the weights."""

    framework = "fake"
    framework_version = "1.0"

    def __init__(self, weights: bytes = b"w0", shape: str = "float32[4]") -> None:
        self.weights = weights
        self.shape = shape
        self.loads = 0

    def fingerprint(self) -> dict[str, str]:
        return {"model/w": self.shape, "optimizer/class": "Adam"}

    def save(self, directory: Path) -> None:
        (directory / "weights.bin").write_bytes(self.weights)
        (directory / "sub").mkdir()
        (directory / "sub" / "extra.bin").write_bytes(self.weights[::-1])

    def load(self, directory: Path, manifest: Manifest) -> None:
        self.weights = (directory / "weights.bin").read_bytes()
        self.loads += 1


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    return tmp_path / "backup"


@pytest.fixture
def committed(backup_dir: Path) -> Path:
    """A backup_dir holding one committed backup of FakeState(b"committed"), lock released."""
    lifecycle = Lifecycle(BackupOptions(backup_dir))
    lifecycle.start(FakeState())
    from unified_backup import Counters

    lifecycle.backup(FakeState(b"committed"), Counters(2, 0, 16))
    lifecycle.finish(success=False)
    return backup_dir
