"""A real TensorFlow cluster for the tests: one process per task, on loopback, in a private network namespace.

``Cluster(out, tasks, argv)`` starts ``python -m tests.keras.cluster launch``, inside
``unshare -n`` (a network namespace with only loopback: TensorFlow's gRPC servers bind every
interface, so nothing may listen outside), which starts one process per task with its TF_CONFIG
(127.0.0.1 ports, free by construction in the private namespace) and waits for them. Each task's
output goes to ``out/<job>-<index>.log``, its pid to ``out/<job>-<index>.pid``; the launcher writes
every task's exit code to ``out/codes.json``. The test signals a task through its pid (the PID
namespace is shared) and shows every task's log when it fails (:meth:`Cluster.logs`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness import NETNS

ROOT = Path(__file__).resolve().parents[2]
FIRST_PORT = 23500


def tasks_of(cluster: dict[str, int]) -> list[tuple[str, int]]:
    return [(job, i) for job, count in cluster.items() for i in range(count)]


class Cluster:
    """One run of a job: every task of ``cluster`` ({job: count}) runs ``python -m <argv>``."""

    def __init__(self, out: Path, cluster: dict[str, int], argv: Sequence[str], timeout: float) -> None:
        self.out, self.cluster, self.timeout = out, cluster, timeout
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("*.pid"), *out.glob("*.log"), *out.glob("*.json")]:  # reports of a run before
            stale.unlink(missing_ok=True)
        launcher = [
            sys.executable,
            "-m",
            "tests.keras.cluster",
            "launch",
            str(out),
            json.dumps(cluster),
            str(timeout),
            *argv,
        ]
        self.proc = subprocess.Popen(
            [*NETNS, *launcher],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.started = time.monotonic()

    def pid(self, job: str, index: int, timeout: float = 60) -> int:
        path = self.out / f"{job}-{index}.pid"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{job} {index} never started:\n{self.logs()}")
            time.sleep(0.05)
        return int(path.read_text())

    def signal(self, job: str, index: int, sig: signal.Signals) -> None:
        os.kill(self.pid(job, index), sig)

    def wait_for(self, job: str, index: int, text: str, timeout: float = 120) -> None:
        """Until the task's log contains ``text``."""
        path = self.out / f"{job}-{index}.log"
        deadline = time.monotonic() + timeout
        while not (path.exists() and text in path.read_text(errors="replace")):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{job} {index} never logged {text!r}:\n{self.logs()}")
            time.sleep(0.05)

    def wait(self) -> dict[str, int]:
        """Every task's exit code ({"worker-0": 0, ...}); the launcher ends them all by its timeout."""
        try:
            launcher_out, _ = self.proc.communicate(timeout=self.timeout + 30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            launcher_out, _ = self.proc.communicate()
        self.seconds = time.monotonic() - self.started
        codes = self.out / "codes.json"
        if not codes.exists():
            raise AssertionError(f"The cluster launcher wrote no exit codes:\n{launcher_out}\n{self.logs()}")
        return json.loads(codes.read_text())

    def report(self, job: str, index: int) -> dict:
        path = self.out / f"{job}-{index}.json"
        if not path.exists():
            raise AssertionError(f"{job} {index} wrote no report:\n{self.logs()}")
        return json.loads(path.read_text())

    def logs(self, lines: int = 60) -> str:
        """The end of every task's log, for a failing test's message."""
        shown = []
        for job, index in tasks_of(self.cluster):
            path = self.out / f"{job}-{index}.log"
            text = path.read_text(errors="replace").splitlines() if path.exists() else ["(no log)"]
            text = [line for line in text if "cuInit" not in line and "cpu_feature_guard" not in line]
            shown.append(f"----- {job} {index} -----\n" + "\n".join(text[-lines:]))
        return "\n".join(shown)


def launch(out: Path, cluster: dict[str, int], timeout: float, argv: list[str]) -> int:
    """(inside the namespace) Start every task, wait for all (SIGKILL them past ``timeout``), write codes."""
    addresses = {}
    port = FIRST_PORT
    for job, count in cluster.items():
        addresses[job] = [f"127.0.0.1:{port + i}" for i in range(count)]
        port += count
    procs = {}
    for job, index in tasks_of(cluster):
        config = {"cluster": addresses, "task": {"type": job, "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config), TF_CPP_MIN_LOG_LEVEL="1")
        log = open(out / f"{job}-{index}.log", "w")  # noqa: SIM115 (closed by the child's exit)
        procs[f"{job}-{index}"] = proc = subprocess.Popen(
            [sys.executable, "-m", *argv, job, str(index)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        (out / f"{job}-{index}.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    codes: dict[str, int] = {}
    servers_only = "ps" in cluster  # ParameterServer: workers and ps serve until the chief is done
    while len(codes) < len(procs):
        for name, proc in procs.items():
            if name not in codes and proc.poll() is not None:
                codes[name] = proc.returncode
        if servers_only and "chief-0" in codes:
            for name, proc in procs.items():
                if name not in codes:
                    proc.kill()
                    proc.wait()
                    codes[name] = 0
        if time.monotonic() > deadline:
            for name, proc in procs.items():
                if name not in codes:
                    proc.kill()
                    codes[name] = proc.wait()
            codes["timeout"] = 1
        time.sleep(0.05)
    (out / "codes.json").write_text(json.dumps(codes))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "launch":
        sys.exit(launch(Path(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]))
