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


def test_urls_are_remote_and_keep_their_form(tmp_path):
    assert BackupOptions("gs://bucket/backup/").backup_dir == "gs://bucket/backup"
    assert BackupOptions("s3://bucket/a/b").remote
    assert BackupOptions(f"file://{tmp_path}").backup_dir == tmp_path  # a local folder
    assert not BackupOptions(tmp_path).remote


@pytest.mark.parametrize("url", ["s3://", "gs:///prefix", "s3:////"])
def test_url_without_a_bucket_is_refused(url):
    with pytest.raises(InvalidArgumentError, match="URL with a bucket"):
        BackupOptions(url)


def test_other_stores_and_credentials_in_the_url_are_refused():
    with pytest.raises(InvalidArgumentError, match="a memory:// URL"):
        BackupOptions("memory://bucket/x")
    with pytest.raises(InvalidArgumentError, match="a S3:// URL"):
        BackupOptions("S3://bucket/x")
    with pytest.raises(InvalidArgumentError, match="credentials in it") as refused:
        BackupOptions("s3://AKIA:very-secret@bucket/x")
    assert "very-secret" not in str(refused.value)


def test_storage_options_need_a_remote_backup_dir(tmp_path):
    with pytest.raises(InvalidArgumentError, match="is a local folder"):
        BackupOptions(tmp_path, storage_options={"anon": True})
    with pytest.raises(InvalidArgumentError, match="Expected a dict"):
        BackupOptions("s3://b/p", storage_options="anon")
    with pytest.raises(InvalidArgumentError, match="staging_dir"):
        BackupOptions("s3://b/p", staging_dir="s3://b/staging")


def test_storage_options_are_not_shown():
    options = BackupOptions("s3://b/p", storage_options={"secret": "do-not-show"})
    assert "do-not-show" not in repr(options)


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
