"""Fixtures shared by the integration tests."""

from pathlib import Path

import pytest

from pyfed.learning.data import load_dataset, write_partitions


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Digits split into client-1..3.npz and test.npz (IID, seed 0)."""
    out = tmp_path_factory.mktemp("shards")
    write_partitions(*load_dataset("digits"), out, 3, seed=0)
    return out
