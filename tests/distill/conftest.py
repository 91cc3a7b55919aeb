"""Fixtures of the ``distill/`` tests: one intra-op thread for every module (``tests/conftest.py``)."""
import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_module(one_thread):
    yield
