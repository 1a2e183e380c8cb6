"""The fault campaign at a small size: real SIGKILLs, half aimed inside the backup write."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.tf_keras
@pytest.mark.lightning
@pytest.mark.parametrize(
    ("keep_previous", "async_backup"),
    [(False, False), (True, False), (False, True)],
    ids=["one-slot", "keep-previous", "async"],
)
def test_small_campaign_resumes_every_kill_from_the_newest_backup(tmp_path, keep_previous, async_backup):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fault_campaign.py"), "--trials", "4", "--state-mb", "4",
         "--epochs", "2", "--seed", "3", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json"),
         *(["--keep-previous"] if keep_previous else []), *(["--async-backup"] if async_backup else [])],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())
    assert sorted(row["framework"] for row in rows) == ["keras", "lightning", "tf_keras"]
    for row in rows:
        assert row["trials"] == 4 and row["outcomes"] == {"newest": 4}, row
        assert row["wrong_final_weights"] == 0 and row["leftovers"] == 0 and row["temp_files_left"] == 0
        assert row["previous_bad"] == (0 if keep_previous else None), row
