import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.core.test_kill import HOLD_LOCK, start
from unified_backup import Slot
from unified_backup.cli import EXIT_NO_BACKUP, EXIT_USAGE, build_parser, main
from unified_backup.lock import LOCK_NAME


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
    assert bad.returncode == 1  # damaged: not the "no backup" code
    assert "CorruptBackupError" in bad.stderr and "sub/extra.bin fails its sha256 check" in bad.stderr


def test_no_backup_has_its_own_exit_code_apart_from_damaged(tmp_path):
    (tmp_path / "empty").mkdir()
    for command in ("inspect", "verify", "delete"):
        result = cli(command, str(tmp_path / "empty"))
        assert result.returncode == EXIT_NO_BACKUP == 3, result.stderr
        assert "NoBackupError" in result.stderr
        result = cli(command, str(tmp_path / "missing"))
        assert result.returncode == EXIT_NO_BACKUP and "does not exist" in result.stderr
    assert "holds no committed backup" in cli("verify", str(tmp_path / "empty")).stderr
    assert not (tmp_path / "missing").exists() and list((tmp_path / "empty").iterdir()) == []


def test_a_file_is_named_as_a_file_not_as_missing(tmp_path):
    file = tmp_path / "manifest.json"
    file.write_text("{}")
    for command in ("inspect", "verify", "delete"):
        result = cli(command, str(file))
        assert result.returncode == EXIT_USAGE == 2
        assert (
            f"{file} is a file, not a backup folder" in result.stderr
            and "does not exist" not in result.stderr
        )
    assert file.read_text() == "{}"


def test_verify_json_on_success_on_damage_and_on_nothing(committed, tmp_path):
    good = cli("verify", "--json", str(committed))
    body = json.loads(good.stdout)
    assert good.returncode == 0 and body["ok"] and body["exit_code"] == 0 and body["error"] is None
    manifest = Slot(committed).read_manifest()
    assert body["backup"]["payload"] == manifest.payload and body["backup"]["global_step"] == 16
    assert body["backup"]["files"] == 2 and body["previous"] is None
    victim = Slot(committed).payload_dir(manifest) / "weights.bin"
    victim.write_bytes(b"damaged")
    bad = cli("verify", "--json", str(committed))
    body = json.loads(bad.stdout)
    assert bad.returncode == 1 and not body["ok"] and body["exit_code"] == 1
    assert body["error"]["type"] == "CorruptBackupError" and "weights.bin" in body["error"]["message"]
    none = cli("verify", "--json", str(tmp_path / "missing"))
    assert none.returncode == 3 and json.loads(none.stdout)["error"]["type"] == "NoBackupError"


def test_delete_removes_only_the_library_files_even_of_a_damaged_backup(committed):
    (committed / "notes.txt").write_text("mine")
    (committed / "payload-images").mkdir()  # a user's folder that merely looks like ours
    (committed / "manifest.json").write_text("{ damaged")
    assert cli("verify", str(committed)).returncode == 1
    result = cli("delete", str(committed))
    assert result.returncode == 0, result.stderr
    assert "manifest.json" in result.stdout and "payload-" in result.stdout
    assert "Left in place (not the library's backup): notes.txt, payload-images." in result.stdout
    assert sorted(p.name for p in committed.iterdir()) == [
        ".unified-backup-created",
        "notes.txt",
        "payload-images",
    ]
    assert (committed / "notes.txt").read_text() == "mine"
    assert cli("verify", str(committed)).returncode == 3


def test_delete_removes_a_folder_the_library_made_once_empty(committed):
    payload = Slot(committed).read_manifest().payload
    result = cli("delete", str(committed))
    assert result.returncode == 0, result.stderr
    assert f"Deleted {committed}: the library made it" in result.stdout
    assert f"manifest.json, {payload}, {LOCK_NAME})" in result.stdout  # the run that wrote it stopped early
    assert not committed.exists()


def test_delete_names_a_stale_lock_and_leaves_a_users_manifest_json(tmp_path):
    folder = tmp_path / "backup"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("pid 999999999 on a host long gone")
    (folder / "manifest.json").write_text('{"format": "my-dataset"}')
    result = cli("delete", str(folder))
    assert result.returncode == 0, result.stderr
    assert f"Deleted from {folder}: {LOCK_NAME}." in result.stdout
    assert "Left in place (not the library's backup): manifest.json." in result.stdout
    assert "not a manifest unified-backup wrote" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
    assert (folder / "manifest.json").read_text() == '{"format": "my-dataset"}'


def test_an_os_error_is_a_clear_failure_and_still_json(tmp_path):
    (tmp_path / "manifest.json").mkdir()  # a folder where the manifest file should be
    result = cli("verify", "--json", str(tmp_path))
    assert result.returncode == 1 and result.stderr == ""
    body = json.loads(result.stdout)
    assert body["ok"] is False and body["error"]["type"] == "IsADirectoryError"
    plain = cli("verify", str(tmp_path))
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert "IsADirectoryError" in plain.stderr and "manifest.json" in plain.stderr


def test_delete_is_refused_while_a_live_training_owns_the_folder(committed):
    before = {p.relative_to(committed): p.read_bytes() for p in committed.rglob("*") if p.is_file()}
    del before[Path(LOCK_NAME)]  # the crashed run's mark, which the owner below replaces
    owner = start(HOLD_LOCK, str(committed))
    try:
        result = cli("delete", str(committed))
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    assert result.returncode == 1 and "BackupDirInUseError" in result.stderr
    assert f"pid {owner.pid}" in result.stderr
    after = {p.relative_to(committed): p.read_bytes() for p in committed.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name != LOCK_NAME} == before
    assert cli("verify", str(committed)).returncode == 0


def test_version_and_help_are_plain_text_with_every_argument_explained():
    from unified_backup import __version__

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"unified-backup {__version__}"
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = cli(name, "--help").stdout
        assert "``" not in text and ":class:" not in text and ":meth:" not in text, text
        assert "exit codes" in text or name == "demo"
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help text"
    assert "3  no backup" in cli("--help").stdout


def test_the_demo_offers_every_worker_and_runs_all_by_default():
    from unified_backup import cli, demo

    assert set(cli.FRAMEWORKS) == set(demo.WORKERS)
    args = cli.build_parser().parse_args(["demo"])
    assert args.frameworks == ["keras", "tf_keras", "lightning"]


def test_a_url_of_another_store_or_with_credentials_is_a_usage_error(capsys):
    assert main(["inspect", "memory://bucket/run"]) == EXIT_USAGE
    assert main(["verify", "s3://key:hidden-secret@bucket/run"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "memory:// URL" in err and "credentials in it" in err and "hidden-secret" not in err
