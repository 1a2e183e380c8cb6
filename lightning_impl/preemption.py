"""``save_before_preemption`` in Lightning: whose signal handler runs, and what a preempted run says.

What Lightning 2.6 does on its own: after ``on_fit_start`` it installs a SIGTERM handler (chaining
the one in place) that logs, forwards SIGTERM to the ranks its launcher started, broadcasts a flag
from rank 0 (a collective, inside the handler) and sets ``trainer.received_sigterm``. Its loops
then raise ``SIGTERMException`` (a ``SystemExit`` with no code: the process exits 0) after the
current batch, or at the end of the epoch or of a validation batch, without saving anything. Under
DDP a SIGTERM that reaches only rank 1 stops rank 1 alone and rank 0 fails in its next collective.
Lightning puts the handlers back when ``fit`` ends (before ``on_fit_end``, after ``on_exception``).

So from ``on_train_start`` to the end of ``fit`` the signals the user lists are taken over from
Lightning: :class:`LightningWatch` records them and calls the handler that was in place before
``fit`` (the one Lightning itself chains), not Lightning's, so that Lightning neither stops before
the backup nor runs a collective from a signal handler. The lifecycle then has the processes agree
at each step boundary and stop together after committing the backup. Under ``strategy="ddp"``,
rank 0 first keeps Lightning's launcher from SIGKILLing it when the other ranks exit with 143
(``_private.spare_from_child_process_observer``), so that it exits with 143 too.

SLURM auto-requeue: where Lightning's ``SLURMEnvironment(auto_requeue=True)`` is in use and its
requeue signal (SIGUSR1 by default) is listed, Lightning's own handler would save a checkpoint from
inside the signal handler, then requeue the job and stop. Ours backs up at the next step boundary
instead and then requeues the job as Lightning does (``scontrol requeue <job id>`` from global rank
0, for the signal received by any rank), before any rank exits. The job is requeued even when that
backup failed (``on_write_error="warn"``): it then resumes from the previous backup.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from lightning_impl import _private
from unified_backup.preemption import PreemptionWatch

log = logging.getLogger(__name__)


class LightningWatch(PreemptionWatch):
    """The preemption watch of one ``Trainer.fit``; made in ``on_fit_start``, before Lightning's handlers."""

    def __init__(self, signals: Sequence[signal.Signals], trainer: Any) -> None:
        super().__init__(signals)
        self._trainer = trainer
        self._before = {sig: signal.getsignal(sig) for sig in self.signals}  # to chain, as Lightning does
        requeue = _private.slurm_requeue_signal(trainer)
        self.requeue_signal = requeue if requeue in self.signals else None
        self._requeue_received = False  # here, even if another signal came after it

    def take_over(self) -> None:
        """``on_train_start``: take the signals over from Lightning until ``fit`` ends.

        A SIGTERM that Lightning recorded since ``on_fit_start`` (e.g. during the sanity check) is taken
        over too, so that the run still stops at its first step boundary with a backup.
        """
        self.check_installable()
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.install()  # chains the handlers noted at fit start, and puts them back at uninstall
        if signal.SIGTERM in self.signals and _private.clear_received_sigterm(self._trainer):
            self.received = signal.SIGTERM

    def before_stop(self) -> None:
        _private.spare_from_child_process_observer()  # before the other ranks can exit

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._requeue_received |= self.requeue_signal is not None and signum == self.requeue_signal
        super()._on_signal(signum, frame)

    def stopping(self, received: list[str | None], primary: bool, committed: bool) -> None:
        if not primary or self.requeue_signal is None:
            return
        if self._requeue_received or self.requeue_signal.name in received:
            requeue_slurm_job(committed)


def requeue_slurm_job(committed: bool = True) -> bool:
    """Requeue this SLURM job as Lightning's auto-requeue does (``scontrol requeue``); False if it failed.

    A failure is logged, never raised. ``committed``: whether the stop's backup was committed (for
    the messages: the requeued job resumes from it, or from the previous one).
    """
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{task}" if array_job is not None else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        log.warning(
            "Cannot requeue the SLURM job: its id is %r (from SLURM_JOB_ID, or SLURM_ARRAY_JOB_ID and "
            "SLURM_ARRAY_TASK_ID); expected digits.",
            job_id,
        )
        return False
    command, reason = ["scontrol", "requeue", job_id], ""
    try:
        code = subprocess.call(command)
    except FileNotFoundError:  # as Lightning: outside a shell's PATH, try again through the shell
        try:
            code = subprocess.call(" ".join(command), shell=True)
        except OSError as exc:
            code, reason = -1, str(exc)
    except OSError as exc:
        code, reason = -1, str(exc)
    if code == 0:
        log.warning(
            "Requeued SLURM job %s (scontrol requeue %s), as Lightning's auto-requeue does.", job_id, job_id
        )
        return True
    log.warning(
        "Requeuing SLURM job %s failed (`%s` exited with %s%s); %s: requeue or resubmit the job to "
        "resume from it.",
        job_id,
        " ".join(command),
        code,
        f": {reason}" if reason else "",
        "the backup is committed" if committed else "the backup of this step failed, the previous one stays",
    )
    return False
