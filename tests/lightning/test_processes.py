"""BackupAndRestore across real processes: Ctrl-C, SIGKILL, a missing framework, and DDP on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unified_backup import Slot
from unified_backup.demo import Worker
from unified_backup.lock import LOCK_NAME

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
    assert not (backup_dir / LOCK_NAME).exists()  # released by on_exception


@pytest.mark.parametrize(
    ("module", "hidden"), [("lightning_impl", "lightning"), ("lightning_impl.pl", "pytorch_lightning")]
)
def test_missing_framework_names_the_extra_to_install(module, hidden):
    code = f"import sys; sys.modules[{hidden!r}] = None; import {module}"
    result = run([sys.executable, "-c", code], timeout=120)
    assert result.returncode != 0
    assert "MissingFrameworkError" in result.stderr
    assert "pip install 'unified-backup[lightning]'" in result.stderr


def ddp(out: Path, *args: str) -> list[dict]:
    """One 2-process DDP fit (gloo on 127.0.0.1) in a private network namespace; each rank's report."""
    argv = [
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
    result = run(argv, timeout=180)
    reports = [
        json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()
    ]
    assert len(reports) == 2, f"exit {result.returncode}:\n{result.stderr[-4000:]}"
    return reports


def demo(backup_dir: Path, out: Path, batch_sleep: float) -> list[str]:
    options = ["--epochs", "3", "--batch-sleep", str(batch_sleep), "--save-freq", "5"]
    argv = [sys.executable, "-m", "lightning_impl.demo", "--backup-dir", str(backup_dir), "--out", str(out)]
    return [*argv, *options, "--shuffle", "--dropout", "0.2"]


def test_sigkill_mid_epoch_with_shuffle_and_dropout_resumes_bit_identical(tmp_path):
    reference = Worker(demo(tmp_path / "reference", tmp_path / "reference.json", 0.0))
    assert reference.finish(120) == 0, reference.failure()
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
    expected = json.loads((tmp_path / "reference.json").read_text())["weights"]
    assert json.loads((tmp_path / "out.json").read_text())["weights"] == expected
    assert not backup_dir.exists()


@pytest.mark.slow
def test_ddp_interrupted_mid_epoch_then_resumed_matches_uninterrupted_ddp(tmp_path):
    # dropout and DistributedSampler shuffling, each rank seeded apart: the resume must restore both ranks
    exact = ("--exact", "--save-freq", "3")
    reference = ddp(tmp_path / "reference", *exact)
    assert reference[0]["weights"] == reference[1]["weights"]
    assert reference[0]["global_step"] == 12  # 64 samples over 2 ranks, batch 8: 4 steps per epoch

    backup_dir = tmp_path / "b"
    interrupted = ddp(tmp_path / "interrupted", *exact, "--backup-dir", str(backup_dir), "--interrupt", "1,3")
    assert [r["error"] for r in interrupted] == ["interrupt", "interrupt"]
    manifest = Slot(backup_dir).read_manifest()
    assert (manifest.epoch, manifest.step_in_epoch, manifest.global_step) == (1, 2, 6)
    # exactly one process committed: one payload folder, no scratch folder of rank 1 left behind
    assert sorted(p.name for p in backup_dir.iterdir() if p.is_dir()) == [manifest.payload]
    assert sorted(manifest.files) == ["state.ckpt"]

    resumed = ddp(tmp_path / "resumed", *exact, "--backup-dir", str(backup_dir), "--seed", "1")
    for rank in resumed:
        assert rank["error"] is None
        assert (rank["restored_epoch"], rank["start_step"]) == (1, 6)  # every rank restored the same backup
        assert rank["seen"][0] == [1, 2] and rank["global_step"] == 12
        assert rank["weights"] == reference[0]["weights"]
    assert not backup_dir.exists()
