import signal

import pytest

from unified_backup import BackupOptions, InvalidArgumentError


@pytest.mark.parametrize("save_freq", [0, -3, "batch", 1.5, True, None])
def test_bad_save_freq_names_argument_value_and_expectation(tmp_path, save_freq):
    with pytest.raises(
        InvalidArgumentError,
        match=r"save_freq.*Received: save_freq=.*Expected 'epoch', a positive integer.*or False",
    ):
        BackupOptions(tmp_path, save_freq=save_freq)


def test_save_freq_false_means_no_periodic_backup(tmp_path):
    assert not BackupOptions(tmp_path, save_freq=False).periodic
    assert BackupOptions(tmp_path, save_freq=3).periodic and BackupOptions(tmp_path).per_epoch


@pytest.mark.parametrize("backup_dir", ["", None, 3])
def test_bad_backup_dir(backup_dir):
    with pytest.raises(InvalidArgumentError, match="backup_dir"):
        BackupOptions(backup_dir)


def test_remote_uri_is_refused_with_what_to_do():
    with pytest.raises(InvalidArgumentError, match="Mount the bucket"):
        BackupOptions("gs://bucket/backup")


def test_preemption_signals(tmp_path):
    assert BackupOptions(tmp_path, save_before_preemption=True).preemption_signals == (signal.SIGTERM,)
    assert BackupOptions(tmp_path).preemption_signals == ()
    listed = BackupOptions(tmp_path, save_before_preemption=["SIGTERM", signal.SIGUSR1])
    assert listed.preemption_signals == (signal.SIGTERM, signal.SIGUSR1)
    twice = BackupOptions(tmp_path, save_before_preemption=["SIGTERM", signal.SIGTERM])
    assert twice.preemption_signals == (signal.SIGTERM,)


@pytest.mark.parametrize("value", ["SIGNOPE", [], "yes", 3.5, [None]])
def test_bad_preemption_signals(tmp_path, value):
    with pytest.raises(InvalidArgumentError, match=r"save_before_preemption.*Expected True \(SIGTERM\)"):
        BackupOptions(tmp_path, save_before_preemption=value)


def test_a_file_is_refused_as_backup_dir_and_left_untouched(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(InvalidArgumentError, match=r"notes.txt'?, which is a file, not a folder"):
        BackupOptions(file)
    with pytest.raises(InvalidArgumentError, match=r"lies under .*notes.txt', which is a file"):
        BackupOptions(file / "backup")
    assert file.read_text() == "mine"
    BackupOptions(tmp_path / "new" / "backup")  # a folder still to be made is fine


def test_a_dangling_link_is_refused_as_backup_dir_and_a_link_to_a_folder_is_fine(tmp_path):
    link = tmp_path / "backup"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(InvalidArgumentError, match=r"symbolic link to .*gone', which does not exist"):
        BackupOptions(link)
    assert link.is_symlink() and not (tmp_path / "gone").exists()
    (tmp_path / "gone").mkdir()
    BackupOptions(link)
