"""The demo: train in Keras 3, tf_keras and Lightning, SIGKILL the training several times, resume, compare.

Each framework's worker (``python -m keras_impl.demo``, ``keras_impl.tf_keras_demo``, ``lightning_impl.demo``,
see ``WORKERS``) trains
a small model with ``BackupAndRestore`` and prints ``UB-EVENT {json}`` lines. The demo runs it
once uninterrupted as the reference, then again, killing it with a real SIGKILL at random instants
and restarting it until it finishes, and compares the final weights and the loss of every epoch
(``CURVES``, drawn by :mod:`unified_backup.demo_picture` as ``PICTURE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from unified_backup import demo_picture
from unified_backup.store import is_remote

EVENT_PREFIX = "UB-EVENT "
WORKERS = {  # framework -> (worker module, modules it needs, the extra that installs them)
    "keras": ("keras_impl.demo", ("tensorflow", "keras"), "keras"),
    "tf_keras": ("keras_impl.tf_keras_demo", ("tensorflow", "tf_keras"), "keras"),
    "lightning": ("lightning_impl.demo", ("torch", "lightning"), "lightning"),
}
BATCH_SLEEP = 0.02
STEPS_PER_EPOCH = 16
PROCESS_TIMEOUT = 300.0
SECONDS_PER_PROCESS = 4  # measured on 2 cores (75 s for the default demo): starting a process dominates
CURVES = "demo-curves.json"  # the data behind the picture
PICTURE = "demo-curves.png"


@dataclasses.dataclass
class Attempt:
    restored_epoch: int | None  # epochs done in the backup it resumed from; None: a fresh start
    killed_after: float | None  # seconds after the start event; None when it finished
    epochs_seen: int
    losses: dict[int, float]  # epoch -> mean loss, for the epochs it trained and backed up


@dataclasses.dataclass
class Outcome:
    framework: str
    attempts: list[Attempt]
    max_abs_diff: float
    backups: int
    backup_seconds: float
    train_seconds: float
    leftovers: list[str]
    reference_losses: list[float]  # epoch by epoch, of the uninterrupted run


def resumed_after(restored_epoch: int | None) -> str:
    """The one wording of a resume point, in the progress lines and the table alike."""
    return "fresh start" if restored_epoch is None else f"resumed after {restored_epoch} epoch(s)"


class Worker:
    """One training process, with its event lines read as they come."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``argv``; ``env``: variables added to this process's environment (e.g. a store's)."""
        env = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(EVENT_PREFIX):
                with self._cond:
                    self.events.append(json.loads(line[len(EVENT_PREFIX) :]))
                    self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            del self.stderr[:-40]

    def wait_event(self, name: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if event["event"] == name:
                        return event
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    return None
                self._cond.wait(0.05)

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the process; return once every line it wrote before dying has been read."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(10)
        if self._reader.is_alive():  # a child process still holds the pipe: counts may be short
            print("  (warning: the killed process's output is still open; its last lines may be missed)")

    def failure(self) -> str:
        return "".join(self.stderr[-15:])


def emit(event: str, **fields: Any) -> None:
    """(in a demo worker) Report ``event`` to the orchestrator: one ``UB-EVENT {json}`` line on stdout."""
    sys.stdout.write(EVENT_PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def worker_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The command line of a framework's demo worker: the flags :func:`worker_argv` writes, for both."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument(
        "--backup-dir", required=True, type=lambda v: v if is_remote(v) else Path(v), help="a folder or a URL"
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sleep", type=float, default=0.0, help="seconds to sleep after each batch")
    parser.add_argument(
        "--save-freq",
        default="epoch",
        type=lambda v: v if v == "epoch" else False if v.lower() == "false" else int(v),
        help="'epoch', a number of optimizer steps, or 'false' (back up only on preemption)",
    )
    parser.add_argument("--shuffle", action="store_true", help="reshuffle the samples every epoch")
    parser.add_argument("--dropout", type=float, default=0.0, help="rate of a Dropout layer (0: none)")
    parser.add_argument("--hidden", type=int, default=16, help="width of the hidden layer")
    parser.add_argument(
        "--save-before-preemption",
        nargs="*",
        metavar="SIGNAL",
        help="back up and stop (exit code 143) on SIGTERM (no value), or on the signals named",
    )
    parser.add_argument("--keep-previous", action="store_true", help="keep the previous backup too")
    parser.add_argument(
        "--async-backup", action="store_true", help="write backups in a background thread (async_backup)"
    )
    return parser


def callback_options(args: argparse.Namespace) -> dict[str, Any]:
    """``BackupAndRestore``'s keyword arguments from a demo worker's parsed flags."""
    listed = args.save_before_preemption  # None: off; []: SIGTERM; names: those
    return {
        "save_freq": args.save_freq,
        "save_before_preemption": False if listed is None else (listed or True),
        "keep_previous": args.keep_previous,
        "async_backup": args.async_backup,
    }


def worker_argv(
    framework: str, backup_dir: Path, out: Path, *, epochs: int, batch_sleep: float = 0.0
) -> list[str]:
    """argv of a framework's demo worker (``python -m <module>``, the module ``WORKERS`` names)."""
    module = WORKERS[framework][0]
    return [
        sys.executable, "-m", module, "--backup-dir", str(backup_dir), "--out", str(out),
        "--epochs", str(epochs), "--batch-sleep", str(batch_sleep),
    ]  # fmt: skip


def _run_to_end(argv: list[str]) -> tuple[Worker, dict, dict]:
    worker = Worker(argv)
    code = worker.finish(PROCESS_TIMEOUT)
    start, done = worker.wait_event("start", 0), worker.wait_event("done", 0)
    if code != 0 or start is None or done is None:
        raise RuntimeError(f"{' '.join(argv[2:4])} failed with exit code {code}:\n{worker.failure()}")
    return worker, start, done


def run_framework(framework: str, workdir: Path, *, kills: int, epochs: int, rng: random.Random) -> Outcome:
    say = lambda text: print(f"[{framework}] {text}", flush=True)  # noqa: E731
    ref_out, out = workdir / f"{framework}-reference.json", workdir / f"{framework}-resumed.json"
    say("reference run, uninterrupted ...")
    reference_worker, _, done = _run_to_end(
        worker_argv(framework, workdir / f"{framework}-reference", ref_out, epochs=epochs)
    )
    reference_losses = [loss for _, loss in sorted(_losses(reference_worker).items())]
    say(f"  done: {done['backups']} backups took {done['backup_seconds']:.2f} s")
    backup_dir = workdir / f"{framework}-backup"
    expected = epochs * STEPS_PER_EPOCH * BATCH_SLEEP
    attempts: list[Attempt] = []
    while True:
        worker = Worker(worker_argv(framework, backup_dir, out, epochs=epochs, batch_sleep=BATCH_SLEEP))
        start = worker.wait_event("start", PROCESS_TIMEOUT)
        if start is None:
            worker.finish(PROCESS_TIMEOUT)
            raise RuntimeError(f"the {framework} worker did not start:\n{worker.failure()}")
        began = time.monotonic()
        restored = start.get("restored_epoch")
        resumed = resumed_after(restored)
        if len(attempts) < kills:
            remaining = expected * (1 - (restored or 0) / epochs)
            delay = rng.uniform(0.1, 0.8) * remaining
            time.sleep(delay)
            if worker.proc.poll() is None:
                worker.kill()
                seen = sum(1 for e in worker.events if e["event"] == "epoch")
                attempts.append(Attempt(restored, delay, seen, _losses(worker)))
                say(
                    f"attempt {len(attempts)}: {resumed}; "
                    f"SIGKILL after {delay:.2f} s ({seen} epoch(s) backed up in this attempt)"
                )
                continue
        code = worker.finish(PROCESS_TIMEOUT)
        final = worker.wait_event("done", 0)
        if code != 0 or final is None:
            raise RuntimeError(f"the {framework} worker failed with exit code {code}:\n{worker.failure()}")
        done = final
        seen = sum(1 for e in worker.events if e["event"] == "epoch")
        attempts.append(Attempt(restored, None, seen, _losses(worker)))
        say(f"attempt {len(attempts)}: {resumed}; ran to the end ({seen} epoch(s))")
        break
    reference = json.loads(ref_out.read_text())["weights"]
    resumed_weights = json.loads(out.read_text())["weights"]
    diff = max((abs(a - b) for a, b in zip(reference, resumed_weights, strict=True)), default=math.nan)
    leftovers = sorted(p.name for p in backup_dir.iterdir()) if backup_dir.exists() else []
    train_seconds = time.monotonic() - began
    return Outcome(
        framework,
        attempts,
        diff,
        done["backups"],
        done["backup_seconds"],
        train_seconds,
        leftovers,
        reference_losses,
    )


def _losses(worker: Worker) -> dict[int, float]:
    return {e["epoch"]: e["loss"] for e in worker.events if e["event"] == "epoch"}


def curve(outcome: Outcome) -> dict[str, Any]:
    """The data behind one framework's plot: what ``CURVES`` holds, and the picture shows."""
    return {
        "reference": outcome.reference_losses,
        "attempts": [
            {
                "restored_epoch": a.restored_epoch,
                "killed_after_s": a.killed_after,
                "losses": {str(epoch): loss for epoch, loss in sorted(a.losses.items())},
            }
            for a in outcome.attempts
        ],
        # epochs in the backup when each SIGKILL came (what the next attempt resumed after):
        # the kill hit the epoch after them
        "kills": [
            outcome.attempts[i + 1].restored_epoch or 0
            for i, a in enumerate(outcome.attempts)
            if a.killed_after is not None
        ],
        "max_abs_diff": outcome.max_abs_diff,
    }


def print_table(outcome: Outcome) -> None:
    print(f"\n{outcome.framework}: {sum(a.killed_after is not None for a in outcome.attempts)} SIGKILL(s)")
    print(f"  {'attempt':>7}  {'start':<26}  {'outcome':<28}")
    for i, attempt in enumerate(outcome.attempts, 1):
        result = "finished" if attempt.killed_after is None else f"SIGKILL after {attempt.killed_after:.2f} s"
        print(f"  {i:>7}  {resumed_after(attempt.restored_epoch):<26}  {result:<28}")
    equal = "yes" if outcome.max_abs_diff == 0 else ("close" if outcome.max_abs_diff < 1e-5 else "NO")
    print(
        f"  final weights equal to the uninterrupted run: {equal} "
        f"(max abs difference {outcome.max_abs_diff:.3g})"
    )
    print(
        f"  backing up in the last attempt: {outcome.backups} backups, {outcome.backup_seconds:.2f} s "
        f"of {outcome.train_seconds:.2f} s"
    )
    print(f"  backup_dir after success: {'removed' if not outcome.leftovers else outcome.leftovers}")


def _duration(seconds: float) -> str:
    return f"{round(seconds / 15) * 15 or 15} seconds" if seconds < 120 else f"{round(seconds / 60)} minutes"


def draw_picture(curves: dict[str, dict[str, Any]], root: Path) -> str:
    """Draw ``PICTURE`` in ``root`` from ``curves``; the line that says where it is, or why there is none."""
    if not demo_picture.available():
        return f"no picture: {demo_picture.MISSING}"
    return f"{PICTURE}: the picture: {demo_picture.draw(curves, root / PICTURE)}"


def run(
    frameworks: list[str],
    *,
    kills: int = 3,
    epochs: int = 12,
    seed: int | None = None,
    workdir: str | None = None,
    picture: bool = True,
) -> int:
    """Run the demo for ``frameworks``; return 0 when every resumed run matched its reference."""
    rng = random.Random(seed)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="unified-backup-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    training = (
        epochs * STEPS_PER_EPOCH * BATCH_SLEEP
    )  # the killed run sleeps per batch; the reference does not
    seconds = len(frameworks) * ((kills + 2) * SECONDS_PER_PROCESS + training)  # + a reference run
    print(
        f"Training a small model in {', '.join(frameworks)}: once uninterrupted, then again with "
        f"{kills} SIGKILL(s) at random instants, restarted each time until it finishes; then the final "
        f"weights and the loss curves are compared. About {_duration(seconds)} on 2 CPU cores.",
        flush=True,
    )
    outcomes, failed = [], False
    for framework in frameworks:
        missing = [m for m in WORKERS[framework][1] if importlib.util.find_spec(m) is None]
        if missing:
            print(
                f"[{framework}] skipped: {', '.join(missing)} not installed "
                f"(pip install 'unified-backup[{WORKERS[framework][2]}]')",
                flush=True,
            )
            failed = True
            continue
        try:
            outcomes.append(run_framework(framework, root, kills=kills, epochs=epochs, rng=rng))
        except RuntimeError as exc:
            print(f"[{framework}] FAILED: {exc}", flush=True)
            failed = True
    for outcome in outcomes:
        print_table(outcome)
        failed |= not outcome.max_abs_diff < 1e-5 or bool(outcome.leftovers)
    curves = {outcome.framework: curve(outcome) for outcome in outcomes}
    (root / CURVES).write_text(json.dumps(curves, indent=1))
    print(f"\nworking folder: {root}")
    for framework in curves:
        print(f"  {framework}-reference.json, {framework}-resumed.json: final weights and losses of each run")
    print(f"  {CURVES}: the loss of every epoch of every run and attempt, and the SIGKILLs")
    if picture and curves:
        print(f"  {draw_picture(curves, root)}")
    described = {CURVES, PICTURE} | {f"{f}-{kind}.json" for f in curves for kind in ("reference", "resumed")}
    others = sorted(p.name for p in root.iterdir() if p.name not in described)
    if others:  # a failed framework's backups, kept so that it can be resumed or looked at
        print(f"  also: {', '.join(others)} (left by a framework that failed, or by an earlier demo)")
    print("  (the backups were in <framework>-backup/ and <framework>-reference/, removed on success)")
    return 1 if failed else 0
