"""Real processes, real SIGKILLs: the lock and the atomic commit survive a dying writer."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from unified_backup import BackupDirInUseError, Slot
from unified_backup.lock import DirectoryLock

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from unified_backup.lock import DirectoryLock
    DirectoryLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)

WRITE_FOREVER = textwrap.dedent(
    """
    import sys
    from unified_backup import Counters, Header, Slot
    slot = Slot(sys.argv[1], keep_previous=sys.argv[2] == "1")
    manifest = slot.read_manifest()
    slot.remove_leftovers(manifest, slot.read_previous() if slot.keep_previous else None)
    i = manifest.epoch if manifest else 0
    print("writing", flush=True)
    while True:
        i += 1
        staged = slot.stage()
        (staged / "weights.bin").write_bytes(bytes([i % 256]) * (4 << 20))
        (staged / "counter.txt").write_text(str(i))
        slot.commit(staged, Header("fake", "1", Counters(i, 0, i), {}))
    """
)


def start(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() in {"locked", "writing"}
    return proc


def test_a_live_owner_blocks_and_a_dead_one_is_taken_over(tmp_path, caplog):
    owner = start(HOLD_LOCK, str(tmp_path))
    try:
        with pytest.raises(BackupDirInUseError, match=rf"in use by another live training \(pid {owner.pid} "):
            DirectoryLock(tmp_path).acquire()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    lock = DirectoryLock(tmp_path)
    with caplog.at_level(logging.INFO):
        lock.acquire()
    assert lock.held and f"left by a run that did not finish (pid {owner.pid}" in caplog.text
    lock.release()


@pytest.mark.parametrize("keep_previous", [False, True], ids=["one-slot", "keep-previous"])
def test_sigkill_during_commits_always_leaves_one_complete_backup(tmp_path, keep_previous):
    rng = random.Random(1234)
    seen = []
    for _ in range(12):
        writer = start(WRITE_FOREVER, str(tmp_path), "1" if keep_previous else "0")
        time.sleep(rng.uniform(0.05, 0.4))
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        slot = Slot(tmp_path, keep_previous=keep_previous)
        manifest = slot.read_manifest()
        assert manifest is not None
        slot.verify(manifest)
        payload = slot.payload_dir(manifest)
        assert int((payload / "counter.txt").read_text()) == manifest.epoch
        assert (payload / "weights.bin").read_bytes()[:1] == bytes([manifest.epoch % 256])
        previous = slot.read_previous()
        if keep_previous and (manifest.epoch > 1 or previous is not None):
            # The previous record is the one before, or (killed between its rename and the commit)
            # the committed one itself: never missing, never damaged, never newer.
            assert previous is not None and previous.epoch in (manifest.epoch - 1, manifest.epoch)
            slot.verify(previous)
        else:
            assert previous is None
        seen.append(manifest.epoch)
    assert seen == sorted(seen) and seen[-1] > 12, seen


HOLD_AND_FORK = textwrap.dedent(
    """
    import os, sys, time
    from unified_backup.lock import DirectoryLock
    DirectoryLock(sys.argv[1]).acquire()
    if os.fork() == 0:  # a forked helper (e.g. a DataLoader worker) that outlives the training
        time.sleep(30)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_a_forked_child_does_not_keep_a_killed_owner_s_lock(tmp_path):
    owner = start(HOLD_AND_FORK, str(tmp_path))
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    lock = DirectoryLock(tmp_path)
    deadline = time.monotonic() + 5  # the child closes its copy as soon as it runs (it sleeps 30 s)
    while not lock.held:
        try:
            lock.acquire()
        except BackupDirInUseError:
            assert time.monotonic() < deadline, "a forked child kept the dead owner's lock"
            time.sleep(0.05)
    lock.release()
