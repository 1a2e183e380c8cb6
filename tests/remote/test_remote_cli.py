"""The ``unified-backup`` command on a remote backup_dir, configured by the store's environment variables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.core.conftest import FakeState, epoch_end
from unified_backup import BackupOptions, Counters, Lifecycle

pytestmark = pytest.mark.slow


def cli(remote, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **remote.server.env}
    return subprocess.run(
        [sys.executable, "-m", "unified_backup.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def commit_one(remote):
    lifecycle, state = Lifecycle(BackupOptions(remote.url, **remote.options)), FakeState()
    lifecycle.start(state)
    manifest = epoch_end(lifecycle, state, b"epoch-3", Counters(3, 0, 24))
    lifecycle.finish(success=False)
    return manifest


def test_inspect_verify_and_delete(remote):
    assert cli(remote, "inspect", remote.url).returncode == 3  # nothing committed yet
    manifest = commit_one(remote)
    remote.store.write("notes.txt", b"mine")
    shown = cli(remote, "inspect", remote.url)
    assert shown.returncode == 0 and f"{remote.url}/{manifest.payload}" in shown.stdout
    assert "3 epoch(s) done" in shown.stdout
    verified = cli(remote, "verify", remote.url)
    assert verified.returncode == 0 and "2 file(s)" in verified.stdout, verified.stderr

    remote.store.write(f"{manifest.payload}/weights.bin", b"epoch-X")
    damaged = cli(remote, "verify", remote.url)
    assert damaged.returncode == 1 and "fails its sha256 check" in damaged.stderr

    deleted = cli(remote, "delete", remote.url)
    assert deleted.returncode == 0 and "manifest.json" in deleted.stdout, deleted.stderr
    assert remote.store.sizes() == {"notes.txt": 4}  # the user's object stays; no lease is left
    assert cli(remote, "delete", remote.url).returncode == 3
