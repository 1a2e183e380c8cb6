import json
import subprocess
import sys

from unified_backup import Slot
from unified_backup.cli import main


def cli(*args):
    return subprocess.run([sys.executable, "-m", "unified_backup", *args], capture_output=True, text=True)


def test_inspect_summarises_and_json_prints_the_manifest(committed, capsys):
    assert main(["inspect", str(committed)]) == 0
    out = capsys.readouterr().out
    assert "fake 1.0" in out and "2 epoch(s) done, step 0 of the next, global step 16" in out
    assert main(["inspect", "--json", str(committed)]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["epoch"] == 2 and body["framework"] == "fake"


def test_verify_ok_then_bad_with_the_reason(committed):
    good = cli("verify", str(committed))
    assert good.returncode == 0 and "OK: 2 file(s)" in good.stdout
    slot = Slot(committed)
    victim = slot.payload_dir(slot.read_manifest()) / "sub" / "extra.bin"
    victim.write_bytes(b"xx" + victim.read_bytes()[2:])
    bad = cli("verify", str(committed))
    assert bad.returncode == 1
    assert "CorruptBackupError" in bad.stderr and "sub/extra.bin fails its sha256 check" in bad.stderr


def test_nothing_committed_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("inspect", str(tmp_path / "empty"))
    assert result.returncode == 1 and "holds no committed backup" in result.stderr
    result = cli("verify", str(tmp_path / "missing"))
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_the_demo_offers_every_worker_and_runs_all_by_default():
    from unified_backup import cli, demo

    assert set(cli.FRAMEWORKS) == set(demo.WORKERS)
    args = cli.build_parser().parse_args(["demo"])
    assert args.frameworks == ["keras", "tf_keras", "lightning"]
