"""Snapshots of a Lightning checkpoint for ``async_backup``: every tensor copied into host memory.

The copies go into the buffers of the previous snapshot when the checkpoint has the same tensors
(shape, dtype) in the same order, as it does from one backup to the next: the lifecycle waits for
the previous write before it takes a snapshot, so those buffers are free again, and reusing them
spares the allocation and the page faults of a state-sized copy. Tensors on a GPU are copied into
pinned buffers, without blocking, and the snapshot waits for the copies once they are all queued.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class HostCopies:
    """Makes snapshots of one ``fit``'s checkpoints, reusing the last snapshot's buffers."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []  # of the last snapshot, in the order its tensors were met

    def of(self, checkpoint: Any) -> Any:
        """``checkpoint`` with every tensor copied to host memory and every container rebuilt, so that no
        later step can change it; a tensor reached twice is copied once (``torch.save`` keeps it shared).
        The previous snapshot's buffers are reused: that snapshot must no longer be in use."""
        previous, self._buffers = self._buffers, []
        device_copies = False

        def tensor(value: torch.Tensor) -> torch.Tensor:
            nonlocal device_copies
            value = value.detach()
            if value.layout != torch.strided:  # e.g. sparse: a plain copy
                return value.to("cpu", copy=True)
            i = len(self._buffers)
            buffer = previous[i] if i < len(previous) else None
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
            on_device = value.device.type != "cpu"
            buffer.copy_(value, non_blocking=on_device and buffer.is_pinned())
            device_copies = device_copies or on_device
            self._buffers.append(buffer)
            return buffer

        memo: dict[int, Any] = {}

        def copied(value: Any) -> Any:
            if id(value) in memo:
                return memo[id(value)]
            result: Any
            if isinstance(value, torch.Tensor):
                result = tensor(value)
            elif isinstance(value, dict):  # a shallow copy keeps the class (OrderedDict, defaultdict, ...)
                result = copy.copy(value)
                for key, item in value.items():
                    result[key] = copied(item)
            elif isinstance(value, list):
                result = copy.copy(value)
                for i, item in enumerate(value):
                    result[i] = copied(item)
            elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
                result = type(value)(*(copied(item) for item in value))
            elif type(value) is tuple:
                result = tuple(copied(item) for item in value)
            else:  # e.g. torch.Size, numbers, strings
                result = copy.deepcopy(value)
            memo[id(value)] = result
            return result

        snapshot = copied(checkpoint)
        if device_copies and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies have landed before training goes on
        return snapshot
