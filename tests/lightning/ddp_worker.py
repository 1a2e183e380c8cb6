"""A 2-process DDP (or FSDP2) training on CPU (gloo), launched by Lightning itself.

``python -m tests.lightning.ddp_worker OUT_DIR [--strategy ddp|ddp_spawn|ddp_fork|model_parallel]
[--devices 2|1] [--backup-dir DIR]
[--seed S] [--interrupt E,B] [--save-freq epoch|N] [--exact] [--sigterm R,E,B] [--batch-sleep S]
[--num-nodes 1|2] [--namespace lightning.pytorch|pytorch_lightning] [--ckpt-path PATH]``
Each rank writes ``OUT_DIR/rank<r>.json``: what it restored, what it trained, its final weights.
``ddp`` runs this script once per rank (rank 0 is this process, and writes after ``fit``);
``ddp_spawn`` and ``ddp_fork`` run ``fit`` in child processes, which write at their ``fit``'s end:
there, when a rank fails, the launcher may kill the other before it writes. ``--num-nodes 2``: one
process per "node"; run the script twice, with ``NODE_RANK=0`` and ``NODE_RANK=1``.
``--strategy model_parallel``: ``ModelParallelStrategy`` with the model sharded by FSDP2 over every
process; the weights each rank reports are its own shards. ``--devices 1``: one process.
``--exact``: dropout 0.2 and shuffled data (Lightning's DistributedSampler), each rank seeded
differently in ``setup``, so that a resume must restore every rank's own random-number states.
``--sigterm R,E,B``: with ``save_before_preemption=True``, rank R sends itself SIGTERM after
batch B of epoch E (``--signal SIGUSR1``: that signal, listed with SIGTERM); a preempted rank exits
with code 143.
Run it in a private network namespace (see test_processes.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.lightning.helpers import NAMESPACES, new_model, weights
from unified_backup.errors import BackupError
from unified_backup.preemption import EXIT_PREEMPTED, TrainingPreempted


class _Report:
    def __init__(
        self, backup: Any, seed_ranks: bool, out: Path | None = None, batch_sleep: float = 0.0
    ) -> None:
        self.backup = backup
        self.seed_ranks = seed_ranks
        self.out = out  # where each rank writes its report at its fit's end (None: main() does)
        # ddp_spawn/ddp_fork call on_exception in the launcher too, on a copy that never trained
        self.launcher = os.getpid()
        self.batch_sleep = batch_sleep
        self.record: dict[str, Any] = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.seed_ranks:  # every rank draws its own dropout masks
            torch.manual_seed(1000 + trainer.global_rank)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        restored = self.backup.restored if self.backup else None
        self.record.update(
            restored_epoch=restored.epoch if restored else None,
            start_step=trainer.global_step,
            start_weights=[w.tolist() for w in weights(pl_module)],  # this rank's shards, when sharded
        )

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
        self.record["loads"] = self.record.get("loads", 0) + 1  # how often a checkpoint was restored

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.batch_sleep:
            time.sleep(self.batch_sleep)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if (
            self.out is not None and os.getpid() != self.launcher
        ):  # a child process of ddp_spawn / ddp_fork: nothing runs after its fit
            write_report(self.out, trainer, pl_module, self.record, error=None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.out is not None and os.getpid() != self.launcher:
            error = "preempted" if isinstance(exception, TrainingPreempted) else str(exception)
            if error == "preempted":
                self.record["message"] = str(exception)
            write_report(self.out, trainer, pl_module, self.record, error=error)


def write_report(out: Path, trainer: Any, model: Any, record: dict[str, Any], error: str | None) -> None:
    flat = np.concatenate([w.ravel() for w in weights(model)]).astype(float).tolist()
    shards = [w.tolist() for w in weights(model)]  # per tensor: of a sharded model, this rank's rows
    record.update(error=error, seen=model.seen, global_step=trainer.global_step, weights=flat, shards=shards)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class _Interrupt:
    """Raises ``RuntimeError("interrupt")`` just before batch ``at[1]`` of epoch ``at[0]``, on every rank."""

    def __init__(self, at: tuple[int, int]) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if (trainer.current_epoch, idx) == self.at:
            raise RuntimeError("interrupt")


class _SigTerm:
    """Rank ``rank`` sends itself ``signum`` (SIGTERM) after batch ``at[1]`` of epoch ``at[0]``."""

    def __init__(self, rank: int, at: tuple[int, int], signum: int = signal.SIGTERM) -> None:
        self.rank, self.at, self.signum = rank, at, signum

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_rank == self.rank and (trainer.current_epoch, args[-1]) == self.at:
            os.kill(os.getpid(), self.signum)


def _namespaced(mixin: type, namespace: str) -> type:
    """``mixin`` as a Callback of ``namespace``, by a module-level name (ddp_spawn unpickles by name)."""
    name = f"{mixin.__name__.lstrip('_')}_{namespace.replace('.', '_')}"
    made = type(name, (mixin, NAMESPACES[namespace][0].Callback), {"__module__": __name__})
    globals()[name] = made
    return made


CALLBACKS = {
    ns: {m.__name__.lstrip("_"): _namespaced(m, ns) for m in (_Report, _Interrupt, _SigTerm)}
    for ns in NAMESPACES
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--backup-dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interrupt")
    parser.add_argument("--save-freq", default="epoch", type=lambda v: v if v == "epoch" else int(v))
    parser.add_argument("--exact", action="store_true")
    parser.add_argument("--sigterm")
    parser.add_argument(
        "--signal", default="SIGTERM", choices=["SIGTERM", "SIGUSR1"], help="what --sigterm sends"
    )
    parser.add_argument("--keep-previous", action="store_true")
    parser.add_argument(
        "--strategy", default="ddp", choices=["ddp", "ddp_spawn", "ddp_fork", "model_parallel"]
    )
    parser.add_argument("--devices", type=int, default=2, choices=[1, 2])
    parser.add_argument("--ckpt-path", help="passed to fit(ckpt_path=...)")
    parser.add_argument("--on-write-error", default="raise", choices=["raise", "warn"])
    parser.add_argument("--batch-sleep", type=float, default=0.0)
    parser.add_argument("--num-nodes", type=int, default=1, choices=[1, 2])
    parser.add_argument("--namespace", default="lightning.pytorch", choices=sorted(NAMESPACES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    ns, backup_class = NAMESPACES[args.namespace]
    made = CALLBACKS[args.namespace]
    preempt = bool(args.sigterm)
    backup = (
        backup_class(
            args.backup_dir,
            save_freq=args.save_freq,
            save_before_preemption=["SIGTERM", args.signal] if preempt else False,
            keep_previous=args.keep_previous,
            on_write_error=args.on_write_error,
        )
        if args.backup_dir
        else None
    )
    in_children = args.strategy in ("ddp_spawn", "ddp_fork")
    sharded = args.strategy == "model_parallel"  # FSDP2 over every process (data-parallel)
    devices = args.devices // args.num_nodes
    strategy: Any = args.strategy
    if sharded:
        strategy = ns.strategies.ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1
        )
    report = made["Report"](backup, args.exact, args.out if in_children else None, args.batch_sleep)
    callbacks: list[Any] = [backup, report] if backup else [report]
    if args.sigterm:
        rank, epoch, batch = map(int, args.sigterm.split(","))
        callbacks.insert(0, made["SigTerm"](rank, (epoch, batch), signal.Signals[args.signal]))
    if args.interrupt:
        epoch, batch = map(int, args.interrupt.split(","))
        callbacks.insert(0, made["Interrupt"]((epoch, batch)))
    trainer = ns.Trainer(
        max_epochs=3,
        callbacks=callbacks,
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        num_nodes=args.num_nodes,
        default_root_dir=args.out,  # where Lightning's own SLURM handler would save hpc_ckpt_*.ckpt
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = new_model(
        args.namespace,
        seed=args.seed,
        dropout=0.2 if args.exact else 0.0,
        shuffle=args.exact,
        sharded=sharded,
    )
    error = None
    try:
        trainer.fit(model, ckpt_path=args.ckpt_path)
    except RuntimeError as exc:
        error = str(exc)
    except TrainingPreempted as exc:
        error = "preempted"
        report.record["message"] = str(exc)
    except BackupError as exc:  # e.g. a backup refused as fit starts, on every rank
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - ddp_spawn / ddp_fork: a child's error, as the launcher re-raises it
        if not in_children:
            raise
        error = f"{type(exc).__name__}: {exc}"
    if in_children:  # the ranks reported
        print(f"fit ended: {error}", file=sys.stderr, flush=True)
        return {None: 0, "preempted": EXIT_PREEMPTED}.get(error, 3)
    write_report(args.out, trainer, model, report.record, error)
    if torch.distributed.is_initialized():  # after an exception Lightning leaves it up; its threads,
        torch.distributed.destroy_process_group()  # left to the interpreter's exit, can abort (SIGABRT)
    code = {None: 0, "preempted": EXIT_PREEMPTED}.get(error, 3)
    # a child rank's other non-zero exit would make Lightning's launcher SIGKILL rank 0 (its report too)
    return 0 if trainer.global_rank and code == 3 else code


if __name__ == "__main__":
    sys.exit(main())
