"""The main job, end to end: `unified-backup demo` with real processes and real SIGKILLs."""

import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.tf_keras
@pytest.mark.lightning
def test_demo_kills_resumes_and_matches(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unified_backup",
            "demo",
            "--kills",
            "2",
            "--epochs",
            "6",
            "--seed",
            "7",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for framework in ("keras", "tf_keras", "lightning"):
        assert f"{framework}: 2 SIGKILL(s)" in result.stdout
    assert result.stdout.count("final weights equal to the uninterrupted run: yes") == 3
    assert result.stdout.count("backup_dir after success: removed") == 3
