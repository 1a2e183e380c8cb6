"""``HostCopies``: async_backup's snapshots of a Lightning checkpoint (real tensors, no trainer)."""

from __future__ import annotations

import collections

import torch

from lightning_impl.snapshot import HostCopies


def checkpoint(weight: torch.Tensor) -> dict:
    Pair = collections.namedtuple("Pair", "left right")
    return {
        "state_dict": collections.OrderedDict(weight=weight, tied=weight),
        "counts": collections.defaultdict(int, steps=3),
        "pair": Pair(weight[0], [1, 2]),
        "shape": weight.shape,
        "optimizer_states": [{"param_groups": [{"lr": 0.1, "params": [0]}]}],
    }


def test_a_snapshot_keeps_its_values_and_containers_while_the_live_state_moves_on():
    weight = torch.arange(6.0).reshape(2, 3)
    live = checkpoint(weight)
    snapshot = HostCopies().of(live)
    weight.add_(100.0)  # the next optimizer step, in place
    live["optimizer_states"][0]["param_groups"][0]["lr"] = 0.5
    assert torch.equal(snapshot["state_dict"]["weight"], torch.arange(6.0).reshape(2, 3))
    assert snapshot["optimizer_states"][0]["param_groups"][0]["lr"] == 0.1
    assert snapshot["state_dict"]["tied"] is snapshot["state_dict"]["weight"]  # shared stays shared
    assert type(snapshot["state_dict"]) is collections.OrderedDict
    assert snapshot["counts"].default_factory is int and snapshot["counts"]["steps"] == 3
    assert type(snapshot["pair"]).__name__ == "Pair" and snapshot["pair"].right == [1, 2]
    assert type(snapshot["shape"]) is torch.Size and snapshot["shape"] == (2, 3)


def test_the_next_snapshot_reuses_the_previous_buffers_when_the_tensors_match():
    copies, weight = HostCopies(), torch.ones(4, 4)
    first = copies.of({"w": weight})["w"]
    weight.mul_(3.0)
    second = copies.of({"w": weight})["w"]
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, torch.full((4, 4), 3.0))
    third = copies.of({"w": torch.ones(2, 2)})["w"]  # another shape: a new buffer
    assert third.data_ptr() != second.data_ptr() and third.shape == (2, 2)


def test_a_snapshot_keeps_each_tensors_layout_and_reuses_a_buffer_only_for_the_same_layout():
    copies = HostCopies()
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    transposed = torch.randn(3, 4).t()
    first = copies.of({"conv": channels_last, "t": transposed})
    assert first["conv"].stride() == channels_last.stride() and torch.equal(first["conv"], channels_last)
    assert first["t"].stride() == transposed.stride() and torch.equal(first["t"], transposed)
    contiguous = copies.of({"conv": channels_last.contiguous(), "t": transposed})
    assert contiguous["conv"].is_contiguous() and contiguous["conv"].data_ptr() != first["conv"].data_ptr()
    assert contiguous["t"].data_ptr() == first["t"].data_ptr()  # same layout: reused


def test_tensors_that_are_not_plain_and_dense_are_copied_as_they_are():
    overlapping = torch.arange(3.0).expand(4, 3)  # stride 0: not dense
    sliced = torch.arange(12.0).reshape(3, 4)[:, ::2]  # gaps: not dense
    parameter = torch.nn.Parameter(torch.ones(2))
    snapshot = HostCopies().of({"expanded": overlapping, "param": parameter, "sliced": sliced})
    assert torch.equal(snapshot["sliced"], sliced)
    overlapping_copy, parameter_copy = snapshot["expanded"], snapshot["param"]
    assert (
        torch.equal(overlapping_copy, overlapping) and overlapping_copy.data_ptr() != overlapping.data_ptr()
    )
    with torch.no_grad():
        parameter.add_(1.0)
    assert torch.equal(parameter_copy, torch.ones(2))
