"""The remote speed benchmark runs end to end (at 2 MB); no timing is asserted (see benchmarks/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_remote_speed_benchmark_prints_both_ratios_for_both_stores():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "remote_speed.py"), "--mb", "2", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| s3 |", "| gs |"))]
    assert len(rows) == 2 and all(len(row.split("|")) == 9 for row in rows), out.stdout
