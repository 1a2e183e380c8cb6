"""Snapshots of a Lightning checkpoint for ``async_backup``: every tensor copied into host memory.

The copies go into the buffers of the previous snapshot when the checkpoint has the same tensors
(shape, dtype) in the same order, as it does from one backup to the next: the lifecycle waits for
the previous write before it takes a snapshot, so those buffers are free again, and reusing them
spares the allocation and the page faults of a state-sized copy. A buffer keeps its tensor's strides
(e.g. channels_last), as ``torch.save`` would: a fused optimizer refuses moments of another layout
than their parameters'. Tensors on a GPU are copied into pinned buffers, without blocking, and the
snapshot waits for the copies on every device once they are all queued. Anything but a plain dense
tensor (a subclass, quantized, nested or sparse) is copied as ``Tensor.to("cpu", copy=True)`` does.
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
        devices: set[torch.device] = set()  # CUDA devices with copies in flight

        def tensor(value: torch.Tensor) -> torch.Tensor:
            value = value.detach()
            if not _plain_dense(value):
                return value.to("cpu", copy=True)
            i = len(self._buffers)
            buffer = previous[i] if i < len(previous) else None
            if buffer is None or (buffer.shape, buffer.stride(), buffer.dtype) != (
                value.shape,
                value.stride(),
                value.dtype,
            ):
                buffer = torch.empty_strided(
                    value.shape, value.stride(), dtype=value.dtype, pin_memory=value.is_cuda
                )
            asynchronous = value.is_cuda and buffer.is_pinned()
            buffer.copy_(value, non_blocking=asynchronous)
            if asynchronous:
                devices.add(value.device)
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
        for device in devices:  # the non-blocking copies have landed before training goes on
            torch.cuda.synchronize(device)
        return snapshot


def _plain_dense(value: torch.Tensor) -> bool:
    """A plain tensor whose strides describe a dense block of memory (a buffer can take its layout)."""
    return (
        type(value) is torch.Tensor
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.is_nested
        and _dense(value)
    )


def _dense(value: torch.Tensor) -> bool:
    """Whether ``value``'s elements fill one block of memory without gaps or overlaps, in some order of
    its dimensions (contiguous, channels_last, transposed: yes; expanded or sliced: no)."""
    expected = 1
    for dim in sorted(range(value.dim()), key=value.stride):
        if value.shape[dim] != 1:
            if value.stride(dim) != expected:
                return False
            expected *= value.shape[dim]
    return True
