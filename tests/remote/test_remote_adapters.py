"""Both adapters (Keras 3, tf_keras, Lightning) with a remote ``backup_dir``, against real S3 and GCS
servers: the conformance suite's resume scenarios, the bad-input table and SIGKILLs during the upload."""

from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np
import pytest

from tests.conformance.conftest import load_driver
from tests.conformance.test_exact import assert_identical
from tests.harness import Worker, worker_argv
from unified_backup import (
    CorruptBackupError,
    IncompatibleBackupError,
    Manifest,
    NoBackupError,
)
from unified_backup.manifest import MANIFEST_NAME
from unified_backup.remote_slot import RemoteSlot

pytestmark = pytest.mark.slow
EPOCHS = 4


@pytest.fixture(params=["keras", "tf_keras", "lightning"], scope="module")
def driver(request):
    request.applymarker(getattr(pytest.mark, request.param))
    return load_driver(request.param)


def slot(remote) -> RemoteSlot:
    return RemoteSlot(remote.url, storage_options=remote.server.storage_options)


def test_interrupted_twice_resumes_bit_identical_then_deletes(driver, remote, tmp_path):
    options = dict(shuffle=True, dropout=0.2)
    reference = driver.new_run(seed=0, **options)
    ref = driver.fit(reference, tmp_path / "reference", epochs=EPOCHS, save_freq=5)
    losses: dict[int, float] = {}
    for k, point in enumerate([(1, 3), (2, 6), None]):
        run = driver.new_run(seed=k, **options)
        result = driver.fit(run, remote.url, epochs=EPOCHS, save_freq=5, interrupt=point, **remote.options)
        losses.update(result.losses)
        if point is not None:
            assert isinstance(result.error, RuntimeError), result.error
            assert slot(remote).read_manifest() is not None
    assert result.error is None, repr(result.error)
    assert result.global_step == ref.global_step
    assert_identical(driver.weights(run), driver.weights(reference), "weights")
    assert_identical(driver.optimizer_state(run), driver.optimizer_state(reference), "optimizer state")
    assert losses == ref.losses
    assert remote.store.sizes() == {}  # the backup and the lease are gone


def test_resume_required_without_a_backup_names_the_url(driver, remote):
    result = driver.fit(driver.new_run(), remote.url, epochs=1, resume="required", **remote.options)
    assert isinstance(result.error, NoBackupError) and remote.url in str(result.error)
    assert result.epochs_run == []


def test_keep_previous_falls_back_when_the_newest_is_damaged(driver, remote):
    first = driver.fit(
        driver.new_run(), remote.url, epochs=EPOCHS, interrupt=(3, 1), keep_previous=True, **remote.options
    )
    assert isinstance(first.error, RuntimeError)
    newest, previous = slot(remote).read_manifest(), slot(remote).read_previous()
    assert (newest.epoch, previous.epoch) == (3, 2)
    name = max(newest.files, key=lambda n: newest.files[n].bytes)
    data = remote.store.read(f"{newest.payload}/{name}")
    remote.store.write(f"{newest.payload}/{name}", data[:-1] + bytes([data[-1] ^ 1]))
    run = driver.new_run(seed=1)
    result = driver.fit(run, remote.url, epochs=EPOCHS, keep_previous=True, **remote.options)
    assert result.error is None and result.epochs_run == [2, 3]  # resumed after epoch 2, the previous one


# -- the bad-input table, on an object store -------------------------------------------------------


def _make_backup(driver, remote) -> Manifest:
    result = driver.fit(driver.new_run(seed=0), remote.url, epochs=4, interrupt=(2, 1), **remote.options)
    assert isinstance(result.error, RuntimeError), result.error
    manifest = slot(remote).read_manifest()
    assert manifest is not None and manifest.epoch == 2
    return manifest


def _largest(manifest: Manifest) -> str:
    return f"{manifest.payload}/{max(manifest.files, key=lambda n: manifest.files[n].bytes)}"


def _flip(remote, name: str, at: int) -> None:
    data = bytearray(remote.store.read(name))
    data[at % len(data)] ^= 0x10
    remote.store.write(name, bytes(data))


CASES = {
    "payload byte flipped": (lambda r, m: _flip(r, _largest(m), len(r.store.read(_largest(m))) // 2),
                             CorruptBackupError, "fails its sha256 check", {}),
    "payload truncated": (lambda r, m: r.store.write(_largest(m), r.store.read(_largest(m))[:100]),
                          CorruptBackupError, "truncated", {}),
    "payload object missing": (lambda r, m: r.store.remove([_largest(m)]),
                               CorruptBackupError, "incomplete", {}),
    "extra object in the payload": (lambda r, m: r.store.write(f"{m.payload}/planted.bin", b"x"),
                                    CorruptBackupError, "planted.bin", {}),
    "manifest byte flipped": (lambda r, m: r.store.write(MANIFEST_NAME, r.store.read(MANIFEST_NAME).replace(
        b'"global_step": ', b'"global_step": 1')), CorruptBackupError, "manifest.json", {}),
    "changed architecture": (lambda r, m: None, IncompatibleBackupError, "model/", {"width": 16}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_and_the_backup_left_as_it_was(driver, remote, case):
    if driver.name == "tf_keras":
        pytest.skip("tf_keras goes through the Keras adapter's code, covered by 'keras'")
    damage, expected, names, run_args = CASES[case]
    manifest = _make_backup(driver, remote)
    damage(remote, manifest)
    before = {name: hashlib.sha256(data).hexdigest() for name, data in remote.objects().items()}
    run = driver.new_run(seed=1, **run_args)
    weights = driver.weights(run)
    result = driver.fit(run, remote.url, epochs=4, **remote.options)
    assert isinstance(result.error, expected) and names in str(result.error), repr(result.error)
    assert all(np.array_equal(a, b) for a, b in zip(weights, driver.weights(run), strict=True))
    after = {name: hashlib.sha256(data).hexdigest() for name, data in remote.objects().items()}
    assert after == before  # nothing loaded, deleted or rewritten


# -- SIGKILL during the upload -----------------------------------------------------------------------


@dataclasses.dataclass
class Killed:
    committed_step: int | None  # the newest committed backup's global step when the kill landed


def _kill_inside_an_upload(worker: Worker, remote, after_a_commit: bool) -> Killed:
    """SIGKILL ``worker`` as soon as objects of a new payload (one no manifest names) are seen: its
    upload has begun and its commit has not. (A PUT in flight is not visible: the kill lands at the
    end of the upload or during the commit, and the commit may land first.)"""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and worker.proc.poll() is None:
        names = remote.store.sizes()
        committed = slot(remote).read_manifest()
        if after_a_commit and committed is None:
            time.sleep(0.005)
            continue
        if {n.split("/")[0] for n in names if n.startswith("payload-")} - {committed and committed.payload}:
            worker.kill()
            committed = slot(remote).read_manifest()  # what the kill left committed
            return Killed(committed.global_step if committed else None)
        time.sleep(0.002)
    raise AssertionError(f"no upload was seen before the worker ended:\n{worker.failure()}")


def test_sigkill_during_the_upload_resumes_from_the_last_committed_backup(driver, remote, tmp_path):
    if driver.name == "tf_keras":
        pytest.skip("tf_keras goes through the Keras adapter's code, covered by 'keras'")
    staging = tmp_path / "tmp"
    staging.mkdir()
    env = {**remote.server.env, "TMPDIR": str(staging)}
    argv = lambda out: worker_argv(driver.name, remote.url, out, epochs=6, save_freq=4, hidden=20000)  # noqa: E731
    reference = Worker(
        argv(tmp_path / "reference.json"), env=env
    )  # an uninterrupted run of the same training
    assert reference.finish(600) == 0, reference.failure()
    assert remote.store.sizes() == {}

    killed: list[Killed] = []
    for after_a_commit in (False, True):  # the first upload, then one that replaces a committed backup
        worker = Worker(argv(tmp_path / "run.json"), env=env)
        start = worker.wait_event("start", 300)
        assert start is not None, worker.failure()
        if killed:  # resumed from the newest committed backup (none after the first kill)
            restored = start["global_step"] if start.get("restored_epoch") is not None else None
            assert restored == killed[-1].committed_step
        killed.append(_kill_inside_an_upload(worker, remote, after_a_commit))
    assert killed[-1].committed_step is not None
    worker = Worker(argv(tmp_path / "run.json"), env=env)
    start = worker.wait_event("start", 300)
    assert start is not None, worker.failure()
    assert start.get("global_step") == killed[-1].committed_step and start.get("restored_epoch") is not None
    assert worker.finish(600) == 0, worker.failure()
    run, ref = (tmp_path / "run.json").read_text(), (tmp_path / "reference.json").read_text()
    assert _digest(run) == _digest(ref)
    assert remote.store.sizes() == {}  # nothing left over after success: no payload, no lease
    assert list(staging.iterdir()) == [] or all(
        not p.name.startswith("unified-backup-") for p in staging.iterdir()
    )


def _digest(text: str) -> str:
    import json

    return json.loads(text)["weights_sha256"]
