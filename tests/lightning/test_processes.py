"""BackupAndRestore across real processes: Ctrl-C, SIGKILL, preemption signals, a missing framework, DDP."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.faults import fill, tmpfs
from tests.harness import Worker, can_isolate
from tests.lightning.helpers import NAMESPACES, fit, new_model, stand_in_scontrol
from unified_backup import Slot
from unified_backup.lock import LOCK_NAME
from unified_backup.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.lightning
ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` from the repository root in its own process group; SIGKILL the whole group at the end."""
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv} ran past {timeout} s:\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Lightning's launcher may leave a rank behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


CTRL_C = textwrap.dedent(
    """
    import sys
    from tests.lightning.helpers import fit, new_model
    fit(new_model(), sys.argv[1], epochs=3, interrupt=(1, 2), exc=KeyboardInterrupt)
    print("fit returned", flush=True)
    """
)


def test_ctrl_c_keeps_the_backup(tmp_path):
    backup_dir = tmp_path / "b"
    result = run([sys.executable, "-c", CTRL_C, str(backup_dir)], timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]  # Lightning turns KeyboardInterrupt into sys.exit(1)
    assert "Detected KeyboardInterrupt" in result.stderr and "fit returned" not in result.stdout
    slot = Slot(backup_dir)
    manifest = slot.read_manifest()
    assert manifest is not None and (manifest.epoch, manifest.global_step) == (1, 8)
    slot.verify(manifest)
    assert (backup_dir / LOCK_NAME).exists()  # the mark of a run that did not finish, as in Keras


@pytest.mark.parametrize(
    ("module", "hidden"), [("lightning_impl", "lightning"), ("lightning_impl.pl", "pytorch_lightning")]
)
def test_missing_framework_names_the_extra_to_install(module, hidden):
    code = f"import sys; sys.modules[{hidden!r}] = None; import {module}"
    result = run([sys.executable, "-c", code], timeout=120)
    assert result.returncode != 0
    assert "MissingFrameworkError" in result.stderr
    assert "pip install 'unified-backup[lightning]'" in result.stderr


def ddp(
    out: Path, *args: str, exit_code: int = 0, reports: int = 2, namespace: str = "lightning.pytorch"
) -> list[dict]:
    """One 2-process DDP fit (gloo on 127.0.0.1) in a private network namespace; each rank's report.

    ``exit_code``: what rank 0's process (Lightning's launcher) must exit with. ``reports``: how many
    rank reports must be there (under ddp_spawn/ddp_fork a failing rank may take the other down first).
    """
    result = run(ddp_argv(out, *args, namespace=namespace), timeout=180)
    found = [
        json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()
    ]
    assert len(found) >= reports, f"exit {result.returncode}:\n{result.stderr[-4000:]}"
    assert result.returncode == exit_code, result.stderr[-4000:]
    return found


def ddp_argv(out: Path, *args: str, namespace: str = "lightning.pytorch") -> list[str]:
    """argv of one DDP job; with ``--num-nodes 2`` in ``args``, two "nodes" (one process each, NODE_RANK
    0 and 1) in one private network namespace, exiting with node 0's code once both ended."""
    args = (*args, "--namespace", namespace)
    if "--srun" in args:  # as srun starts them: each rank its own process, its rank in SLURM's variables
        at = args.index("--srun")
        path, args = args[at + 1], (*args[:at], *args[at + 2 :])
        worker = [sys.executable, "-m", "tests.lightning.ddp_worker", str(out), *args]
        slurm = " ".join(f"{name}={value}" for name, value in SRUN.items())
        script = (
            "ip link set lo up && export MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 "
            f'PATH="{path}:$PATH" {slurm} && '
            '{ SLURM_PROCID=1 SLURM_LOCALID=1 "$@" & } && SLURM_PROCID=0 SLURM_LOCALID=0 "$@"; '
            "code=$?; wait; exit $code"
        )
        return ["unshare", "-n", "sh", "-c", script, "_", *worker]
    if "--num-nodes" in args:
        worker = [sys.executable, "-m", "tests.lightning.ddp_worker", str(out), *args]
        script = (
            "ip link set lo up && export MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 && "
            '{ NODE_RANK=1 "$@" & } && NODE_RANK=0 "$@"; code=$?; wait; exit $code'
        )
        return ["unshare", "-n", "sh", "-c", script, "_", *worker]
    return [
        "unshare",
        "-n",
        "sh",
        "-c",
        'ip link set lo up && exec "$@"',
        "_",
        "env",
        "MASTER_ADDR=127.0.0.1",
        "MASTER_PORT=29511",
        sys.executable,
        "-m",
        "tests.lightning.ddp_worker",
        str(out),
        *args,
    ]


SRUN = {  # what srun sets for the 2 tasks of batch job 4242 on one node (and SLURM_PROCID, SLURM_LOCALID)
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
}  # fmt: skip


def counters(slot: Slot) -> tuple[int, int, int]:
    manifest = slot.read_manifest()
    assert manifest is not None
    return manifest.epoch, manifest.step_in_epoch, manifest.global_step


def assert_resumed_to_the_end(
    resumed: list[dict], reference: list[dict], backup_dir: Path, restored: tuple[int, int]
) -> None:
    """Every rank restored the backup of ``restored`` (epochs done, global step), trained to the end
    of the 3 epochs with no error and holds the uninterrupted run's weights; the backup is deleted."""
    for rank in resumed:
        assert rank["error"] is None and (rank["restored_epoch"], rank["start_step"]) == restored
        assert rank["global_step"] == 12 and rank["weights"] == reference[0]["weights"]
    assert not backup_dir.exists()


def demo(backup_dir: Path, out: Path, batch_sleep: float, save_freq: str = "5", *more: str) -> list[str]:
    """The demo worker's argv: 3 epochs, reshuffled data and dropout (an exact resume must restore both)."""
    options = ["--epochs", "3", "--batch-sleep", str(batch_sleep), "--save-freq", save_freq, *more]
    argv = [sys.executable, "-m", "lightning_impl.demo", "--backup-dir", str(backup_dir), "--out", str(out)]
    return [*argv, *options, "--shuffle", "--dropout", "0.2"]


@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The final weights of the uninterrupted demo run (backups never change them, whatever save_freq)."""
    root = tmp_path_factory.mktemp("demo-reference")
    reference = Worker(demo(root / "b", root / "out.json", 0.0))
    assert reference.finish(120) == 0, reference.failure()
    return json.loads((root / "out.json").read_text())["weights"]


def test_sigkill_mid_epoch_with_shuffle_and_dropout_resumes_bit_identical(tmp_path, demo_reference):
    backup_dir = tmp_path / "b"
    victim = Worker(demo(backup_dir, tmp_path / "out.json", 0.05))
    try:
        assert victim.wait_event("start", 120) is not None, victim.failure()
        slot = Slot(backup_dir)
        while victim.proc.poll() is None and not ((m := slot.read_manifest()) and m.global_step >= 10):
            victim.wait_event("never", 0.02)  # until the backup of step 10 (batch 9 of epoch 0) is committed
        victim.wait_event("never", 0.12)  # then a little further, to land inside a later step
    finally:
        victim.kill()
    assert victim.proc.returncode == -signal.SIGKILL
    manifest = slot.read_manifest()
    assert manifest is not None and manifest.step_in_epoch > 0, manifest  # killed after a mid-epoch backup
    survivor = Worker(demo(backup_dir, tmp_path / "out.json", 0.0))
    assert survivor.finish(120) == 0, survivor.failure()
    start = survivor.wait_event("start", 0)
    assert (start["restored_epoch"], start["global_step"]) == (manifest.epoch, manifest.global_step)
    assert "cannot be positioned" not in "".join(survivor.stderr)
    assert json.loads((tmp_path / "out.json").read_text())["weights"] == demo_reference
    assert not backup_dir.exists()


def preempted_line(worker: Worker, signal_name: str, manifest, backup_dir: Path) -> None:
    """Assert that the worker logged exactly one preemption line, naming the signal, the step and more."""
    expected = (
        f"WARNING unified_backup.lifecycle: Preempted by {signal_name}: backed up global step "
        f"{manifest.global_step} ({manifest.epoch} epoch(s) done, {manifest.step_in_epoch} step(s) into the "
        f"next) to {backup_dir} and stopped training; exit code 143 (TrainingPreempted). Run the same "
        "training again to resume from there.\n"
    )
    deadline = time.monotonic() + 5  # the reader thread may still be reading the last lines
    while expected not in worker.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [line for line in worker.stderr if "Preempted" in line] == [expected], worker.failure()


def test_preemption_signals_back_up_the_step_exit_143_and_the_resumes_end_bit_identical(
    tmp_path, demo_reference
):
    backup_dir, out = tmp_path / "b", tmp_path / "out.json"
    slot = Slot(backup_dir)

    def run_until(event: str, sig: signal.Signals, *preemption: str) -> tuple[Worker, int | None]:
        worker = Worker(demo(backup_dir, out, 0.05, "epoch", "--save-before-preemption", *preemption))
        try:
            assert worker.wait_event(event, 120) is not None, worker.failure()
            worker.wait_event("never", 0.2)  # into the next steps
            worker.proc.send_signal(sig)
            return worker, worker.finish(60)
        finally:
            if worker.proc.poll() is None:
                worker.kill()

    # SIGUSR1, listed: the step in progress is finished and backed up, nothing more runs
    first, code = run_until("epoch", signal.SIGUSR1, "SIGTERM", "SIGUSR1")
    assert code == EXIT_PREEMPTED, first.failure()
    stopped = slot.read_manifest()
    assert stopped.epoch == 1 and stopped.step_in_epoch > 0, stopped  # the step, not the epoch's backup
    slot.verify(stopped)
    assert (backup_dir / LOCK_NAME).exists()  # stopped early: the mark stays
    preempted_line(first, "SIGUSR1", stopped, backup_dir)

    # SIGTERM (save_before_preemption=True): resumes where the first run stopped, and stops again
    second, code = run_until("start", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, second.failure()
    assert second.wait_event("start", 0)["global_step"] == stopped.global_step
    again = slot.read_manifest()
    assert again.global_step > stopped.global_step and again.step_in_epoch > 0, again
    preempted_line(second, "SIGTERM", again, backup_dir)

    # SIGUSR1, not listed this time: its default action kills the process; the backup stays
    third, code = run_until("start", signal.SIGUSR1)
    assert code == -signal.SIGUSR1, third.failure()
    assert not [line for line in third.stderr if "Preempted" in line]
    slot.verify(slot.read_manifest())

    last = Worker(demo(backup_dir, out, 0.0, "epoch"))
    assert last.finish(120) == 0, last.failure()
    assert json.loads(out.read_text())["weights"] == demo_reference  # nothing doubled, nothing skipped
    assert not backup_dir.exists()


def multiprocess(test: Any) -> Any:
    """Marks of a test that runs a cluster of processes (see README, "Tests")."""
    for mark in (
        pytest.mark.slow,
        pytest.mark.multiprocess,
        pytest.mark.skipif(not can_isolate(), reason="needs a private network namespace: unshare -n (root)"),
    ):
        test = mark(test)
    return test


@pytest.fixture(params=sorted(NAMESPACES))
def job(request: pytest.FixtureRequest) -> Any:
    """``ddp`` in one Lightning namespace: every multi-process scenario runs in both."""
    return functools.partial(ddp, namespace=request.param)


@multiprocess
def test_ddp_interrupted_then_preempted_on_one_rank_then_resumed_matches_uninterrupted_ddp(job, tmp_path):
    # dropout and DistributedSampler shuffling, each rank seeded apart: the resume must restore both ranks
    reference = job(tmp_path / "reference", "--exact")
    assert reference[0]["weights"] == reference[1]["weights"]
    assert reference[0]["global_step"] == 12  # 64 samples over 2 ranks, batch 8: 4 steps per epoch

    backup_dir = tmp_path / "b"
    options = ("--exact", "--save-freq", "3", "--backup-dir", str(backup_dir))
    interrupted = job(tmp_path / "interrupted", *options, "--interrupt", "1,3", exit_code=3)
    assert [r["error"] for r in interrupted] == ["interrupt", "interrupt"]
    manifest = Slot(backup_dir).read_manifest()
    assert (manifest.epoch, manifest.step_in_epoch, manifest.global_step) == (1, 2, 6)
    # exactly one process committed: one payload folder, no scratch folder of rank 1 left behind
    assert sorted(p.name for p in backup_dir.iterdir() if p.is_dir()) == [manifest.payload]
    assert sorted(manifest.files) == ["state.ckpt"]

    # SIGTERM reaches rank 1 only (Lightning alone: rank 1 stops after its batch, rank 0 fails in its next
    # collective): both ranks back up global step 10 (a step backup was at 9) and stop there
    preempted = job(
        tmp_path / "preempted", *options, "--seed", "1", "--sigterm", "1,2,1", exit_code=EXIT_PREEMPTED
    )
    for rank in preempted:
        assert (rank["restored_epoch"], rank["start_step"]) == (1, 6)  # every rank restored the same backup
        assert rank["seen"][0] == [1, 2]
        assert (rank["error"], rank["global_step"], rank["seen"][-1]) == ("preempted", 10, [2, 1])
    assert counters(Slot(backup_dir)) == (2, 2, 10)
    assert preempted[0]["message"].startswith(
        "Preempted by SIGTERM (received by rank 1): backed up global step 10 "
    )

    resumed = job(tmp_path / "resumed", *options, "--seed", "2")
    assert_resumed_to_the_end(resumed, reference, backup_dir, restored=(2, 10))
    assert all(rank["seen"][0] == [2, 2] for rank in resumed)


@multiprocess
def test_ddp_with_keep_previous_every_rank_falls_back_to_the_previous_backup(job, tmp_path):
    """Only rank 0 verifies, chooses and promotes; rank 1 restores what rank 0 broadcast."""
    reference = job(tmp_path / "reference", "--exact")
    backup_dir = tmp_path / "b"
    options = ("--exact", "--save-freq", "3", "--backup-dir", str(backup_dir), "--keep-previous")
    job(tmp_path / "interrupted", *options, "--interrupt", "1,3", exit_code=3)
    slot = Slot(backup_dir)
    newest, previous = slot.read_manifest(), slot.read_previous()
    assert (newest.global_step, previous.global_step) == (6, 3)
    (slot.payload_dir(newest) / "state.ckpt").write_bytes(b"damaged")

    resumed = job(tmp_path / "resumed", *options, "--seed", "2")
    assert_resumed_to_the_end(resumed, reference, backup_dir, restored=(0, 3))


@multiprocess
def test_ddp_sigterm_to_rank_0_only_stops_every_rank_at_one_step_and_resumes_exactly(job, tmp_path):
    reference = job(tmp_path / "reference", "--exact")
    backup_dir = tmp_path / "b"
    options = ("--exact", "--save-freq", "3", "--backup-dir", str(backup_dir))
    preempted = job(tmp_path / "preempted", *options, "--sigterm", "0,1,2", exit_code=EXIT_PREEMPTED)
    for rank in preempted:  # step 7 is no step-backup point (3, 6, 9): the backup is the preemption's
        assert (rank["error"], rank["global_step"], rank["seen"][-1]) == ("preempted", 7, [1, 2])
    message = preempted[0]["message"]
    assert message.startswith("Preempted by SIGTERM (received by rank 0): backed up global step 7 ")
    assert counters(Slot(backup_dir)) == (1, 3, 7)

    resumed = job(tmp_path / "resumed", *options, "--seed", "2")
    assert_resumed_to_the_end(resumed, reference, backup_dir, restored=(1, 7))


@multiprocess
def test_ddp_started_by_srun_backs_up_on_the_requeue_signal_requeues_once_and_resumes_exactly(job, tmp_path):
    """DDP on SLURM as srun starts it (Lightning launches nothing; ranks from SLURM's variables), with
    auto-requeue on: SIGUSR1 to rank 1 backs up the next step on every rank, then global rank 0 runs
    Lightning's requeue once (a stand-in scontrol); the requeued run resumes bit for bit."""
    reference = job(tmp_path / "reference", "--exact")
    calls = stand_in_scontrol(tmp_path / "bin")
    backup_dir = tmp_path / "b"
    options = (
        "--srun",
        str(tmp_path / "bin"),
        "--exact",
        "--save-freq",
        "3",
        "--backup-dir",
        str(backup_dir),
    )
    requeued = tmp_path / "requeued"
    preempted = job(requeued, *options, "--sigterm", "1,2,1", "--signal", "SIGUSR1", exit_code=EXIT_PREEMPTED)
    for rank in preempted:
        assert (rank["error"], rank["global_step"], rank["seen"][-1]) == ("preempted", 10, [2, 1])
    assert preempted[0]["message"].startswith(
        "Preempted by SIGUSR1 (received by rank 1): backed up global step 10 "
    )
    assert calls.read_text() == "requeue 4242\n"  # once, by global rank 0, after the commit
    assert counters(Slot(backup_dir)) == (2, 2, 10) and not list(requeued.glob("**/hpc_ckpt_*"))

    resumed = job(tmp_path / "resumed", *options, "--seed", "2")
    assert_resumed_to_the_end(resumed, reference, backup_dir, restored=(2, 10))
    assert calls.read_text() == "requeue 4242\n"


def kill_once_committed(slot: Slot, step: int, out: Path, *args: str, namespace: str) -> None:
    """Run a job (0.3 s per batch) and SIGKILL all of it once the backup of global ``step`` is committed."""
    argv = ddp_argv(out, *args, "--batch-sleep", "0.3", namespace=namespace)
    log_path = out.with_suffix(".log")
    with log_path.open("w") as log:
        running = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 120
            while counters(slot)[2] < step and running.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.pid, signal.SIGKILL)
            running.wait()
    assert running.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]


@multiprocess
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_spawn_and_fork_launchers_resume_an_exception_a_kill_and_a_preemption_bit_identical(
    job, tmp_path, strategy
):
    """ddp_spawn and ddp_fork run ``fit`` in child processes of the launcher (the callback is pickled
    or forked there): an exception on every rank, a SIGKILL of the whole job and SIGTERM to rank 1
    alone, each resumed by the next run, end on the uninterrupted run's weights."""
    launcher = ("--strategy", strategy)
    reference = job(tmp_path / "reference", *launcher, "--exact")
    assert reference[0]["weights"] == reference[1]["weights"] and reference[0]["global_step"] == 12
    backup_dir = tmp_path / "b"
    options = (*launcher, "--exact", "--save-freq", "3", "--backup-dir", str(backup_dir))
    slot = Slot(backup_dir)

    # an exception on every rank before batch 3 of epoch 1 (step 7): the backup of step 6 stays
    job(tmp_path / "interrupted", *options, "--interrupt", "1,3", exit_code=3, reports=0)
    assert counters(slot) == (1, 2, 6)

    # SIGKILL of the whole job (launcher and ranks) once the backup of step 9 is committed
    kill_once_committed(slot, 9, tmp_path / "killed", *options, "--seed", "1", **job.keywords)
    assert counters(slot) == (2, 1, 9)
    slot.verify(slot.read_manifest())

    # SIGTERM to rank 1 only, after batch 1 of epoch 2: every rank backs up step 10 and stops there
    job(tmp_path / "preempted", *options, "--seed", "2", "--sigterm", "1,2,1", exit_code=3, reports=0)
    assert counters(slot) == (2, 2, 10)

    resumed = job(tmp_path / "resumed", *options, "--seed", "3")
    assert_resumed_to_the_end(resumed, reference, backup_dir, restored=(2, 10))
    assert all(rank["seen"][0] == [2, 2] for rank in resumed)


@multiprocess
def test_two_nodes_commit_once_restore_the_same_backup_and_resume_bit_identical(job, tmp_path):
    """num_nodes=2 as Lightning runs it: one process per node, NODE_RANK and the master's address from
    the environment, both nodes on loopback and on one backup_dir (a filesystem every node sees)."""
    nodes = ("--num-nodes", "2")
    reference = job(tmp_path / "reference", *nodes, "--exact")
    assert reference[0]["weights"] == reference[1]["weights"] and reference[0]["global_step"] == 12
    backup_dir = tmp_path / "b"
    options = (*nodes, "--exact", "--save-freq", "3", "--backup-dir", str(backup_dir))
    interrupted = job(tmp_path / "interrupted", *options, "--interrupt", "1,3", exit_code=3)
    assert [rank["error"] for rank in interrupted] == ["interrupt", "interrupt"]
    slot = Slot(backup_dir)
    assert counters(slot) == (1, 2, 6)
    manifest = slot.read_manifest()
    assert sorted(p.name for p in backup_dir.iterdir() if p.is_dir()) == [manifest.payload]  # one commit

    # SIGTERM to the process of node 1 only: both nodes back up step 10 and stop
    preempted = job(
        tmp_path / "preempted", *options, "--seed", "1", "--sigterm", "1,2,1", exit_code=EXIT_PREEMPTED
    )
    for rank in preempted:
        assert (rank["restored_epoch"], rank["start_step"]) == (1, 6)
        assert (rank["error"], rank["global_step"]) == ("preempted", 10)
    assert counters(slot) == (2, 2, 10)

    resumed = job(tmp_path / "resumed", *options, "--seed", "2")
    assert_resumed_to_the_end(resumed, reference, backup_dir, restored=(2, 10))


@multiprocess
def test_a_ddp_backup_restores_in_one_process_with_a_warning_naming_both_shapes(job, tmp_path, caplog):
    """Replicated state (DDP) restores on another world size; what is split per rank is named as not exact."""
    backup_dir = tmp_path / "b"
    job(
        tmp_path / "interrupted",
        "--save-freq",
        "3",
        "--backup-dir",
        str(backup_dir),
        "--interrupt",
        "1,3",
        exit_code=3,
    )
    manifest = Slot(backup_dir).read_manifest()
    topology = {"strategy": "DDP", "workers": 2, "replicas": 2, "nodes": 1, "layout": "replicated"}
    assert dict(manifest.topology) == topology
    with caplog.at_level(logging.WARNING, logger="unified_backup"):
        namespace = job.keywords["namespace"]
        result = fit(new_model(namespace, seed=5), backup_dir, epochs=3, save_freq=3, namespace=namespace)
    assert result.error is None and result.backup.restored.global_step == 6
    warnings = [r.getMessage() for r in caplog.records if "another shape" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert (
        "(layout=replicated, nodes=1, replicas=2, strategy=DDP, workers=2) than this one "
        "(layout=replicated, nodes=1, replicas=1, " in warnings[0]
    )


SHARDED = ("--strategy", "model_parallel", "--exact")  # FSDP2 over both processes, dropout, shuffled data


@multiprocess
def test_fsdp2_shards_commit_once_are_verified_before_any_rank_loads_and_resume_bit_identical(job, tmp_path):
    """ModelParallelStrategy with FSDP2: every rank writes its own shards into the one staging folder,
    the manifest lists each with its checksum, a damaged shard is refused on every rank before any
    rank loads, and an exception, a SIGKILL of the job and SIGTERM to rank 1, each resumed by the
    next run, end on the uninterrupted run's shards, bit for bit on each rank."""
    reference = job(tmp_path / "reference", *SHARDED)
    assert reference[0]["shards"] != reference[1]["shards"] and reference[0]["global_step"] == 12
    backup_dir = tmp_path / "b"
    options = (*SHARDED, "--save-freq", "3", "--backup-dir", str(backup_dir))
    slot = Slot(backup_dir)

    interrupted = job(tmp_path / "interrupted", *options, "--interrupt", "1,3", exit_code=3)
    assert [rank["error"] for rank in interrupted] == ["interrupt", "interrupt"]
    assert counters(slot) == (1, 2, 6)
    manifest = slot.read_manifest()
    shards = ["state/__0_0.distcp", "state/__1_0.distcp"]  # rank 0's and rank 1's
    assert sorted(manifest.files) == ["state/.metadata", *shards, "state/meta.pt"]
    assert all(len(manifest.files[name].checksum) == 64 for name in shards)
    assert sorted(p.name for p in backup_dir.iterdir() if p.is_dir()) == [manifest.payload]  # one folder
    topology = {"strategy": "ModelParallel", "workers": 2, "replicas": 2, "nodes": 1, "layout": "sharded"}
    assert dict(manifest.topology) == topology

    # rank 1's shard damaged (in a copy): refused on every rank before any rank loads; left as it was
    damaged = tmp_path / "damaged"
    shutil.copytree(backup_dir, damaged)
    shard = damaged / manifest.payload / shards[1]
    flipped = bytearray(shard.read_bytes())
    flipped[len(flipped) // 2] ^= 1
    shard.write_bytes(bytes(flipped))
    refused = job(tmp_path / "refused", *SHARDED, "--backup-dir", str(damaged), exit_code=3)
    for rank in refused:
        assert (
            rank["error"].startswith("CorruptBackupError: ")
            and "__1_0.distcp fails its sha256" in rank["error"]
        )
        assert "start_step" not in rank and "loads" not in rank  # never loaded, never trained
    assert shard.read_bytes() == bytes(flipped) and (damaged / "manifest.json").exists()
    user_checkpoint = tmp_path / "user.ckpt"  # a Lightning checkpoint of step 6, for fit(ckpt_path=...)
    shutil.copytree(slot.payload_dir(manifest) / "state", user_checkpoint)

    kill_once_committed(slot, 9, tmp_path / "killed", *options, "--seed", "1", **job.keywords)
    assert counters(slot) == (2, 1, 9)
    slot.verify(slot.read_manifest())

    preempted = job(
        tmp_path / "preempted", *options, "--seed", "2", "--sigterm", "1,2,1", exit_code=EXIT_PREEMPTED
    )
    for rank in preempted:
        assert (rank["restored_epoch"], rank["start_step"]) == (2, 9)  # every rank restored the same shards
        assert (rank["error"], rank["global_step"]) == ("preempted", 10)
    assert counters(slot) == (2, 2, 10)

    # the backup is restored once, and Lightning's own load after setup does not follow with ckpt_path's
    resumed = job(tmp_path / "resumed", *options, "--seed", "3", "--ckpt-path", str(user_checkpoint))
    for rank, uninterrupted in zip(resumed, reference, strict=True):
        assert rank["error"] is None and (rank["restored_epoch"], rank["start_step"]) == (2, 10)
        assert rank["loads"] == 1
        assert rank["global_step"] == 12 and rank["shards"] == uninterrupted["shards"]
    assert not backup_dir.exists()


@multiprocess
def test_fsdp2_shards_of_two_processes_are_resharded_for_one_with_a_warning(job, tmp_path):
    """A world-size change: the 2-process backup loads in one process, every tensor whole and equal to
    the two shards at the backup, with the warning that names both shapes; then training goes on."""
    backup_dir = tmp_path / "b"
    options = (*SHARDED, "--save-freq", "1", "--backup-dir", str(backup_dir))
    interrupted = job(tmp_path / "interrupted", *options, "--interrupt", "1,2", exit_code=3)
    assert counters(Slot(backup_dir)) == (1, 2, 6)  # the backup of the step the ranks stopped after

    result = run(ddp_argv(tmp_path / "one", *options, "--devices", "1", **job.keywords), timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert (one["error"], one["restored_epoch"], one["start_step"]) == (None, 1, 6)
    for i, whole in enumerate(one["start_weights"]):
        whole = np.asarray(whole, dtype=np.float32)
        rows = [
            np.asarray(rank["shards"][i], dtype=np.float32).reshape(-1, *whole.shape[1:])
            for rank in interrupted
        ]
        np.testing.assert_array_equal(np.concatenate(rows), whole)  # FSDP2 shards by rows
    assert (
        "made by a job of another shape (layout=sharded, nodes=1, replicas=2, strategy=ModelParallel, "
        "workers=2) than this one (layout=sharded, nodes=1, replicas=1, strategy=ModelParallel, workers=1)"
    ) in " ".join(result.stderr.split())
    assert not backup_dir.exists()


@multiprocess
def test_a_backup_of_the_other_layout_is_refused_on_every_rank_and_left_intact(tmp_path):
    """Replicated state (DDP) is not loaded by a sharded strategy, nor sharded state by DDP."""
    for made, loads in (((), SHARDED[:2]), (SHARDED[:2], ())):  # the same model: equal fingerprints
        backup_dir = tmp_path / f"b{len(made)}"
        ddp(
            tmp_path / f"made{len(made)}",
            *made,
            "--backup-dir",
            str(backup_dir),
            "--interrupt",
            "1,0",
            exit_code=3,
        )
        committed = (backup_dir / "manifest.json").read_bytes()
        refused = ddp(tmp_path / f"refused{len(made)}", *loads, "--backup-dir", str(backup_dir), exit_code=3)
        for rank in refused:
            assert (
                rank["error"].startswith("IncompatibleBackupError: ")
                and "nothing was loaded" in rank["error"]
            )
        assert (backup_dir / "manifest.json").read_bytes() == committed
        Slot(backup_dir).verify(Slot(backup_dir).read_manifest())


@multiprocess
def test_a_full_disk_during_a_sharded_backup_is_a_write_error_on_every_rank(tmp_path):
    """The shards of a failed backup never replace the committed ones; on_write_error='warn' trains on."""
    with tmpfs(tmp_path / "mnt", "4m") as mount:
        backup_dir = mount / "b"
        options = (*SHARDED, "--save-freq", "3", "--backup-dir", str(backup_dir))
        ddp(tmp_path / "interrupted", *options, "--interrupt", "1,3", exit_code=3)
        slot = Slot(backup_dir)
        before = slot.read_manifest()
        fill(mount)

        stopped = ddp(tmp_path / "stopped", *options, "--seed", "1", exit_code=3)
        for rank in stopped:
            assert (
                rank["error"].startswith("BackupWriteError: ") and "No space left on device" in rank["error"]
            )
            assert "still committed and intact" in rank["error"] and rank["global_step"] == 9
        assert slot.read_manifest() == before
        slot.verify(before)

        warned = tmp_path / "warned"
        result = run(ddp_argv(warned, *options, "--seed", "2", "--on-write-error", "warn"), timeout=180)
        assert result.returncode == 0, result.stderr[-4000:]
        assert result.stderr.count("Backup skipped") >= 2  # steps 9 and 12 (or the epoch end), rank 0's log
        for r in range(2):
            rank = json.loads((warned / f"rank{r}.json").read_text())
            assert (rank["error"], rank["restored_epoch"], rank["global_step"]) == (None, 1, 12)
        assert not backup_dir.exists()  # fit ended well: deleted
