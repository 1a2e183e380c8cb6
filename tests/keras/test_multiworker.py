"""Multi-process TensorFlow clusters: MultiWorkerMirrored (2 workers) and ParameterServer (chief, 2
workers, 1 ps) with tf_keras, interrupted (an exception, a SIGKILL, a SIGTERM on one task) and resumed.

Every job runs in a private network namespace with only loopback (``tests.keras.cluster``), with a
hard timeout, and every task's log is in the failure message. A job that fails is restarted whole,
as a scheduler would. Under MultiWorkerMirrored two uninterrupted runs are bit-identical, and so
must be the resumed one; under ParameterServer the workers' steps interleave at random, so a
resumed run is compared with the spread of two uninterrupted runs.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.harness import can_isolate
from tests.keras.cluster import Cluster
from unified_backup import BackupDirInUseError, Slot
from unified_backup.lock import LOCK_NAME
from unified_backup.preemption import EXIT_PREEMPTED

pytestmark = [
    pytest.mark.tf_keras,
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.skipif(not can_isolate(), reason="needs a private network namespace: unshare -n (root)"),
]
MWMS = {"worker": 2}
PSS = {"chief": 1, "worker": 2, "ps": 1}
WORKERS = [("worker", 0), ("worker", 1)]
DEAD_PEER_BOUND = 60.0  # s: a worker whose peer died ends with an error within this (measured: ~10 s)


def job(out: Path, cluster: dict[str, int], *options: str, timeout: float = 150) -> Cluster:
    argv = ["tests.keras.multiworker_worker", str(out), *options]
    return Cluster(out, cluster, argv, timeout)


def run(out: Path, cluster: dict[str, int], *options: str) -> tuple[Cluster, dict[str, int]]:
    cluster_run = job(out, cluster, *options)
    return cluster_run, cluster_run.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """Each worker's report of the uninterrupted MultiWorkerMirrored run without the callback
    (reshuffled arrays; each worker's Python and NumPy generators seeded differently)."""
    out = tmp_path_factory.mktemp("mwms-reference")
    cluster, codes = run(out, MWMS, "--no-callback", "--shuffle")
    assert codes == {"worker-0": 0, "worker-1": 0}, cluster.logs()
    reports = [cluster.report(*task) for task in WORKERS]
    assert reports[0]["weights"] == reports[1]["weights"]  # replicated: the same on every worker
    assert reports[0]["draws"] != reports[1]["draws"]  # the host generators are each worker's own
    return reports


def assert_resumed_exactly(cluster: Cluster, references: list[dict], counters: list[int]) -> None:
    for task, reference in zip(WORKERS, references, strict=True):
        report = cluster.report(*task)
        assert report["draws"] == {e: reference["draws"][e] for e in report["draws"]}  # its own streams
        assert report["restored"] == counters, cluster.logs()  # every worker restored the same backup
        assert report["batch_hooks"] is True
        assert report["epochs_run"] == list(range(counters[0], 4))
        assert report["weights"] == reference["weights"]
        assert report["optimizer"] == reference["optimizer"]
        assert report["iterations"] == reference["iterations"]
        assert {e: reference["losses"][e] for e in report["losses"]} == report["losses"]
        assert report["topology"] == {
            "strategy": "MultiWorkerMirrored",
            "workers": 2,
            "replicas": 2,
            "cluster": {"worker": 2},
        }


def assert_committed_alone(backup_dir: Path) -> list[int]:
    """The committed backup is sound, and no worker's scratch folder or staging folder is left."""
    slot = Slot(backup_dir)
    manifest = slot.read_manifest()
    assert manifest is not None
    slot.verify(manifest)
    assert sorted(p.name for p in backup_dir.iterdir() if p.name.startswith("payload-")) == [manifest.payload]
    return [manifest.epoch, manifest.step_in_epoch, manifest.global_step]


def assert_a_second_job_is_refused(backup_dir: Path, owner: int) -> None:
    import tf_keras

    from keras_impl import BackupAndRestore
    from tests.conformance.keras_driver import BATCH, data

    run = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(1)])
    run.compile(optimizer="adam", loss="mse")
    x, y = data()
    with pytest.raises(BackupDirInUseError, match=f"in use by another live training.*pid {owner}"):
        run.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[BackupAndRestore(backup_dir)])


def test_uninterrupted_with_step_backups_equals_the_run_without_and_leaves_nothing(tmp_path, reference):
    backup_dir = tmp_path / "b"
    cluster, codes = run(tmp_path, MWMS, "--backup-dir", str(backup_dir), "--save-freq", "2", "--shuffle")
    assert codes == {"worker-0": 0, "worker-1": 0}, cluster.logs()
    for task in WORKERS:
        report = cluster.report(*task)
        assert report["restored"] is None and report["weights"] == reference[0]["weights"]
        assert report["optimizer"] == reference[0]["optimizer"]
    assert not backup_dir.exists()  # the chief deleted it (the scratch folders: assert_committed_alone)


@pytest.mark.parametrize(("save_freq", "counters"), [("epoch", [2, 0, 8]), ("2", [2, 2, 10])])
def test_exception_on_one_worker_ends_the_job_and_the_restart_resumes_bit_identical(
    tmp_path, reference, save_freq, counters
):
    backup_dir = tmp_path / "b"
    options = ("--backup-dir", str(backup_dir), "--save-freq", save_freq, "--shuffle")
    cluster, codes = run(tmp_path, MWMS, *options, "--raise-at", "2", "3", "--on", "worker-1")
    assert codes == {"worker-0": 1, "worker-1": 1}, cluster.logs()  # the peer of the failed one fails too
    assert "RuntimeError: interrupt on worker-1" in (tmp_path / "worker-1.log").read_text()
    assert assert_committed_alone(backup_dir) == counters
    cluster, codes = run(tmp_path, MWMS, *options)
    assert codes == {"worker-0": 0, "worker-1": 0}, cluster.logs()
    assert_resumed_exactly(cluster, reference, counters)
    assert not backup_dir.exists()


def test_with_a_chief_job_the_chief_commits_and_a_worker_failure_resumes_bit_identical(tmp_path, reference):
    """TF_CONFIG with a ``chief`` and a ``worker``: the chief is rank 0 (it locks and commits), the worker
    rank 1; the same two replicas as two ``worker`` tasks, so the same result as the reference."""
    cluster_spec = {"chief": 1, "worker": 1}
    tasks = [("chief", 0), ("worker", 0)]
    backup_dir = tmp_path / "b"
    options = ("--backup-dir", str(backup_dir), "--save-freq", "2", "--shuffle")
    cluster, codes = run(tmp_path, cluster_spec, *options, "--raise-at", "2", "3", "--on", "worker-0")
    assert codes == {"chief-0": 1, "worker-0": 1}, cluster.logs()
    assert assert_committed_alone(backup_dir) == [2, 2, 10]
    cluster, codes = run(tmp_path, cluster_spec, *options)
    assert codes == {"chief-0": 0, "worker-0": 0}, cluster.logs()
    for task in tasks:
        report = cluster.report(*task)
        assert report["restored"] == [2, 2, 10] and report["epochs_run"] == [2, 3], cluster.logs()
        for key in ("weights", "optimizer", "iterations"):
            assert report[key] == reference[0][key], key
        # both tasks have index 0, so both seed their host generators as worker 0 of the reference
        assert report["draws"] == {e: reference[0]["draws"][e] for e in report["draws"]}
        assert report["topology"]["cluster"] == cluster_spec and report["topology"]["workers"] == 2
    assert not backup_dir.exists()


def test_sigkill_of_one_worker_ends_its_peer_in_bounded_time_and_the_restart_resumes(tmp_path, reference):
    backup_dir = tmp_path / "b"
    options = ("--backup-dir", str(backup_dir), "--save-freq", "2", "--shuffle")
    cluster = job(tmp_path, MWMS, *options, "--batch-sleep", "0.3")
    slot = Slot(backup_dir)
    deadline = time.monotonic() + 120
    while not ((m := slot.read_manifest()) and m.global_step >= 6):
        assert time.monotonic() < deadline and cluster.proc.poll() is None, cluster.logs()
        time.sleep(0.05)
    assert_a_second_job_is_refused(backup_dir, cluster.pid("worker", 0))  # the chief owns the folder
    cluster.signal("worker", 1, signal.SIGKILL)
    killed = time.monotonic()
    codes = cluster.wait()
    peer_seconds = time.monotonic() - killed
    assert codes["worker-1"] == -signal.SIGKILL and codes["worker-0"] != 0, cluster.logs()
    assert peer_seconds < DEAD_PEER_BOUND, cluster.logs()
    assert (
        "unhealthy" in (tmp_path / "worker-0.log").read_text()
        or "Unavailable" in (tmp_path / "worker-0.log").read_text()
    ), cluster.logs()
    manifest = slot.read_manifest()
    slot.verify(manifest)  # intact; a scratch folder of the killed worker may be left until the restart
    counters = [manifest.epoch, manifest.step_in_epoch, manifest.global_step]
    cluster, codes = run(tmp_path, MWMS, *options)
    assert codes == {"worker-0": 0, "worker-1": 0}, cluster.logs()
    assert_resumed_exactly(cluster, reference, counters)
    assert not backup_dir.exists()
    print(f"peer ended {peer_seconds:.1f} s after the SIGKILL")


def test_sigterm_to_one_worker_stops_every_worker_at_the_same_step_with_one_backup(tmp_path, reference):
    backup_dir = tmp_path / "b"
    options = ("--backup-dir", str(backup_dir), "--shuffle")
    cluster, codes = run(
        tmp_path, MWMS, *options, "--preemption", "--sigterm-at", "1", "2", "--on", "worker-1"
    )
    assert codes == {"worker-0": EXIT_PREEMPTED, "worker-1": EXIT_PREEMPTED}, cluster.logs()
    counters = assert_committed_alone(backup_dir)
    assert counters == [1, 3, 7]  # the step in progress when the signal came: batch 2 of epoch 1, done
    assert (backup_dir / LOCK_NAME).exists()  # stopped early: the mark of a run that did not finish
    expected = "Preempted by SIGTERM (received by rank 1): backed up global step 7"
    for task in WORKERS:
        assert expected in (tmp_path / f"{task[0]}-{task[1]}.log").read_text(), cluster.logs()
    cluster, codes = run(tmp_path, MWMS, *options)
    assert codes == {"worker-0": 0, "worker-1": 0}, cluster.logs()
    assert_resumed_exactly(cluster, reference, counters)


def test_a_write_error_on_one_worker_is_agreed_by_all_and_nobody_hangs(tmp_path):
    """Worker 1 cannot write files over 64 KiB (RLIMIT_FSIZE: a real EFBIG), so its part of every backup
    fails after the collectives of the save. Every worker hears of it: with on_write_error="warn" all
    log the same skipped backup and train on; with the default, all stop with BackupWriteError."""
    backup_dir = tmp_path / "b"
    options = ("--backup-dir", str(backup_dir), "--save-freq", "4", "--hidden", "2000")
    limit = ("--file-size-limit", str(64 * 1024), "--on", "worker-1")
    cluster, codes = run(tmp_path / "warn", MWMS, *options, *limit, "--on-write-error", "warn")
    assert codes == {"worker-0": 0, "worker-1": 0}, cluster.logs()
    for task in WORKERS:
        log = (tmp_path / "warn" / f"{task[0]}-{task[1]}.log").read_text()
        assert log.count("Backup skipped: ") == 4 and "(process 1: TensorFlow could not write" in log, (
            cluster.logs()
        )
        assert "File too large" in log
    assert not backup_dir.exists()  # nothing was committed, and no scratch folder is left

    cluster, codes = run(tmp_path / "raise", MWMS, *options, *limit)
    assert codes == {"worker-0": 1, "worker-1": 1}, cluster.logs()
    for task in WORKERS:
        log = (tmp_path / "raise" / f"{task[0]}-{task[1]}.log").read_text()
        assert "BackupWriteError" in log and "(process 1: TensorFlow could not write" in log, cluster.logs()
    assert Slot(backup_dir).read_manifest() is None
    assert not [p for p in backup_dir.iterdir() if p.name.startswith("payload-")]


@pytest.mark.xfail(
    reason="keras-team/keras#20585: Keras 3's fit fails under MultiWorkerMirrored", strict=True
)
def test_stock_keras3_fit_trains_under_multi_worker_mirrored(tmp_path):
    """Upstream: when this passes, Keras 3 trains under MWMS and our refusal can be lifted."""
    cluster, codes = run(tmp_path, MWMS, "--flavour", "keras", "--no-callback")
    assert codes == {"worker-0": 0, "worker-1": 0}, cluster.logs()


def test_keras3_under_multi_worker_mirrored_is_refused_naming_the_upstream_issue(tmp_path):
    cluster, codes = run(
        tmp_path, MWMS, "--flavour", "keras", "--probe-refusal", "--backup-dir", str(tmp_path / "b")
    )
    assert codes == {"worker-0": 0, "worker-1": 0}, cluster.logs()
    for task in WORKERS:
        refusal = cluster.report(*task)["refusal"]
        assert refusal.startswith("UnsupportedEnvironmentError: BackupAndRestore for Keras 3 cannot run")
        assert "keras-team/keras#20585" in refusal and "tf_keras" in refusal
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_parameter_server_epoch_backups_and_preemption_resume_bit_identical(tmp_path):
    """One execution per epoch (``steps_per_execution`` = steps per epoch) and every batch the whole data
    set: each epoch runs on one worker in one call, so two uninterrupted runs are bit-identical and the
    resumed ones must be too. (With one step per execution, the workers' steps interleave at random and
    two uninterrupted runs differ: README, "Distributed training".)"""
    ps = ("--on", "chief-0", "--steps-per-execution", "8")
    first, codes = run(tmp_path / "first", PSS, "--no-callback", *ps)
    assert codes["chief-0"] == 0, first.logs()
    reference = first.report("chief", 0)
    second, codes = run(tmp_path / "second", PSS, "--backup-dir", str(tmp_path / "b2"), *ps)
    assert codes["chief-0"] == 0, second.logs()
    assert not (tmp_path / "b2").exists()
    assert second.report("chief", 0)["weights"] == reference["weights"]

    backup_dir = tmp_path / "b"
    options = ("--backup-dir", str(backup_dir), *ps)
    for name, fault, code in [
        ("interrupted", ("--raise-at", "2", "-1"), 1),  # an exception on the chief as epoch 2 begins
        (
            "preempted",
            ("--preemption", "--sigterm-at", "1", "-1"),
            EXIT_PREEMPTED,
        ),  # SIGTERM in epoch 1's end
    ]:
        stopped, codes = run(tmp_path / name, PSS, *options, *fault)
        assert codes["chief-0"] == code, stopped.logs()
        assert assert_committed_alone(backup_dir) == [2, 0, 16]
        if name == "preempted":
            log = (tmp_path / name / "chief-0.log").read_text()
            assert "Preempted by SIGTERM: backed up global step 16" in log, stopped.logs()
        resumed, codes = run(tmp_path / name, PSS, *options)
        assert codes["chief-0"] == 0, resumed.logs()
        report = resumed.report("chief", 0)
        assert report["restored"] == [2, 0, 16] and report["epochs_run"] == [2, 3]
        assert report["topology"]["strategy"] == "ParameterServer" and report["topology"]["cluster"] == PSS
        assert report["batch_hooks"] is False  # tf_keras allows none under PSS: epoch hooks only
        for key in ("weights", "optimizer", "iterations"):
            assert report[key] == reference[key], key
        assert not backup_dir.exists()


def test_parameter_server_refuses_step_backups(tmp_path):
    options = ("--backup-dir", str(tmp_path / "b"), "--save-freq", "2", "--on", "chief-0")
    cluster, codes = run(tmp_path, PSS, *options)
    assert codes["chief-0"] == 1, cluster.logs()
    log = (tmp_path / "chief-0.log").read_text()
    assert "InvalidArgumentError: save_freq must be 'epoch' (or False) under ParameterServerStrategy" in log
    assert not (tmp_path / "b" / "manifest.json").exists()
