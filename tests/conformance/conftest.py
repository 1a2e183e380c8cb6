"""Run every conformance scenario once per adapter, through that adapter's driver."""

from __future__ import annotations

import importlib

import pytest

DRIVERS = {
    "keras": ("tests.conformance.keras_driver", "KerasDriver"),
    "lightning": ("tests.conformance.lightning_driver", "LightningDriver"),
}


@pytest.fixture(params=sorted(DRIVERS), scope="session")
def driver(request):
    module, name = DRIVERS[request.param]
    request.applymarker(getattr(pytest.mark, request.param))
    return getattr(importlib.import_module(module), name)()
