"""What other callbacks see: a resumed run calls their hooks exactly as the uninterrupted run did from
the backup on. The batches a step-level resume skips fire no hook, and batch indices, the optimizer's
step counter and the losses handed to the hooks continue where the backup was made."""

from __future__ import annotations

import pytest

from unified_backup.slot import Slot

from .driver import STEPS_PER_EPOCH, Hook

EPOCHS = 3


def from_backup_on(
    hooks: list[Hook], epoch: int, batches: int, begins_a_resumed_epoch: bool = True
) -> list[Hook]:
    """The hook calls of an uninterrupted run that a run resumed after ``batches`` of ``epoch`` makes.

    ``begins_a_resumed_epoch``: whether the framework calls the epoch-begin hook of an epoch resumed
    after some of its batches (see ``Driver``).
    """

    def before(call: Hook) -> bool:
        if call[0] in ("train_begin", "train_end"):
            return False
        if call == ("epoch_begin", epoch) and batches:
            return not begins_a_resumed_epoch
        return call[1] < epoch or (call[1] == epoch and call[0].startswith("batch") and call[2] < batches)

    return [call for call in hooks if not before(call)]


@pytest.mark.parametrize(
    ("save_freq", "resumed_at", "exact"),
    [(4, (1, 4), False), ("epoch", (1, 0), False), (4, (1, 4), True)],
    ids=["inside-an-epoch", "at-an-epoch-end", "inside-an-epoch-shuffled-dropout"],
)
def test_other_callbacks_see_the_hooks_of_the_uninterrupted_run_from_the_backup_on(
    driver, tmp_path, save_freq, resumed_at, exact
):
    """``exact``: reshuffled input and dropout, the input each adapter documents as exact."""
    options = {"shuffle": True, "dropout": 0.2} if exact else {}
    reference = driver.fit(driver.new_run(seed=0, **options), None, epochs=EPOCHS, record_hooks=True)
    assert reference.error is None
    batch_ends = [call for call in reference.hooks if call[0] == "batch_end"]
    assert len(batch_ends) == EPOCHS * STEPS_PER_EPOCH and reference.hooks[0] == ("train_begin",)

    backup_dir = tmp_path / "backup"
    first = driver.fit(
        driver.new_run(seed=0, **options), backup_dir, epochs=EPOCHS, save_freq=save_freq, interrupt=(1, 6),
        record_hooks=True,
    )  # fmt: skip
    assert isinstance(first.error, RuntimeError)
    assert first.hooks == reference.hooks[: len(first.hooks)], "the callback changed what others see"
    manifest = Slot(backup_dir).read_manifest()
    assert manifest is not None and (manifest.epoch, manifest.step_in_epoch) == resumed_at

    resumed = driver.fit(
        driver.new_run(seed=1, **options), backup_dir, epochs=EPOCHS, save_freq=save_freq, record_hooks=True
    )
    assert resumed.error is None
    expected = from_backup_on(reference.hooks, *resumed_at, driver.begins_a_resumed_epoch)
    assert resumed.hooks[:4] == expected[:4], "the first hook calls after the resume differ"
    assert resumed.hooks == expected


@pytest.mark.parametrize("driver", ["keras", "tf_keras"], indirect=True)
def test_keras_skips_whole_executions_without_hooks_under_steps_per_execution(driver, tmp_path):
    """Keras calls the batch hooks once per ``steps_per_execution`` batches: a resume 4 batches into an
    epoch, 2 per execution, hides the first two executions and shows the rest as the uninterrupted
    run did (batch indices 4 and 5, then 6 and 7)."""
    reference = driver.fit(driver.new_run(seed=0, accumulate=2), None, epochs=2, record_hooks=True)
    backup_dir = tmp_path / "backup"
    first = driver.fit(
        driver.new_run(seed=0, accumulate=2), backup_dir, epochs=2, save_freq=4, interrupt=(1, 6),
        record_hooks=True,
    )  # fmt: skip
    assert isinstance(first.error, RuntimeError)
    resumed = driver.fit(
        driver.new_run(seed=1, accumulate=2), backup_dir, epochs=2, save_freq=4, record_hooks=True
    )
    assert resumed.error is None
    assert [call[:3] for call in resumed.hooks[:4]] == [
        ("train_begin",), ("epoch_begin", 1), ("batch_begin", 1, 4), ("batch_end", 1, 5),
    ]  # fmt: skip
    assert resumed.hooks == from_backup_on(reference.hooks, 1, 4)
