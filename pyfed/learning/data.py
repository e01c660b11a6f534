"""Datasets, partitioning into client shards, and shard files.

A shard is an ``.npz`` file with two arrays: ``x`` (examples, first axis = example) and ``y``
(integer labels). Shards are loaded with ``allow_pickle=False`` and checked, so a bad file
gives one error naming the file instead of a traceback deep inside training.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyfed.persistence.files import write_atomic, write_json_atomic
from pyfed.wire.protocol import shard_name

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset or shard file is unusable; the message names the file and what is wrong."""


def load_dataset(name: str, options: ReadOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``digits`` (the embedded 8x8 digits, offline; see :func:`load_digits`), ``mnist`` (downloaded),
    ``npz:PATH``, ``csv:PATH`` (see :func:`load_csv`) or ``images:DIR`` (see :func:`load_image_folder`).

    Features are float32 scaled to [0, 1] and flattened; labels are int64.
    """
    if name == "digits":
        return load_digits()
    if name == "mnist":
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        x = np.concatenate([x_train, x_test]).reshape(-1, 784).astype(np.float32) / 255.0
        return x, np.concatenate([y_train, y_test]).astype(np.int64)
    if name.startswith("npz:"):
        return load_shard(Path(name[4:]))
    if name.startswith(("csv:", "images:")):
        return load_site_data(name, options or ReadOptions())
    raise DataError(f"unknown dataset {name!r}; use digits, mnist, npz:PATH, csv:PATH or images:DIR")


DIGITS_FILE = Path(__file__).with_name("digits.npz")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 hand-written digits PyFed ships (``digits.npz`` beside this module, 45 kB):
    the test set of UCI's "Optical Recognition of Handwritten Digits" (E. Alpaydin and C. Kaynak,
    1998, CC BY 4.0), as scikit-learn ships it (``load_digits``): 64 pixel counts 0-16, scaled here
    to [0, 1]. Embedded so that no PyFed process imports scikit-learn (Keras imports it whenever it
    is installed: 1.4 s of processor time at every start)."""
    with np.load(DIGITS_FILE, allow_pickle=False) as archive:
        return (archive["x"] / 16.0).astype(np.float32), archive["y"].astype(np.int64)


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


@dataclass(frozen=True)
class ReadOptions:
    """How CSV files and image folders are read (``--label-column``, ``--image-size``, ...)."""

    label_column: str = "label"
    image_size: tuple[int, int] | None = None  # (height, width); None: the images' own, all alike
    color_mode: str = "rgb"  # or "grayscale"
    class_names: tuple[str, ...] = ()  # image folders named by class, in class-number order


def load_site_data(spec: str, options: ReadOptions = ReadOptions()) -> tuple[np.ndarray, np.ndarray]:
    """A client's own data: ``csv:PATH`` (see :func:`load_csv`), ``images:DIR`` (see
    :func:`load_image_folder`), or an ``.npz`` shard (``PATH`` or ``npz:PATH``)."""
    if spec.startswith("csv:"):
        return load_csv(Path(spec[4:]), label_column=options.label_column)
    if spec.startswith("images:"):
        return load_image_folder(Path(spec[7:]), options)
    return load_shard(Path(spec[4:] if spec.startswith("npz:") else spec))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
#: The largest image an image folder may hold, read from its header before it is decoded: a small
#: file can declare a huge picture (a decompression bomb), and every image is decoded whole first.
MAX_IMAGE_PIXELS = 40_000_000


def load_image_folder(directory: Path, options: ReadOptions = ReadOptions()) -> tuple[np.ndarray, np.ndarray]:
    """Images in one subfolder per class, read with Keras's image utilities (Pillow underneath).

    A class folder is named by its class number (``0``, ``1`` ...) or, with ``class_names``, by its
    name, numbered by that list's order: the same numbers at every site, even one that lacks a class.
    Pixels become float32 in [0, 1], shaped (height, width, channels)."""
    import keras

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (an image folder holds one subfolder per class)")
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{directory}: holds no class folders (one subfolder per class, named 0, 1, 2 ... "
                        f"or as --class-names / CLASS_NAMES lists)")
    names = list(options.class_names)
    paths, labels = [], []
    for folder in folders:
        if names:
            if folder.name not in names:
                raise DataError(f"{folder}: is not one of --class-names / CLASS_NAMES ({', '.join(names[:10])})")
            label = names.index(folder.name)
        elif folder.name.isdigit():
            label = int(folder.name)
        else:
            raise DataError(f"{folder}: a class folder must be named by its class number (0, 1, 2 ...), or "
                            f"list the class names in order with --class-names / CLASS_NAMES, the same at every site")
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        paths += images
        labels += [label] * len(images)
    if not paths:
        raise DataError(f"{directory}: its class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for path in paths:
        _check_image_size(path)
        try:
            image = keras.utils.load_img(path, color_mode=options.color_mode, target_size=options.image_size)
        except Exception as error:  # Pillow raises many kinds for a file that is not an image
            raise DataError(f"{path}: not a readable image ({error.__class__.__name__}: {str(error)[:100]})") from None
        array = keras.utils.img_to_array(image, dtype="float32")
        if arrays and array.shape != arrays[0].shape:
            raise DataError(f"{path}: is {array.shape[1]}x{array.shape[0]} but {paths[0]} is "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; give --image-size / IMAGE_SIZE HEIGHTxWIDTH to resize all")
        arrays.append(array)
    pixels = np.stack(arrays)
    del arrays
    pixels /= np.float32(255)  # in place: a large folder is not held twice
    return check_examples(pixels, np.asarray(labels, np.int64), str(directory))


def _check_image_size(path: Path) -> None:
    """DataError if ``path``'s header declares more than :data:`MAX_IMAGE_PIXELS` (nothing is decoded)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's DecompressionBombWarning: the check below says it better
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Exception as error:  # Pillow raises many kinds for a file that is not an image
        raise DataError(f"{path}: not a readable image ({error.__class__.__name__}: {str(error)[:100]})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} an image folder may hold; resize or tile the images first")


def load_csv(path: Path, *, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """A CSV file with a header row: ``label_column`` holds each example's class number (0, 1, 2 ...),
    every other column a numeric feature. Read with the standard library's ``csv`` module a row at a
    time, each row turned into numbers as it is read (memory: the numbers, not the text: a file of a
    million columns is held as its values); anything that does not fit is refused with the file, line
    and column named."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a CSV file")
    if path.exists() and not path.is_file():
        raise DataError(f"{path}: is not a regular file (a device or a pipe), not a CSV file")
    features, labels = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = csv.reader(handle)
            header = [name.strip() for name in next(rows, [])]
            if not any(header):
                raise DataError(f"{path}: is empty; a CSV needs a header row naming its columns")
            if label_column not in header:
                shown = ", ".join(header[:12]) + (" ..." if len(header) > 12 else "")
                raise DataError(f"{path}: has no column {label_column!r} (--label-column / LABEL_COLUMN); its columns are {shown}")
            repeated = sorted(name for name, count in Counter(header).items() if count > 1)
            if repeated:
                raise DataError(f"{path}: names column(s) {', '.join(map(repr, repeated[:5]))} more than once")
            if len(header) < 2:
                raise DataError(f"{path}: has only the label column; a CSV needs feature columns too")
            label_index = header.index(label_column)
            for line, row in enumerate(rows, start=2):
                if not row or all(not value.strip() for value in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}: line {line} has {len(row)} values; the header has {len(header)}")
                values = _csv_numbers(path, line, header, row, label_column)
                labels.append(int(values[label_index]))
                features.append(np.delete(values, label_index).astype(np.float32))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a CSV file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if not features:
        raise DataError(f"{path}: has a header but no examples")
    table = np.stack(features)
    del features
    return check_examples(table, np.asarray(labels, np.int64), str(path))


def _csv_numbers(path: Path, line: int, header: list[str], row: list[str], label_column: str) -> np.ndarray:
    """One CSV row as float64 numbers, its label a class number; DataError naming the first value
    that is not (numpy parses the row at once; the row is looked at value by value only if it fails)."""
    try:
        values = np.array(row, dtype=np.float64)
    except ValueError:
        values = None
    label = header.index(label_column)
    if values is None or not np.isfinite(values).all() or values[label] < 0 or values[label] != np.floor(values[label]):
        _check_csv_row(path, line, header, row, label_column)
        values = np.array([float(value) for value in row], dtype=np.float64)  # numbers to Python, not numpy ("1_000")
    return values


def _check_csv_row(path: Path, line: int, header: list[str], row: list[str], label_column: str) -> None:
    """Refuse the first value of ``row`` that is not a number (a feature) or a class number (the label)."""
    for name, value in zip(header, row):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if name == label_column:
            if not (math.isfinite(number) and number >= 0 and number.is_integer()):
                raise DataError(f"{path}: line {line}, column {name!r}: {value.strip()[:40]!r} is not a "
                                f"class number (0, 1, 2 ...); map class names to numbers the same "
                                f"way at every site")
        elif not math.isfinite(number):
            raise DataError(f"{path}: line {line}, column {name!r}: {value.strip()[:40]!r} is not a "
                            f"finite number (every feature must be numeric)")


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


SCHEMES = ("iid", "dirichlet", "shards", "quantity")


def partition(labels: np.ndarray, num_clients: int, scheme: str, rng: np.random.Generator, *,
              alpha: float = 0.5, classes_per_client: int = 2) -> list[np.ndarray]:
    """Split example indices ``0..len(labels)-1`` among ``num_clients``: every index exactly once.

    ``iid``: uniform shuffle. ``dirichlet``: label skew, each class spread over the clients by
    Dirichlet(``alpha``) proportions (smaller alpha, more skew). ``shards``: McMahan et al.'s
    pathological split, each client holding exactly ``classes_per_client`` classes.
    ``quantity``: labels IID but client sizes skewed by Dirichlet(``alpha``) proportions.
    Deterministic for a given ``rng`` state. Each returned index array is sorted.
    """
    num_examples = len(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < num_clients:
        raise ValueError(f"cannot give {num_clients} clients at least one of {num_examples} examples")
    if scheme in ("dirichlet", "quantity") and not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if scheme == "iid":
        parts = np.array_split(rng.permutation(num_examples), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet_label_skew(np.asarray(labels), num_clients, alpha, rng)
    elif scheme == "shards":
        parts = _label_shards(np.asarray(labels), num_clients, classes_per_client, rng)
    elif scheme == "quantity":
        parts = _quantity_skew(num_examples, num_clients, alpha, rng)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return [np.sort(part) for part in parts]


def partition_iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(num_examples)`` and cut it into ``num_clients`` near-equal index sets."""
    return partition(np.zeros(num_examples, np.int64), num_clients, "iid", rng)


def _min_examples(num_examples: int, num_clients: int) -> int:
    """Each client gets at least this many (10, or fewer when data are scarce)."""
    return max(1, min(10, num_examples // (2 * num_clients)))


def _dirichlet_label_skew(labels: np.ndarray, num_clients: int, alpha: float,
                          rng: np.random.Generator, max_attempts: int = 100) -> list[np.ndarray]:
    """Per class, Dirichlet(alpha) shares over clients, redrawn until every client has enough examples.

    With many clients and a small alpha no draw may qualify; then the best draw is topped up, each
    short client taking random examples from the currently largest client, so the call always
    succeeds while keeping the skew of the draw.
    """
    minimum = _min_examples(len(labels), num_clients)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    best: list[np.ndarray] | None = None
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for indices in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for client, chunk in enumerate(np.split(indices, cuts)):
                parts[client].append(chunk)
        joined = [np.concatenate(p) for p in parts]
        if min(len(p) for p in joined) >= minimum:
            return joined
        if best is None or min(len(p) for p in joined) > min(len(p) for p in best):
            best = joined
    for client in range(num_clients):
        while len(best[client]) < minimum:
            donor = max(range(num_clients), key=lambda c: len(best[c]))
            take = min(minimum - len(best[client]), len(best[donor]) - minimum)
            moved = rng.choice(len(best[donor]), size=take, replace=False)
            best[client] = np.concatenate([best[client], best[donor][moved]])
            best[donor] = np.delete(best[donor], moved)
    return best


def _label_shards(labels: np.ndarray, num_clients: int, classes_per_client: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes; each class is shared evenly by its holders.

    McMahan et al. sort by label and deal out fixed-size shards, so a shard can straddle two
    classes; here clients take consecutive classes of a random cyclic order instead, which makes
    the class count exact and still uses every example once.
    """
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(f"classes_per_client must be in [1, {len(classes)}] (the data has {len(classes)} classes), "
                         f"got {classes_per_client}")
    if num_clients * classes_per_client < len(classes):
        raise ValueError(f"{num_clients} clients x {classes_per_client} classes cannot cover all {len(classes)} "
                         f"classes; raise --classes-per-client or the number of clients")
    order = classes[rng.permutation(len(classes))]
    held = [[order[(client * classes_per_client + j) % len(classes)] for j in range(classes_per_client)]
            for client in range(num_clients)]
    holders = {c: [client for client in range(num_clients) if c in held[client]] for c in classes}
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        indices = rng.permutation(np.flatnonzero(labels == c))
        if len(indices) < len(holders[c]):
            raise ValueError(f"class {c} has {len(indices)} examples, fewer than the {len(holders[c])} clients holding it")
        for client, chunk in zip(holders[c], np.array_split(indices, len(holders[c]))):
            parts[client].append(chunk)
    return [np.concatenate(p) for p in parts]


def _quantity_skew(num_examples: int, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """IID labels, client sizes ``minimum + Multinomial(rest, Dirichlet(alpha))``."""
    minimum = _min_examples(num_examples, num_clients)
    extra = rng.multinomial(num_examples - minimum * num_clients, rng.dirichlet(np.full(num_clients, alpha)))
    sizes = minimum + extra
    return np.split(rng.permutation(num_examples), np.cumsum(sizes)[:-1])


def split_test(num_examples: int, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) with ``round(test_fraction * num_examples)`` held out."""
    order = rng.permutation(num_examples)
    num_test = int(round(test_fraction * num_examples))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def shard_path(out_dir: Path, client_index: int) -> Path:
    """Where client ``client_index`` (1-based) finds its shard."""
    return Path(out_dir) / shard_name(client_index)


def split_dataset(x: np.ndarray, y: np.ndarray, num_clients: int, *, seed: int = 0, test_fraction: float = 0.2,
                  scheme: str = "iid", alpha: float = 0.5, classes_per_client: int = 2,
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Hold out a test set, then partition the rest: ([(x, y) per client], (x_test, y_test))."""
    rng = np.random.default_rng(seed)
    train, test = split_test(len(y), test_fraction, rng)
    parts = partition(y[train], num_clients, scheme, rng, alpha=alpha, classes_per_client=classes_per_client)
    return [(x[train[p]], y[train[p]]) for p in parts], (x[test], y[test])


def write_partitions(x: np.ndarray, y: np.ndarray, out_dir: Path, num_clients: int, *, seed: int = 0,
                     test_fraction: float = 0.2, scheme: str = "iid", alpha: float = 0.5,
                     classes_per_client: int = 2) -> list[Path]:
    """Write ``client-1.npz`` .. ``client-N.npz`` and ``test.npz`` under ``out_dir``; return the paths."""
    clients, (x_test, y_test) = split_dataset(x, y, num_clients, seed=seed, test_fraction=test_fraction,
                                              scheme=scheme, alpha=alpha, classes_per_client=classes_per_client)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (x_client, y_client) in enumerate(clients, start=1):
        written.append(_save(shard_path(out_dir, index), x_client, y_client))
    written.append(_save(out_dir / "test.npz", x_test, y_test))
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
    write_json_atomic(Path(out_dir) / MANIFEST, {"settings": settings, "files": [p.name for p in paths]})


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    write_atomic(path, lambda handle: np.savez(handle, x=x, y=y))
    return path


def label_table(names: Sequence[str], labels: Sequence[np.ndarray]) -> list[str]:
    """A table with one row per client: its example count and how many of each label it holds."""
    num_classes = max((int(y.max()) + 1 for y in labels if len(y)), default=0)
    width = max(5, *(len(str(int(np.sum(y == c)))) + 1 for y in labels for c in range(num_classes))) if labels else 5
    name_width = max([6, *map(len, names)])
    lines = [f"{'client':<{name_width}} {'examples':>8}  " + "".join(f"{c:>{width}}" for c in range(num_classes))]
    for name, y in zip(names, labels):
        counts = np.bincount(y.astype(np.int64), minlength=num_classes) if len(y) else np.zeros(num_classes, int)
        lines.append(f"{name:<{name_width}} {len(y):>8}  " + "".join(f"{n:>{width}}" for n in counts))
    return lines


def describe_shards(paths: Sequence[Path]) -> list[str]:
    """The label table of shard files (the partition command's output)."""
    labels = []
    for p in paths:
        with np.load(p, allow_pickle=False) as archive:
            labels.append(archive["y"])
    return label_table([p.name for p in paths], labels)
