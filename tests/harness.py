"""What the tests and benchmarks use to run the demo workers as real processes.

``Worker`` (run a worker, read its ``UB-EVENT`` lines, SIGKILL it) is the demo's own; the argv
below adds the flags that only the tests and the fault campaign use (reshuffling and dropout,
preemption signals, the state's size, the second slot).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from unified_backup.demo import WORKERS, Worker
from unified_backup.demo import worker_argv as demo_argv

__all__ = ["WORKERS", "Worker", "worker_argv"]


def worker_argv(
    framework: str,
    backup_dir: Path,
    out: Path,
    *,
    epochs: int,
    batch_sleep: float = 0.0,
    save_freq: str | int = "epoch",
    exact: bool = False,
    preemption: Sequence[str] = (),
    hidden: int | None = None,
    keep_previous: bool = False,
    async_backup: bool = False,
) -> list[str]:
    """The demo's worker argv (``python -m <module>``) with the tests' flags, the same for every adapter.

    ``exact`` reshuffles the data every epoch and adds dropout; ``preemption`` lists the signals for
    ``--save-before-preemption``; ``hidden`` sets the hidden width (the state's size);
    ``keep_previous`` passes ``keep_previous=True``; ``async_backup`` passes ``async_backup=True``.
    """
    argv = demo_argv(framework, backup_dir, out, epochs=epochs, batch_sleep=batch_sleep)
    argv += ["--save-freq", str(save_freq)]
    if exact:
        argv += ["--shuffle", "--dropout", "0.2"]
    if preemption:
        argv += ["--save-before-preemption", *preemption]
    if hidden is not None:
        argv += ["--hidden", str(hidden)]
    if keep_previous:
        argv.append("--keep-previous")
    if async_backup:
        argv.append("--async-backup")
    return argv


NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "_"]  # a namespace with only loopback


def can_isolate() -> bool:
    """Whether this machine lets a test make a private network namespace (root, with unshare and ip)."""
    try:
        probe = subprocess.run([*NETNS, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0
