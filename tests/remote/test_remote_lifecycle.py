"""The core's remote slot and lease against real S3 and GCS servers (no ML framework)."""

from __future__ import annotations

import logging

import pytest

from tests.core.conftest import FakeState, epoch_end
from tests.remote.servers import S3_SECRET, unique_url
from unified_backup import BackupError, BackupOptions, BackupWriteError, Counters, Lifecycle
from unified_backup.store import ObjectStore


def lifecycle(remote, **options) -> Lifecycle:
    return Lifecycle(BackupOptions(remote.url, **remote.options, **options))


def test_backup_restore_and_delete_on_success(remote, tmp_path):
    first, state = lifecycle(remote, staging_dir=tmp_path / "staging"), FakeState()
    first.start(state)
    epoch_end(first, state, b"epoch-1", Counters(1, 0, 8))
    manifest = epoch_end(first, state, b"epoch-2", Counters(2, 0, 16))
    first.finish(success=False)
    objects = remote.objects()
    assert sorted(objects) == [
        "manifest.json",
        f"{manifest.payload}/sub/extra.bin",
        f"{manifest.payload}/weights.bin",
    ]
    assert list((tmp_path / "staging").iterdir()) == []  # staging cleaned

    second, restored = lifecycle(remote), FakeState(b"fresh")
    assert second.start(restored).global_step == 16
    assert restored.weights == b"epoch-2"
    second.finish(success=True)
    assert remote.objects() == {} and remote.store.sizes() == {}


def test_keep_previous_restores_the_previous_backup_when_the_newest_is_damaged(remote, caplog):
    first, state = lifecycle(remote, keep_previous=True), FakeState()
    first.start(state)
    older = epoch_end(first, state, b"epoch-1", Counters(1, 0, 8))
    newest = epoch_end(first, state, b"epoch-2", Counters(2, 0, 16))
    first.finish(success=False)
    assert {name.split("/")[0] for name in remote.objects()} == {
        "manifest.json",
        "manifest.previous.json",
        older.payload,
        newest.payload,
    }
    remote.store.write(f"{newest.payload}/weights.bin", b"epoch-X")  # same size, other bytes

    second, restored = lifecycle(remote, keep_previous=True), FakeState(b"fresh")
    with caplog.at_level(logging.WARNING):
        assert second.start(restored).global_step == 8
    assert restored.weights == b"epoch-1"
    assert "fails its sha256 check" in caplog.text
    assert newest.payload not in {name.split("/")[0] for name in remote.objects()}
    second.finish(success=False)


def test_an_unnamed_payload_is_removed_with_a_warning_and_never_restored(remote, caplog):
    first, state = lifecycle(remote), FakeState()
    first.start(state)
    committed = epoch_end(first, state, b"epoch-1", Counters(1, 0, 8))
    first.finish(success=False)
    interrupted = "payload-20260101T000000-0123abcd"  # an upload a kill interrupted
    remote.store.write(f"{interrupted}/weights.bin", b"half")

    second, restored = lifecycle(remote), FakeState(b"fresh")
    with caplog.at_level(logging.WARNING):
        second.start(restored)
    assert restored.weights == b"epoch-1"
    assert f"Removed 1 payload(s) in {remote.url} that no manifest names" in caplog.text
    assert {name.split("/")[0] for name in remote.objects()} == {"manifest.json", committed.payload}
    second.finish(success=False)


def test_users_objects_beside_the_backup_are_left_alone(remote):
    remote.store.write("notes.txt", b"mine")
    remote.store.write("payload-images/cat.png", b"mine too")
    first, state = lifecycle(remote), FakeState()
    first.start(state)
    epoch_end(first, state, b"epoch-1", Counters(1, 0, 8))
    first.finish(success=True)
    assert remote.objects() == {"notes.txt": b"mine", "payload-images/cat.png": b"mine too"}


class StopsTheServer(FakeState):
    """Writes its files, then the store's server stops: the upload that follows finds no server."""

    def __init__(self, server) -> None:
        super().__init__()
        self.server = server

    def save(self, directory, position, coordinator):
        super().save(directory, position, coordinator)
        if position.global_step == 16:
            self.server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("on_write_error", ["raise", "warn"])
def test_server_stopped_during_a_backup_keeps_the_last_one_committed(
    remote, tmp_path, caplog, monkeypatch, on_write_error
):
    if on_write_error == "warn" and remote.server.protocol == "gs":
        pytest.skip("the same path as s3; gcsfs alone spends 36 s retrying each request")
    monkeypatch.setattr("unified_backup.store.RETRY_SECONDS", 5.0)  # s3fs and gcsfs retry inside too
    staging = tmp_path / "staging"
    first, state = (
        lifecycle(remote, on_write_error=on_write_error, staging_dir=staging),
        StopsTheServer(remote.server),
    )
    first.start(state)
    committed = epoch_end(first, state, b"epoch-1", Counters(1, 0, 8))
    try:
        if on_write_error == "raise":
            with pytest.raises(BackupWriteError, match="the last backup is still committed and intact"):
                epoch_end(first, state, b"epoch-2", Counters(2, 0, 16))
        else:
            with caplog.at_level(logging.WARNING):
                assert epoch_end(first, state, b"epoch-2", Counters(2, 0, 16)) is None
            assert "Backup skipped" in caplog.text
        assert not any(staging.rglob("weights.bin"))  # the failed upload's staging folder is gone
    finally:
        remote.server.start()
    first.finish(success=False)
    assert not any(staging.rglob("*.bin"))

    second, restored = lifecycle(remote), FakeState(b"fresh")
    assert second.start(restored).global_step == 8 and restored.weights == b"epoch-1"
    assert {name.split("/")[0] for name in remote.objects()} == {"manifest.json", committed.payload}
    second.finish(success=True)
    assert remote.store.sizes() == {}


def test_credentials_are_never_written_logged_or_shown(s3_server, caplog):
    url = unique_url(s3_server)
    secret = S3_SECRET
    with caplog.at_level(logging.DEBUG):
        lifecycle, state = (
            Lifecycle(BackupOptions(url, storage_options=s3_server.storage_options)),
            FakeState(),
        )
        lifecycle.start(state)
        manifest = epoch_end(lifecycle, state, b"epoch-1", Counters(1, 0, 8))
        lifecycle.finish(success=False)
        wrong = dict(s3_server.storage_options, secret="wrong-" + secret)
        with pytest.raises(BackupError) as refused:
            Lifecycle(BackupOptions(f"s3://no-such-bucket-{secret[:4]}/x", storage_options=wrong)).start(
                FakeState()
            )
    store = ObjectStore(url, s3_server.storage_options)
    everything = b"".join(store.read(name) or b"" for name in store.sizes())
    assert secret.encode() not in everything and manifest.to_json().find(secret) == -1
    assert secret not in caplog.text and secret not in str(refused.value)
    assert "does not exist" in str(refused.value)


def test_a_remote_lifecycle_can_be_pickled_for_spawned_processes(remote):
    import pickle

    copy = pickle.loads(pickle.dumps(Lifecycle(BackupOptions(remote.url, **remote.options))))
    lifecycle, state = copy, FakeState()
    lifecycle.start(state)
    assert epoch_end(lifecycle, state, b"epoch-1", Counters(1, 0, 8)) is not None
    lifecycle.finish(success=True)
    assert remote.store.sizes() == {}
