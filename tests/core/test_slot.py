import json
import os

import pytest

from unified_backup import CorruptBackupError, Counters, Header, Position, SingleProcess, Slot
from unified_backup.slot import PAYLOAD_PREFIX

from .conftest import FakeState


def payloads(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(PAYLOAD_PREFIX))


def commit(slot, weights=b"abc", epoch=1):
    staged = slot.stage()
    FakeState(weights).save(staged, Position.epoch_end(epoch, epoch * 8), SingleProcess())
    return slot.commit(staged, Header("fake", "1", Counters(epoch, 0, epoch * 8), {}))


def test_commit_writes_manifest_last_and_replaces_the_old_backup(backup_dir):
    slot = Slot(backup_dir)
    first = commit(slot, b"one", 1)
    assert payloads(backup_dir) == [first.payload]
    second = commit(slot, b"two", 2)
    assert payloads(backup_dir) == [second.payload]
    manifest = slot.read_manifest()
    assert manifest == second and manifest.epoch == 2
    assert (slot.payload_dir(manifest) / "weights.bin").read_bytes() == b"two"
    assert set(manifest.files) == {"weights.bin", "sub/extra.bin"}
    slot.verify(manifest)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "has 99 bytes; the manifest expects 100"),
        (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "fails its sha256 check"),
        (lambda p: p.unlink(), "is missing"),
        (lambda p: (p.parent / "planted.py").write_text("x"), "not listed in the manifest"),
    ],
    ids=["truncated", "flipped", "missing", "extra"],
)
def test_verify_names_the_damaged_file(backup_dir, damage, message):
    slot = Slot(backup_dir)
    manifest = commit(slot, bytes(range(100)))
    target = slot.payload_dir(manifest) / "weights.bin"
    damage(target)
    with pytest.raises(CorruptBackupError, match=message) as info:
        slot.verify(manifest)
    assert "weights.bin" in str(info.value) or "planted.py" in str(info.value)


def test_leftovers_are_removed_but_never_the_committed_backup(backup_dir):
    slot = Slot(backup_dir)
    manifest = commit(slot)
    orphan = slot.stage()
    (orphan / "half.bin").write_bytes(b"x")
    (backup_dir / "manifest.json.tmp-dead").write_text("{")
    removed = slot.remove_leftovers(slot.read_manifest())
    assert sorted(p.name for p in removed) == sorted([orphan.name, "manifest.json.tmp-dead"])
    assert payloads(backup_dir) == [manifest.payload]


def test_delete_keeps_user_files(backup_dir):
    slot = Slot(backup_dir)
    commit(slot)
    (backup_dir / "notes.txt").write_text("mine")
    slot.delete()
    slot.prune()
    assert sorted(os.listdir(backup_dir)) == ["notes.txt"]


def test_delete_never_removes_a_users_file_that_shares_the_manifest_name(backup_dir, caplog):
    backup_dir.mkdir()
    (backup_dir / "manifest.json").write_text('{"format": "my-dataset", "rows": 3}')
    (backup_dir / "manifest.previous.json").write_text("[1, 2]")
    staged = Slot(backup_dir).stage()  # one of our payload folders beside them
    assert Slot(backup_dir).delete() == [staged.name]
    assert (backup_dir / "manifest.json").read_text() == '{"format": "my-dataset", "rows": 3}'
    assert (backup_dir / "manifest.previous.json").read_text() == "[1, 2]"
    assert sum("not a manifest unified-backup wrote" in r.getMessage() for r in caplog.records) == 2


def test_delete_removes_a_damaged_manifest_only_beside_a_payload_of_ours(backup_dir):
    slot = Slot(backup_dir)
    manifest = commit(slot)
    (backup_dir / "manifest.json").write_bytes(b"\xff{ damaged")
    assert slot.delete() == ["manifest.json", manifest.payload]
    (backup_dir / "manifest.json").write_text("{ a user's half-written file")  # no payload of ours now
    assert slot.delete() == []
    assert (backup_dir / "manifest.json").exists()
    (backup_dir / "manifest.json").write_text('{\n  "epoch": 2,\n  "format": "unified-backup",\n  "ver')
    assert slot.delete() == ["manifest.json"]  # truncated, but it still says whose it is


def test_delete_then_prune_removes_an_emptied_folder_the_library_made(backup_dir):
    slot = Slot(backup_dir)
    slot.claim()
    commit(slot)
    slot.delete()
    slot.prune()
    assert not backup_dir.exists()


def test_prune_keeps_a_folder_that_existed_before(backup_dir):
    backup_dir.mkdir()
    slot = Slot(backup_dir)
    slot.claim()  # it exists: not the library's
    commit(slot)
    slot.delete()
    slot.prune()
    assert backup_dir.is_dir() and not any(backup_dir.iterdir())


def test_manifest_names_a_missing_payload(backup_dir):
    slot = Slot(backup_dir)
    manifest = commit(slot)
    os.rename(slot.payload_dir(manifest), backup_dir / "elsewhere")
    with pytest.raises(CorruptBackupError, match="does not exist"):
        slot.verify(manifest)


def test_payload_escaping_the_folder_is_refused(backup_dir):
    slot = Slot(backup_dir)
    commit(slot)
    body = json.loads(slot.manifest_path.read_text())
    assert body["payload"].startswith(PAYLOAD_PREFIX)
    manifest = slot.read_manifest()
    bad = type(manifest)(**{**manifest.__dict__, "payload": "../outside"})
    with pytest.raises(CorruptBackupError):
        slot.verify(bad)


def test_counters_of_a_commit(backup_dir):
    manifest = commit(Slot(backup_dir), epoch=3)
    assert manifest.counters == Counters(3, 0, 24)
