"""A backup written by one framework is refused by the other, before anything is loaded."""

from __future__ import annotations

import pytest

from unified_backup import IncompatibleBackupError, Slot

from .conftest import DRIVERS, load_driver


@pytest.mark.keras
@pytest.mark.lightning
@pytest.mark.parametrize("writer", sorted(DRIVERS))
def test_backup_of_the_other_framework_is_refused(tmp_path, writer):
    reader = next(name for name in DRIVERS if name != writer)
    write, read = load_driver(writer), load_driver(reader)
    backup_dir = tmp_path / "backup"
    result = write.fit(write.new_run(), backup_dir, epochs=3, interrupt=(1, 2))
    assert isinstance(result.error, RuntimeError)
    manifest = Slot(backup_dir).read_manifest()
    run = read.new_run(seed=1)
    weights = read.weights(run)
    result = read.fit(run, backup_dir, epochs=3)
    assert isinstance(result.error, IncompatibleBackupError), repr(result.error)
    assert f"written by {writer}" in str(result.error) and f"this training runs {reader}" in str(result.error)
    for before, after in zip(weights, read.weights(run), strict=True):
        assert (before == after).all()
    assert Slot(backup_dir).read_manifest() == manifest
