"""Every bad backup is refused before any weight changes, with an error naming the file or variable."""

from __future__ import annotations

import pytest

from .bad_inputs import CASES, NEEDS_OTHER
from .conftest import DRIVERS, load_driver


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused(driver, tmp_path, case):
    args = [load_driver(next(n for n in DRIVERS if n != driver.name))] if case in NEEDS_OTHER else []
    outcome = CASES[case](driver, tmp_path / "backup", *args)
    assert isinstance(outcome.error, outcome.expected), repr(outcome.error)
    assert outcome.names in str(outcome.error), str(outcome.error)
    assert outcome.weights_unchanged, "the refused resume changed the weights"
    assert outcome.files_unchanged, "the refused resume changed the backup (or the planted code ran)"
