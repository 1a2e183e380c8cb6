"""The speed benchmark at a tiny size, so that it cannot rot: every method measured, no timing asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.backup_speed import METHODS, OURS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.lightning
def test_the_benchmark_measures_every_method_and_prints_its_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "backup_speed.py"), "--sizes", "1", "--repeats", "2",
         "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [row["method"] for row in rows] == list(METHODS)
    for row in rows:
        assert 0.9e6 < row["bytes"] < 1.1e6 * 1.05, row  # about 1 MB of state
        assert len(row["backup_s"]) == 2 and all(t > 0 for t in row["backup_s"]), row
        assert len(row["extra_bytes"]) == 2, row
        measured_restore = row["method"] in (*OURS, "floor")
        assert bool(row.get("restore_s")) == measured_restore and all(t > 0 for t in row.get("restore_s", []))
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(METHODS) and all(f"| {m} |" in result.stdout for m in METHODS)
    for method in ("keras-async", "lightning-async"):
        row = next(row for row in rows if row["method"] == method)
        assert row["writer_s"] > 0, row  # the background writer ran
        assert f"{method} at 1 MB: training stalls" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # every method's files removed
