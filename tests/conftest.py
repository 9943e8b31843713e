"""Shared test setup: tier markers by folder, and tiny offline checkpoints."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/hf_fixtures.py and friends


def _tier(item) -> int:
    path = str(item.fspath)
    if f"{os.sep}integration{os.sep}" in path:
        return 1
    if f"{os.sep}gpu{os.sep}" in path:
        return 2
    return 0


def pytest_collection_modifyitems(items):
    """Mark tiers by folder, and run unit tests first: the integration tier keeps one Ray cluster
    up until the session ends, and unit tests refuse to run with Ray initialised."""
    for item in items:
        tier = _tier(item)
        if tier == 1:
            item.add_marker(pytest.mark.integration)
        elif tier == 2:
            item.add_marker(pytest.mark.gpu)
    items.sort(key=_tier)  # stable: file order is kept inside each tier


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random tiny Llama + byte tokenizer saved with save_pretrained; yields (path, hf_model)."""
    from hf_fixtures import save_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    model = save_tiny_llama(path)
    return str(path), model
