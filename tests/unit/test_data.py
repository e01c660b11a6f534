"""Partitioning and shard files."""

import numpy as np
import pytest

from pyfed.data import DataError, load_dataset, load_shard, partition_iid, split_test, write_partitions


@pytest.mark.parametrize("num_examples, num_clients", [(10, 3), (1797, 3), (7, 7), (100, 1)])
def test_iid_partition_uses_every_example_exactly_once_in_near_equal_parts(num_examples, num_clients):
    parts = partition_iid(num_examples, num_clients, np.random.default_rng(0))
    assert len(parts) == num_clients
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(num_examples))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_partition_is_deterministic_for_a_seed_and_differs_across_seeds():
    a = partition_iid(100, 4, np.random.default_rng(1))
    b = partition_iid(100, 4, np.random.default_rng(1))
    c = partition_iid(100, 4, np.random.default_rng(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_refuses_more_clients_than_examples():
    with pytest.raises(ValueError, match="cannot give 5 clients"):
        partition_iid(4, 5, np.random.default_rng(0))


def test_split_test_holds_out_the_fraction():
    train, test = split_test(100, 0.2, np.random.default_rng(0))
    assert len(test) == 20 and len(train) == 80
    assert not set(train) & set(test)


def test_write_partitions_on_digits(tmp_path):
    x, y = load_dataset("digits")
    assert x.shape == (1797, 64) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    paths = write_partitions(x, y, tmp_path, 3, seed=0)
    assert [p.name for p in paths] == ["client-1.npz", "client-2.npz", "client-3.npz", "test.npz"]
    shards = [load_shard(p) for p in paths]
    assert sum(len(s[1]) for s in shards) == 1797
    assert len(shards[-1][1]) == round(0.2 * 1797)
    # every example lands in exactly one file
    rows = np.concatenate([s[0] for s in shards])
    assert len(np.unique(rows, axis=0)) == len(np.unique(x, axis=0))


def test_npz_dataset(tmp_path):
    np.savez(tmp_path / "mine.npz", x=np.random.rand(30, 5), y=np.arange(30) % 3)
    x, y = load_dataset(f"npz:{tmp_path / 'mine.npz'}")
    assert x.shape == (30, 5) and x.dtype == np.float32 and y.dtype == np.int64


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 2))}, "lacks array\\(s\\) y"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3, int)}, "x has 4 examples but y has 3 labels"),
    ({"x": np.zeros(4), "y": np.zeros(4, int)}, "x must be a numeric array of shape"),
    ({"x": np.array([["a", "b"]] * 4), "y": np.zeros(4, int)}, "x must be a numeric array"),
    ({"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 2, 3])}, "y must hold integer class labels"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 2, 3])}, "y holds negative label -1"),
    ({"x": np.zeros((0, 2)), "y": np.zeros(0, int)}, "holds no examples"),
    ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, int)}, "x holds NaN or Inf"),
    ({"x": np.zeros((4, 2)), "y": np.zeros((4, 2), int)}, "y must be one label per example"),
])
def test_bad_shards_give_one_error_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        load_shard(path)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match="text.npz: not a readable .npz file"):
        load_shard(tmp_path / "text.npz")
    with pytest.raises(DataError, match="missing.npz: no such file"):
        load_shard(tmp_path / "missing.npz")
    np.savez(tmp_path / "objects.npz", x=np.array([object()] * 4), y=np.zeros(4, int))
    with pytest.raises(DataError, match="objects.npz: not a readable .npz file"):
        load_shard(tmp_path / "objects.npz")  # object arrays would need pickle: refused
