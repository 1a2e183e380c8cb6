"""Sharded state on disk: a torch.distributed.checkpoint folder, checked complete and safe to load.

``ModelParallelStrategy`` loads such a folder with torch's reader, which unpickles the folder's
``.metadata`` with no restriction and every item that is not a tensor (an optimizer's
``param_groups``, a module's extra state) with ``torch.load(weights_only=False)``. A backup is
loaded only after :func:`refused` found nothing that could run code, as ``weights_only=True``
guarantees for the single-file layout.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from lightning_impl import _private


def refused(path: Path) -> str | None:
    """Why loading the sharded checkpoint ``path`` could run code stored in it; None if it cannot."""
    try:
        metadata = _private.read_dcp_metadata(path)
    except pickle.UnpicklingError as exc:
        return f"{_private.DCP_METADATA}: {exc}"
    for name, file, offset, length, transformed in _private.stored_objects(metadata):
        if transformed:
            return f"{name} in {file} is stored transformed (e.g. compressed), which is not checked"
        with open(path / file, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            return f"{name} in {file}: {unpickler_reason(exc)}"
    try:
        torch.load(_private.pickled_part(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        return f"{_private.LIGHTNING_METADATA}: {unpickler_reason(exc)}"
    return None


def missing(path: Path) -> list[str]:
    """The files that the folder's ``.metadata`` names and this process cannot see: the shards of a
    rank that wrote them elsewhere (a ``backup_dir`` that is not shared)."""
    return sorted(
        name for name in _private.shard_files(_private.read_dcp_metadata(path)) if not (path / name).is_file()
    )


def unpickler_reason(exc: Exception) -> str:
    """The one line of torch's long weights-only error that names the refused object."""
    lines = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
    return lines[0].split(". Please use")[0] if lines else str(exc)
