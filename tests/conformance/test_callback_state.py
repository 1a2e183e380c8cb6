"""Other callbacks' state survives a resume: early stopping and reduce-on-plateau interrupted inside
their patience window end as the uninterrupted run does, and a best-only checkpoint keeps the best
file, in every adapter."""

from __future__ import annotations

import pytest

from .test_contract import assert_same_weights


@pytest.mark.parametrize("backup_first", [False, True], ids=["backup-last", "backup-first"])
def test_early_stopping_and_plateau_inside_their_patience_window_end_as_uninterrupted(
    driver, tmp_path, backup_first
):
    reference = driver.new_run(seed=0)
    expected = driver.fit(reference, tmp_path / "reference", epochs=8, patience=True)
    assert expected.error is None and expected.epochs_run == [0, 1, 2, 3]  # stopped after epoch 3
    assert driver.learning_rate(reference) == pytest.approx(0.5e-2, rel=1e-6)  # halved once, after epoch 2

    backup_dir = tmp_path / "backup"
    first = driver.fit(
        driver.new_run(seed=0), backup_dir, epochs=8, patience=True, interrupt=(2, 3),
        backup_first=backup_first,
    )  # fmt: skip
    assert isinstance(first.error, RuntimeError)  # backed up after epoch 1: one epoch into the window
    run = driver.new_run(seed=1)
    resumed = driver.fit(run, backup_dir, epochs=8, patience=True, backup_first=backup_first)
    assert resumed.error is None
    assert resumed.epochs_run == [2, 3], "early stopping's wait count was not carried over"
    assert driver.learning_rate(run) == driver.learning_rate(reference), "the plateau's count was lost"
    assert_same_weights(driver.weights(run), driver.weights(reference))
    assert not backup_dir.exists()


def test_a_best_only_checkpoint_keeps_the_best_file_and_score_across_a_resume(driver, tmp_path):
    """The checkpoint keeps the epoch of highest loss: the first. A resumed run that forgot that score
    would take its first epoch for the best and write over the file."""
    reference = driver.fit(
        driver.new_run(seed=0), tmp_path / "reference", epochs=4, best_checkpoint=tmp_path / "reference-best"
    )
    assert reference.error is None and reference.best_score == reference.losses[0]
    assert sorted(reference.losses.values(), reverse=True) == [reference.losses[e] for e in range(4)]

    backup_dir, best = tmp_path / "backup", tmp_path / "best"
    first = driver.fit(driver.new_run(seed=0), backup_dir, epochs=4, interrupt=(2, 3), best_checkpoint=best)
    assert isinstance(first.error, RuntimeError)
    resumed = driver.fit(driver.new_run(seed=1), backup_dir, epochs=4, best_checkpoint=best)
    assert resumed.error is None and resumed.epochs_run == [2, 3]
    assert resumed.best_score == reference.best_score, "the best score was not carried over"
    assert_same_weights(
        driver.checkpoint_weights(best), driver.checkpoint_weights(tmp_path / "reference-best")
    )
