"""A backup that cannot be written leaves the previous one committed and intact, with no staging left."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest

from unified_backup import BackupOptions, BackupWriteError, Counters, Lifecycle, Slot
from unified_backup.slot import PAYLOAD_PREFIX

from ..faults import fill, read_only, tmpfs
from .conftest import FakeState, epoch_end


def committed_epoch(backup_dir):
    slot = Slot(backup_dir)
    manifest = slot.read_manifest()
    slot.verify(manifest)
    assert [p.name for p in backup_dir.iterdir() if p.name.startswith(PAYLOAD_PREFIX)] == [manifest.payload]
    return manifest.epoch


def started(backup_dir, **options):
    lifecycle, state = Lifecycle(BackupOptions(backup_dir, **options)), FakeState()
    lifecycle.start(state)
    epoch_end(lifecycle, state, b"epoch1" * 1000, Counters(1, 0, 8))
    return lifecycle, state


def test_disk_full_raises_and_keeps_the_previous_backup(tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mount:
        backup_dir = mount / "backup"
        lifecycle, state = started(backup_dir)
        fill(mount)
        with pytest.raises(BackupWriteError, match="still committed and intact") as info:
            epoch_end(lifecycle, state, b"epoch2" * 100000, Counters(2, 0, 16))
        assert info.value.errno == errno.ENOSPC
        assert committed_epoch(backup_dir) == 1
        lifecycle.finish(success=False)


def test_disk_full_with_warn_trains_on_and_backs_up_once_space_returns(tmp_path, caplog):
    with tmpfs(tmp_path / "mnt", "1m") as mount:
        backup_dir = mount / "backup"
        lifecycle, state = started(backup_dir, on_write_error="warn")
        filler = fill(mount)
        assert epoch_end(lifecycle, state, b"epoch2" * 100000, Counters(2, 0, 16)) is None
        assert "Backup skipped" in caplog.text and "No space left" in caplog.text
        assert committed_epoch(backup_dir) == 1
        filler.unlink()
        assert epoch_end(lifecycle, state, b"epoch3", Counters(3, 0, 24)).epoch == 3
        assert committed_epoch(backup_dir) == 3
        lifecycle.finish(success=True)
        assert not backup_dir.exists()


def test_read_only_folder(tmp_path):
    backup_dir = tmp_path / "backup"
    lifecycle, state = started(backup_dir)
    with read_only(backup_dir):
        with pytest.raises(BackupWriteError, match="Operation not permitted") as info:
            epoch_end(lifecycle, state, b"epoch2", Counters(2, 0, 16))
        assert info.value.errno == errno.EPERM
    assert committed_epoch(backup_dir) == 1
    lifecycle.finish(success=False)


FILE_TOO_LARGE = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from unified_backup import BackupOptions, BackupWriteError, Counters, Lifecycle
    sys.path.insert(0, sys.argv[2])
    from tests.core.conftest import FakeState, epoch_end
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # deliver EFBIG instead of killing the process
    lifecycle, state = Lifecycle(BackupOptions(sys.argv[1])), FakeState()
    lifecycle.start(state)
    epoch_end(lifecycle, state, b"small", Counters(1, 0, 8))
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        epoch_end(lifecycle, state, b"large" * 10000, Counters(2, 0, 16))
    except BackupWriteError as exc:
        print("errno", exc.errno, exc)
    """
)


def test_file_size_limit(tmp_path):
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", FILE_TOO_LARGE, str(tmp_path / "backup"), root],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"errno {errno.EFBIG}" in out.stdout, out.stdout + out.stderr
    assert "still committed and intact" in out.stdout
    assert committed_epoch(tmp_path / "backup") == 1
