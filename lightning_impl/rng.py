"""Random-number states of a Lightning training process, stored so that ``torch.load(weights_only=True)``
reads them back: torch (CPU, and CUDA once initialised), NumPy, Python's ``random``, and the
``torch.Generator`` objects the training loaders draw from.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The global random-number states of torch (CPU, and CUDA once initialised), NumPy and ``random``.

    Only tensors, ints, floats and None, so that ``torch.load(weights_only=True)`` reads them back.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "internal": torch.tensor(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> str | None:
    """Put back what :func:`rng_state` returned; say what could not be restored (or None)."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is None:
        return None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(cuda):
        return (
            f"the backup holds the CUDA random-number states of {len(cuda)} device(s), "
            f"this process sees {available}"
        )
    torch.cuda.set_rng_state_all(cuda)
    return None


def loader_generators(loaders: Iterable[Any]) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that the loaders' samplers and worker seeds draw from, in order.

    ``DataLoader(shuffle=True, generator=g)`` draws each epoch's permutation and worker base seed
    from ``g``, not from the global generator, so its state must be saved too.
    """
    found: list[torch.Generator] = []
    for loader in loaders:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (
            loader,
            getattr(loader, "sampler", None),
            batch_sampler,
            getattr(batch_sampler, "sampler", None),
        ):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found
