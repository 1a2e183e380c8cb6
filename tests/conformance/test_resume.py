"""Never start over silently, and the same signs of a resume in every adapter: ``resume=``, the
restart warning, the restore line (``verbose``), and the folder a failed ``fit`` leaves."""

from __future__ import annotations

import contextlib
import io
import logging
import re

import pytest

from unified_backup import InvalidArgumentError, NoBackupError, Slot
from unified_backup.lock import LOCK_NAME

from .test_contract import interrupted_backup


@contextlib.contextmanager
def shown(driver, capsys):
    """What the framework shows its user while the block runs: stdout, and its own message logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(driver.message_logger) if driver.message_logger else None
    if logger is not None:
        logger.addHandler(handler)
    capsys.readouterr()
    out: list[str] = []
    try:
        yield out
    finally:
        if logger is not None:
            logger.removeHandler(handler)
        out.append(capsys.readouterr().out + stream.getvalue())


def test_resume_required_without_a_backup_raises_naming_the_folder_and_trains_nothing(driver, tmp_path):
    backup_dir = tmp_path / "backup"
    result = driver.fit(driver.new_run(), backup_dir, epochs=2, resume="required")
    assert isinstance(result.error, NoBackupError), result.error
    assert f"resume='required', but {backup_dir} holds no backup to restore" in str(result.error)
    assert result.epochs_run == [] and result.global_step == 0
    assert not backup_dir.exists()  # nothing made, nothing left


def test_resume_required_with_a_backup_resumes_from_it(driver, tmp_path):
    interrupted_backup(driver, tmp_path / "backup", epoch=2, batch=3)
    result = driver.fit(driver.new_run(seed=1), tmp_path / "backup", epochs=4, resume="required")
    assert result.error is None and result.epochs_run == [2, 3]


def test_a_restart_that_finds_no_backup_says_it_starts_from_scratch(driver, tmp_path, caplog, monkeypatch):
    for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    backup_dir = tmp_path / "backup"
    first = driver.fit(driver.new_run(), backup_dir, epochs=2, interrupt=(0, 3))  # before any backup
    assert isinstance(first.error, RuntimeError) and Slot(backup_dir).read_manifest() is None
    with caplog.at_level(logging.WARNING, logger="unified_backup"):
        second = driver.fit(driver.new_run(), backup_dir, epochs=2)
    assert second.error is None and second.epochs_run == [0, 1]
    (warning,) = [r for r in caplog.records if "Training starts from scratch" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "a run that did not finish left its lock file" in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unified_backup"):  # a first run: nothing to say
        assert driver.fit(driver.new_run(), backup_dir, epochs=1).error is None
    assert "Training starts from scratch" not in caplog.text


def test_every_restore_shows_one_line_where_the_framework_shows_its_own(driver, tmp_path, capsys):
    manifest = interrupted_backup(driver, tmp_path / "backup", epoch=2, batch=3)
    with shown(driver, capsys) as out:
        result = driver.fit(driver.new_run(seed=1), tmp_path / "backup", epochs=4, delete_checkpoint=False)
    assert result.error is None
    pattern = (
        rf"Resumed from {re.escape(str(tmp_path / 'backup'))}: 2 epoch\(s\) done, step 0 of the next "
        rf"\(global step 16\); written \d+ (s|min) ago by {driver.name} "
    )
    assert len(re.findall(pattern, out[0])) == 1, out[0]
    assert manifest.framework_version in out[0]
    with shown(driver, capsys) as quiet:  # the backup of the end of epoch 4, kept: one epoch more
        result = driver.fit(driver.new_run(seed=1), tmp_path / "backup", epochs=5, verbose=False)
    assert result.error is None and result.epochs_run == [4]
    assert "Resumed from" not in quiet[0]


def test_a_failed_fit_leaves_the_same_files_in_every_adapter(driver, tmp_path):
    backup_dir = tmp_path / "backup"
    interrupted_backup(driver, backup_dir, epoch=2, batch=3)
    names = sorted("payload-*" if p.name.startswith("payload-") else p.name for p in backup_dir.iterdir())
    assert names == [".unified-backup-created", LOCK_NAME, "manifest.json", "payload-*"]
    # and a successful fit afterwards leaves nothing at all
    assert driver.fit(driver.new_run(), backup_dir, epochs=4).error is None
    assert not backup_dir.exists()


@pytest.mark.parametrize("bad", ["always", None, 2])
def test_bad_resume_and_verbose_are_refused_before_fit(driver, tmp_path, bad):
    for argument in ("resume", "verbose"):
        try:
            error = driver.fit(driver.new_run(), tmp_path / "backup", epochs=1, **{argument: bad}).error
        except InvalidArgumentError as exc:  # raised by the constructor, before fit
            error = exc
        assert isinstance(error, InvalidArgumentError), (argument, bad, error)
        assert f"Invalid value for argument `{argument}`. Received: {argument}={bad!r}" in str(error)
    assert not (tmp_path / "backup").exists()
