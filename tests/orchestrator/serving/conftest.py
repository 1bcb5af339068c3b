"""Shared fixtures for the serving tests: the real model, loaded once per module."""
from __future__ import annotations

import pytest
from threadpoolctl import threadpool_limits

from model.loaded import load_model


@pytest.fixture(scope="module")
def lm():
    with threadpool_limits(limits=1):  # see tests/decode/conftest.py
        yield load_model()
