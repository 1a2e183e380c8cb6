"""save_before_preemption on a real Trainer: real signals sent to this process, at chosen batches.

The process-level tests (exit code 143, SIGUSR1, the default action of a signal not listed, DDP)
are in test_processes.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest

import lightning_impl
import lightning_impl.pl
from tests.lightning.helpers import (
    NAMESPACES,
    assert_same_weights,
    fit,
    new_model,
    stand_in_scontrol,
    weights,
)
from tests.lock_probe import lock_is_free
from unified_backup import Slot, UnsupportedEnvironmentError
from unified_backup.lock import LOCK_NAME
from unified_backup.preemption import EXIT_PREEMPTED, PreemptionWatch, TrainingPreempted

pytestmark = pytest.mark.lightning

PREEMPTED = {"lightning.pytorch": lightning_impl.Preempted, "pytorch_lightning": lightning_impl.pl.Preempted}


def sender(
    namespace: str, at: tuple[int, int], sig: signal.Signals = signal.SIGTERM, hook: str = "batch"
) -> Any:
    """A callback that sends ``sig`` to this process after batch ``at[1]`` of epoch ``at[0]``.

    ``hook="train_start"``: in ``on_train_start`` instead (Lightning's handler is installed by then).
    """
    ns = NAMESPACES[namespace][0]

    class Send(ns.Callback):  # type: ignore[name-defined, misc]
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if hook == "train_start":
                os.kill(os.getpid(), sig)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
        ) -> None:
            if hook == "batch" and (trainer.current_epoch, idx) == at:
                os.kill(os.getpid(), sig)

    return Send()


CASES = {
    # name: (sender placed after ours, where it sends, extra fit arguments, expected backup counters)
    "mid-epoch": (False, (1, 3), {}, (1, 4, 12)),
    # after our check of batch 3: Lightning's own check at the end of that batch would stop it there,
    # with no backup; ours stops at the next boundary instead, with one
    "after-our-check": (True, (1, 3), {}, (1, 5, 13)),
    "last-batch": (False, (1, 7), {}, (2, 0, 16)),  # the boundary is the epoch's close
    "validation-follows": (False, (1, 3), {"validate": True, "val_check_interval": 0.5}, (1, 4, 12)),
    "accumulating": (False, (1, 0), {"accumulate_grad_batches": 2}, (1, 1, 5)),  # batch 0 steps nothing
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_signal_backs_up_the_step_stops_and_the_resume_is_exact(case, tmp_path, caplog):
    after, at, kwargs, expected = CASES[case]
    model_kwargs = {"validate": kwargs.pop("validate", False), "dropout": 0.2, "shuffle": True}
    namespace = "pytorch_lightning" if case == "mid-epoch" else "lightning.pytorch"
    reference = new_model(namespace, **model_kwargs)
    assert fit(reference, None, epochs=3, namespace=namespace, **kwargs).error is None

    backup_dir = tmp_path / "b"
    backup = NAMESPACES[namespace][1](backup_dir, save_before_preemption=True)
    callbacks = [backup, sender(namespace, at)]
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        first = fit(
            new_model(namespace, **model_kwargs),
            None,
            epochs=3,
            namespace=namespace,
            callbacks=callbacks if after else callbacks[::-1],
            **kwargs,
        )
    error = first.error
    assert isinstance(error, PREEMPTED[namespace]) and isinstance(error, TrainingPreempted), repr(error)
    assert isinstance(error, NAMESPACES[namespace][0].utilities.exceptions.SIGTERMException)
    assert error.code == EXIT_PREEMPTED == 143
    manifest = Slot(backup_dir).read_manifest()
    assert (manifest.epoch, manifest.step_in_epoch, manifest.global_step) == expected
    assert first.trainer.global_step == expected[2]  # no further step ran
    assert signal.getsignal(signal.SIGTERM) == before and lock_is_free(backup_dir)
    assert (backup_dir / LOCK_NAME).exists()  # stopped early: the mark of a run that did not finish
    e, s, g = expected
    line = (
        f"Preempted by SIGTERM: backed up global step {g} ({e} epoch(s) done, {s} step(s) into the next) "
        f"to {backup_dir} and stopped training; exit code 143 (TrainingPreempted). Run the same training "
        "again to resume from there."
    )
    records = [r for r in caplog.records if r.name.startswith(("lightning_impl", "unified_backup"))]
    assert [r.getMessage() for r in records] == [line]
    assert str(error) == line

    resumed = new_model(namespace, seed=1, **model_kwargs)
    result = fit(resumed, backup_dir, epochs=3, namespace=namespace, **kwargs)
    assert result.error is None and result.backup.restored.global_step == expected[2]
    assert_same_weights(weights(resumed), weights(reference))
    assert not backup_dir.exists()


def test_sigterm_recorded_by_lightning_before_training_starts_still_stops_with_a_backup(tmp_path):
    # Sent in on_train_start by a callback before ours: Lightning's handler records it; alone, Lightning
    # would stop after the first batch with SIGTERMException (exit code 0) and save nothing.
    backup = lightning_impl.BackupAndRestore(tmp_path / "b", save_before_preemption=True)
    send = sender("lightning.pytorch", (0, 0), hook="train_start")
    result = fit(new_model(), None, epochs=2, callbacks=[send], backup=backup)
    assert isinstance(result.error, lightning_impl.Preempted), repr(result.error)
    manifest = Slot(tmp_path / "b").read_manifest()
    assert (manifest.epoch, manifest.step_in_epoch, manifest.global_step) == (0, 1, 1)
    assert result.trainer.received_sigterm is False  # taken over from Lightning


def test_handlers_chain_the_users_during_training_and_are_restored_after_every_kind_of_end(tmp_path):
    calls: list[int] = []

    def users(signum: int, frame: Any) -> None:
        calls.append(signum)

    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
            seen.setdefault("during", (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)))

    previous = {sig: signal.signal(sig, users) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        listed = ["SIGTERM", "SIGUSR1"]
        backup = lightning_impl.BackupAndRestore(tmp_path / "b", save_before_preemption=listed)
        assert fit(new_model(), None, epochs=1, backup=backup, callbacks=[Probe()]).error is None
        # ours, not Lightning's (which Lightning installs for SIGTERM after on_fit_start)
        assert all(isinstance(getattr(h, "__self__", None), PreemptionWatch) for h in seen["during"])
        interrupted = fit(new_model(), None, epochs=2, backup=backup, interrupt=(1, 1))
        assert isinstance(interrupted.error, RuntimeError)
        assert signal.getsignal(signal.SIGTERM) is users and signal.getsignal(signal.SIGUSR1) is users
        send = sender("lightning.pytorch", (1, 2), signal.SIGUSR1)
        preempted = fit(new_model(), None, epochs=2, backup=backup, callbacks=[send])
        assert isinstance(preempted.error, TrainingPreempted) and "SIGUSR1" in str(preempted.error)
        assert calls == [signal.SIGUSR1]  # the user's handler ran too
        assert signal.getsignal(signal.SIGTERM) is users and signal.getsignal(signal.SIGUSR1) is users
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    default = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    assert fit(new_model(), None, epochs=1, backup=backup).error is None
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == default


def test_a_signal_as_the_last_step_ends_lets_fit_finish(tmp_path, caplog):
    backup = lightning_impl.BackupAndRestore(tmp_path / "b", save_before_preemption=True)
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        send = sender("lightning.pytorch", (1, 7))
        result = fit(new_model(), None, epochs=2, callbacks=[send], backup=backup)
    assert result.error is None and result.trainer.global_step == 16 and not (tmp_path / "b").exists()
    assert "SIGTERM received as the training finished" in caplog.text


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_outside_the_main_thread_it_raises_instead_of_being_silently_off(namespace, tmp_path):
    callback_class = NAMESPACES[namespace][1]
    errors: list[BaseException] = []
    result: list[Any] = []

    def construct() -> None:
        try:
            callback_class(tmp_path / "b", save_before_preemption=True)
        except BaseException as exc:
            errors.append(exc)

    def train(backup: Any) -> None:
        result.append(fit(new_model(namespace), None, epochs=1, namespace=namespace, backup=backup))

    thread = threading.Thread(target=construct)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], UnsupportedEnvironmentError)
    assert "main thread" in str(errors[0])
    backup = callback_class(tmp_path / "b", save_before_preemption=True)  # in the main thread: fine
    thread = threading.Thread(target=train, args=(backup,))
    thread.start()
    thread.join()
    assert isinstance(result[0].error, UnsupportedEnvironmentError), repr(result[0].error)
    assert result[0].trainer.global_step == 0 and lock_is_free(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".unified-backup-created", LOCK_NAME]


SLURM_ENV = {  # one task of batch job 4242, as srun sets them
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
}  # fmt: skip


@pytest.mark.parametrize("scontrol_exit", [0, 1], ids=["requeued", "requeue-failed"])
def test_with_slurm_auto_requeue_the_signal_backs_up_the_step_then_requeues_as_lightning_does(
    tmp_path, monkeypatch, caplog, scontrol_exit
):
    """Lightning alone would save from inside its SIGUSR1 handler (mid-step) and requeue; with SIGUSR1
    listed, ours backs up at the next step boundary, then runs Lightning's requeue command."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    calls = stand_in_scontrol(tmp_path / "bin", scontrol_exit)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    backup_dir = tmp_path / "b"
    backup = lightning_impl.BackupAndRestore(backup_dir, save_before_preemption=["SIGTERM", "SIGUSR1"])
    send = sender("lightning.pytorch", (1, 3), signal.SIGUSR1)
    with caplog.at_level(logging.INFO, logger="lightning_impl"):
        result = fit(
            new_model(),
            None,
            epochs=3,
            callbacks=[send],
            backup=backup,
            plugins=[SLURMEnvironment(auto_requeue=True)],
        )
    assert isinstance(result.error, lightning_impl.Preempted), repr(result.error)
    manifest = Slot(backup_dir).read_manifest()
    assert (manifest.epoch, manifest.step_in_epoch, manifest.global_step) == (1, 4, 12)
    assert calls.read_text() == "requeue 4242\n"  # once, after the backup was committed
    assert not list(tmp_path.glob("**/hpc_ckpt_*.ckpt")) and not list(Path.cwd().glob("hpc_ckpt_*.ckpt"))
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_impl.preemption"]
    if scontrol_exit == 0:
        assert messages == [
            "Requeued SLURM job 4242 (scontrol requeue 4242), as Lightning's auto-requeue does."
        ]
    else:
        assert len(messages) == 1 and messages[0].startswith(
            "Requeuing SLURM job 4242 failed (`scontrol requeue 4242`"
        )


def test_slurm_auto_requeue_with_its_signal_not_listed_is_left_to_lightning(tmp_path, monkeypatch):
    """SIGTERM only: the SIGUSR1 of auto-requeue stays Lightning's; a SIGTERM stops without requeue."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    calls = stand_in_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    backup = lightning_impl.BackupAndRestore(tmp_path / "b", save_before_preemption=True)
    result = fit(
        new_model(), None, epochs=3, callbacks=[sender("lightning.pytorch", (1, 3))], backup=backup,
        plugins=[SLURMEnvironment(auto_requeue=True)],
    )  # fmt: skip
    assert isinstance(result.error, lightning_impl.Preempted)
    assert not calls.exists()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_JOB_ID": "4242"}, "requeue 4242\n"),
        ({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}, "requeue 77_3\n"),
        ({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "77"}, None),  # no task id: refused, logged
        ({"SLURM_JOB_ID": "42; rm -rf x"}, None),
    ],
    ids=["job", "array-task", "array-without-task", "not-an-id"],
)
def test_the_job_requeued_is_slurms_job_or_array_task_and_a_bad_id_is_only_logged(
    tmp_path, monkeypatch, caplog, env, expected
):
    from lightning_impl.preemption import requeue_slurm_job

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = stand_in_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with caplog.at_level(logging.WARNING, logger="lightning_impl"):
        assert requeue_slurm_job(committed=False) is (expected is not None)
    if expected is None:
        assert not calls.exists() and "Cannot requeue the SLURM job: its id is" in caplog.text
    else:
        assert calls.read_text() == expected


def test_the_requeue_signal_followed_by_sigterm_before_the_boundary_still_requeues(tmp_path, monkeypatch):
    """SLURM may send SIGTERM soon after its requeue signal: the requeue is not forgotten."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    calls = stand_in_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    class Both(L.Callback):
        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
        ) -> None:
            if (trainer.current_epoch, idx) == (0, 2):
                os.kill(os.getpid(), signal.SIGUSR1)
                os.kill(os.getpid(), signal.SIGTERM)

    backup = lightning_impl.BackupAndRestore(tmp_path / "b", save_before_preemption=["SIGTERM", "SIGUSR1"])
    result = fit(new_model(), None, epochs=2, callbacks=[Both()], backup=backup, plugins=[SLURMEnvironment()])
    assert isinstance(result.error, lightning_impl.Preempted)
    assert "Preempted by SIGTERM" in str(result.error)  # the last signal names the stop
    assert calls.read_text() == "requeue 4242\n"
