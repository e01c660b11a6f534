"""Datasets, partitioning into client shards, and shard files.

A shard is an ``.npz`` file with two arrays: ``x`` (examples, first axis = example) and ``y``
(integer labels). Shards are loaded with ``allow_pickle=False`` and checked, so a bad file
gives one error naming the file instead of a traceback deep inside training.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset or shard file is unusable; the message names the file and what is wrong."""


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``digits`` (scikit-learn's embedded 8x8 digits, offline), ``mnist`` (downloaded) or ``npz:PATH``.

    Features are float32 scaled to [0, 1] and flattened; labels are int64.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    if name == "mnist":
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        x = np.concatenate([x_train, x_test]).reshape(-1, 784).astype(np.float32) / 255.0
        return x, np.concatenate([y_train, y_test]).astype(np.int64)
    if name.startswith("npz:"):
        return load_shard(Path(name[4:]))
    raise DataError(f"unknown dataset {name!r}; use digits, mnist or npz:PATH")


def load_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load and check an ``.npz`` file with arrays ``x`` (numeric) and ``y`` (integer labels)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataError(f"{path}: lacks array(s) {', '.join(sorted(missing))}; "
                                f"a shard needs x and y (it has {', '.join(archive.files) or 'none'})")
            x, y = archive["x"], archive["y"]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an .npz file") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({error})") from None
    return check_examples(x, y, str(path))


def check_examples(x: np.ndarray, y: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Check that ``x``/``y`` form a labelled dataset; return x as float32 and y as int64."""
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise DataError(f"{source}: x must be a numeric array of shape (examples, features...), "
                        f"got {x.dtype} {list(x.shape)}")
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        raise DataError(f"{source}: y must hold integer class labels, got {y.dtype}")
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise DataError(f"{source}: y must be one label per example, got shape {list(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"{source}: x has {len(x)} examples but y has {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{source}: holds no examples")
    if y.min() < 0:
        raise DataError(f"{source}: y holds negative label {int(y.min())}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{source}: x holds NaN or Inf")
    return x, y.astype(np.int64, copy=False)


def partition_iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(num_examples)`` and cut it into ``num_clients`` near-equal index sets."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < num_clients:
        raise ValueError(f"cannot give {num_clients} clients at least one of {num_examples} examples")
    return [np.sort(part) for part in np.array_split(rng.permutation(num_examples), num_clients)]


def split_test(num_examples: int, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) with ``round(test_fraction * num_examples)`` held out."""
    order = rng.permutation(num_examples)
    num_test = int(round(test_fraction * num_examples))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def shard_name(client_index: int) -> str:
    """The file name of shard ``client_index`` (1-based): partition writes it, the server hands it out."""
    return f"client-{client_index}.npz"


def shard_path(out_dir: Path, client_index: int) -> Path:
    """Where client ``client_index`` (1-based) finds its shard."""
    return Path(out_dir) / shard_name(client_index)


def write_partitions(x: np.ndarray, y: np.ndarray, out_dir: Path, num_clients: int, *, seed: int = 0,
                     test_fraction: float = 0.2, scheme: str = "iid") -> list[Path]:
    """Write ``client-1.npz`` .. ``client-N.npz`` and ``test.npz`` under ``out_dir``; return the paths."""
    if scheme != "iid":
        raise ValueError(f"unknown partition scheme {scheme!r}")
    rng = np.random.default_rng(seed)
    train, test = split_test(len(y), test_fraction, rng)
    parts = partition_iid(len(train), num_clients, rng)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, part in enumerate(parts, start=1):
        rows = train[part]
        written.append(_save(shard_path(out_dir, index), x[rows], y[rows]))
    written.append(_save(out_dir / "test.npz", x[test], y[test]))
    return written


MANIFEST = "partition.json"


def read_manifest(out_dir: Path) -> dict | None:
    """How the shards in ``out_dir`` were made (written last, so it implies every file is there)."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files", []) if isinstance(manifest, dict) else []
    if not files or not all((Path(out_dir) / name).is_file() for name in files):
        return None
    return manifest


def write_manifest(out_dir: Path, settings: dict, paths: Sequence[Path]) -> None:
    from .tracking import write_json_atomic

    write_json_atomic(Path(out_dir) / MANIFEST, {"settings": settings, "files": [p.name for p in paths]})


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, x=x, y=y)
    tmp.replace(path)
    return path


def describe_shards(paths: Sequence[Path]) -> list[str]:
    """One line per shard file: name, examples, label counts (for the partition command's table)."""
    lines = []
    for p in paths:
        with np.load(p, allow_pickle=False) as archive:
            y = archive["y"]
            counts = np.bincount(y.astype(np.int64)) if len(y) else np.array([], int)
        label_counts = " ".join(f"{label}:{n}" for label, n in enumerate(counts) if n)
        lines.append(f"{p.name:<16} {len(y):>7} examples   labels {label_counts}")
    return lines
