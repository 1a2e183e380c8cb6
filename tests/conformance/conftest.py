"""Run every conformance scenario once per adapter, through that adapter's driver."""

from __future__ import annotations

import importlib

import pytest

DRIVERS = {
    "keras": ("tests.conformance.keras_driver", "KerasDriver"),
    "tf_keras": ("tests.conformance.keras_driver", "TfKerasDriver"),
    "lightning": ("tests.conformance.lightning_driver", "LightningDriver"),
}


def load_driver(framework: str):
    module, name = DRIVERS[framework]
    return getattr(importlib.import_module(module), name)()


@pytest.fixture(params=sorted(DRIVERS), scope="session")
def driver(request):
    request.applymarker(getattr(pytest.mark, request.param))
    return load_driver(request.param)
