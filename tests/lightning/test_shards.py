"""Sharded checkpoints on disk (``lightning_impl.shards``): complete, and safe to load before torch reads.

torch.distributed.checkpoint saves without a process group in one process, so these run anywhere.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_impl import _private, shards

pytestmark = [pytest.mark.lightning, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


def saved(folder: Path, state: dict) -> Path:
    """``state`` saved as torch.distributed.checkpoint saves it, with Lightning's ``meta.pt`` beside it."""
    dcp.save(state, checkpoint_id=folder)
    torch.save({"epoch": 1, "loops": {"fit_loop": {}}}, folder / _private.LIGHTNING_METADATA)
    return folder


def test_plain_tensors_and_values_are_safe_to_load(tmp_path):
    folder = saved(
        tmp_path / "state", {"w": torch.ones(3), "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    )
    assert shards.refused(folder) is None and shards.missing(folder) == []


def test_an_object_torch_would_unpickle_from_a_shard_is_refused_by_name(tmp_path):
    folder = saved(tmp_path / "state", {"w": torch.ones(3), "lr": np.float64(0.1)})  # e.g. a numpy lr
    reason = shards.refused(folder)
    assert reason is not None and reason.startswith("lr in __0_0.distcp: ") and "numpy" in reason


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))  # what a crafted file could call instead


def test_a_crafted_metadata_file_is_refused_without_running_it(tmp_path):
    folder = saved(tmp_path / "state", {"w": torch.ones(3)})
    marker = tmp_path / "ran"
    (folder / _private.DCP_METADATA).write_bytes(pickle.dumps(_RunsCode(marker)))
    assert (
        shards.refused(folder) == ".metadata: pathlib.Path.touch is not a torch.distributed.checkpoint class"
    )
    assert not marker.exists()


def test_a_shard_that_another_process_wrote_elsewhere_is_missing(tmp_path):
    folder = saved(tmp_path / "state", {"w": torch.ones(3)})
    (folder / "__0_0.distcp").unlink()  # as rank 0 sees a folder that is not shared
    assert shards.missing(folder) == ["__0_0.distcp"]


def test_the_torch_and_lightning_file_names_are_theirs():
    """Guards: the names ``_private`` uses for torch's and Lightning's files in a sharded folder."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint.filesystem import _metadata_fn

    assert _private.DCP_METADATA == _metadata_fn, "torch renamed the .metadata file of a checkpoint folder"
    assert _private.LIGHTNING_METADATA == _METADATA_FILENAME, "Lightning renamed meta.pt"
