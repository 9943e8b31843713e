"""Shared test setup: tier markers by folder, and tiny offline checkpoints."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/hf_fixtures.py and friends


def pytest_collection_modifyitems(items):
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}gpu{os.sep}" in path:
            item.add_marker(pytest.mark.gpu)
        elif f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random tiny Llama + byte tokenizer saved with save_pretrained; yields (path, hf_model)."""
    from hf_fixtures import save_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    model = save_tiny_llama(path)
    return str(path), model
