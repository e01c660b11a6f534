"""Partitioning and shard files."""

import numpy as np
import pytest

from pyfed.learning.data import DataError, load_dataset, load_shard, partition_iid, split_test, write_partitions


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


# --- non-IID schemes ----------------------------------------------------------------------------

from pyfed.learning.data import SCHEMES, label_table, partition, split_dataset  # noqa: E402

pytestmark = pytest.mark.unit

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 balanced classes


def _max_class_share(parts, labels):
    """The mean over clients of the share of a client's data in its largest class (1.0: one class each)."""
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_clients", [1, 5, 20])
def test_every_scheme_uses_every_example_exactly_once(scheme, num_clients):
    classes_per_client = 10 if num_clients == 1 else 2  # shards must cover every class
    parts = partition(LABELS, num_clients, scheme, np.random.default_rng(3), alpha=0.3,
                      classes_per_client=classes_per_client)
    assert len(parts) == num_clients
    assert all(len(p) > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_deterministic_for_a_seed(scheme):
    a = partition(LABELS, 6, scheme, np.random.default_rng(11), alpha=0.2)
    b = partition(LABELS, 6, scheme, np.random.default_rng(11), alpha=0.2)
    c = partition(LABELS, 6, scheme, np.random.default_rng(12), alpha=0.2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    shares = [np.mean([_max_class_share(partition(LABELS, 10, "dirichlet", np.random.default_rng(s), alpha=a), LABELS)
                       for s in range(5)]) for a in (100.0, 1.0, 0.1)]
    assert shares[0] < 0.25 < shares[1] < shares[2]  # near-uniform (0.1 would be perfectly balanced) -> skewed
    assert shares[2] > 0.5


def test_shards_give_each_client_exactly_its_number_of_classes():
    for classes_per_client in (1, 2, 3):
        parts = partition(LABELS, 10, "shards", np.random.default_rng(0), classes_per_client=classes_per_client)
        assert [len(np.unique(LABELS[p])) for p in parts] == [classes_per_client] * 10


def test_shards_refuse_impossible_requests():
    with pytest.raises(ValueError, match="cannot cover all 10 classes"):
        partition(LABELS, 3, "shards", np.random.default_rng(0), classes_per_client=2)
    with pytest.raises(ValueError, match=r"classes_per_client must be in \[1, 10\]"):
        partition(LABELS, 3, "shards", np.random.default_rng(0), classes_per_client=11)


def test_quantity_skew_varies_sizes_but_not_label_mix():
    parts = partition(LABELS, 10, "quantity", np.random.default_rng(0), alpha=0.5)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 4 * sizes[0] and sizes[0] >= 10
    big = max(parts, key=len)
    assert np.bincount(LABELS[big], minlength=10).min() > 0  # the biggest client still sees every class


def test_iid_keeps_classes_balanced_and_sizes_equal():
    parts = partition(LABELS, 10, "iid", np.random.default_rng(0))
    assert {len(p) for p in parts} == {60}
    assert _max_class_share(parts, LABELS) < 0.3


def test_dirichlet_never_leaves_a_client_without_data_even_when_no_draw_qualifies():
    labels = np.repeat(np.arange(2), 20)
    parts = partition(labels, 10, "dirichlet", np.random.default_rng(0), alpha=0.001)
    assert min(len(p) for p in parts) >= 2  # 40 examples / (2 * 10 clients)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(40))
    many = partition(np.repeat(np.arange(10), 144), 100, "dirichlet", np.random.default_rng(0), alpha=0.1)
    assert min(len(p) for p in many) >= 7 and _max_class_share(many, np.repeat(np.arange(10), 144)) > 0.6


def test_bad_scheme_parameters_are_refused():
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        partition(LABELS, 3, "quantity", np.random.default_rng(0), alpha=0.0)
    with pytest.raises(ValueError, match="unknown partition scheme 'zipf'"):
        partition(LABELS, 3, "zipf", np.random.default_rng(0))


def test_split_dataset_holds_out_the_test_set_before_partitioning():
    x = np.arange(600, dtype=np.float32).reshape(600, 1)
    clients, (x_test, y_test) = split_dataset(x, LABELS, 4, seed=5, test_fraction=0.25, scheme="dirichlet", alpha=0.5)
    assert len(y_test) == 150
    seen = np.concatenate([c[0][:, 0] for c in clients] + [x_test[:, 0]])
    np.testing.assert_array_equal(np.sort(seen), x[:, 0])
    for cx, cy in clients:
        np.testing.assert_array_equal(LABELS[cx[:, 0].astype(int)], cy)  # x and y stay paired


def test_label_table_lists_each_client_with_its_label_counts():
    lines = label_table(["client-1", "client-2"], [np.array([0, 0, 2]), np.array([1])])
    assert lines[0].split() == ["client", "examples", "0", "1", "2"]
    assert lines[1].split() == ["client-1", "3", "2", "0", "1"]
    assert lines[2].split() == ["client-2", "1", "0", "1", "0"]


# --- CSV sites ----------------------------------------------------------------------------------------

def test_a_csv_site_gives_float_features_and_class_numbers_whatever_the_label_columns_place(tmp_path):
    from pyfed.learning.data import ReadOptions, load_csv, load_dataset

    (tmp_path / "site.csv").write_text("age,label,score\n31,1,0.5\n\n45.5,0,1e-3\n52,2.0,7\n", encoding="utf-8")
    x, y = load_csv(tmp_path / "site.csv")
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, np.array([[31, 0.5], [45.5, 1e-3], [52, 7]], np.float32))
    assert y.tolist() == [1, 0, 2]
    (tmp_path / "other.csv").write_text("\ufeffdiagnosis;x\n", encoding="utf-8")  # a BOM is not part of a name
    with pytest.raises(DataError, match="no column 'label'.*its columns are diagnosis;x"):
        load_csv(tmp_path / "other.csv")
    (tmp_path / "named.csv").write_text("f1,diagnosis\n0.1,3\n", encoding="utf-8")
    x, y = load_dataset(f"csv:{tmp_path / 'named.csv'}", ReadOptions(label_column="diagnosis"))
    assert x.tolist() == [[pytest.approx(0.1)]] and y.tolist() == [3]


@pytest.mark.parametrize("text, message", [
    ("", "is empty; a CSV needs a header row"),
    ("label,a\n", "has a header but no examples"),
    ("label\n1\n", "has only the label column"),
    ("a,label\n1,2\n3\n", "line 3 has 1 values; the header has 2"),
    ("a,label\n1,cat\n", "line 2, column 'label': 'cat' is not a class number .*map class names to numbers"),
    ("a,label\n1,-1\n", "line 2, column 'label': '-1' is not a class number"),
    ("a,label\n1,1.5\n", "line 2, column 'label': '1.5' is not a class number"),
    ("a,label\nx,1\n", "line 2, column 'a': 'x' is not a finite number"),
    ("a,label\nnan,1\n", "line 2, column 'a': 'nan' is not a finite number"),
    ("a,label\n1,0\n2,1\n\n3,1\n1e999,2\n", "line 6, column 'a': '1e999' is not a finite number"),  # after a blank
    ("a,a,label\n1,2,1\n", "names column\\(s\\) 'a' more than once"),
])
def test_a_csv_that_does_not_fit_is_refused_naming_the_file_line_and_column(tmp_path, text, message):
    from pyfed.learning.data import load_csv

    (tmp_path / "site.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"site.csv: {message}"):
        load_csv(tmp_path / "site.csv")


def test_a_missing_or_binary_csv_is_refused_by_name(tmp_path):
    from pyfed.learning.data import load_csv

    with pytest.raises(DataError, match="missing.csv: no such file"):
        load_csv(tmp_path / "missing.csv")
    (tmp_path / "binary.csv").write_bytes(b"a,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="binary.csv: not a UTF-8 text file"):
        load_csv(tmp_path / "binary.csv")
    with pytest.raises(DataError, match="is a directory, not a CSV file"):
        load_csv(tmp_path)



# --- image-folder sites ---------------------------------------------------------------------------------

def write_image(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_an_image_folder_site_numbers_its_classes_by_folder_or_by_the_class_names_list(tmp_path):
    from pyfed.learning.data import ReadOptions, load_image_folder, load_site_data

    write_image(tmp_path / "site" / "0" / "a.png", np.zeros((6, 4, 3), np.uint8))
    write_image(tmp_path / "site" / "2" / "b.png", np.full((6, 4, 3), 255, np.uint8))
    (tmp_path / "site" / "2" / "notes.txt").write_text("not an image: skipped")
    x, y = load_site_data(f"images:{tmp_path / 'site'}")
    assert x.shape == (2, 6, 4, 3) and x.dtype == np.float32 and y.tolist() == [0, 2]
    assert x[0].max() == 0.0 and x[1].min() == 1.0
    x, _ = load_image_folder(tmp_path / "site", ReadOptions(image_size=(3, 2), color_mode="grayscale"))
    assert x.shape == (2, 3, 2, 1)

    write_image(tmp_path / "named" / "dog" / "d.png", np.zeros((5, 5, 3), np.uint8))  # this site has no cats
    _, y = load_image_folder(tmp_path / "named", ReadOptions(class_names=("cat", "dog")))
    assert y.tolist() == [1]


@pytest.mark.parametrize("build, options, message", [
    (lambda d: None, {}, "no such directory"),
    (lambda d: d.mkdir(), {}, "holds no class folders"),
    (lambda d: (d / "0").mkdir(parents=True), {}, "its class folders hold no images"),
    (lambda d: write_image(d / "cat" / "a.png", np.zeros((2, 2, 3), np.uint8)), {},
     "cat: a class folder must be named by its class number .*--class-names"),
    (lambda d: write_image(d / "cow" / "a.png", np.zeros((2, 2, 3), np.uint8)), {"class_names": ("cat", "dog")},
     "cow: is not one of --class-names / CLASS_NAMES"),
    (lambda d: (write_image(d / "0" / "a.png", np.zeros((2, 2, 3), np.uint8)),
                write_image(d / "1" / "b.png", np.zeros((3, 2, 3), np.uint8))), {},
     "b.png: is 2x3 but .*a.png is 2x2; give --image-size / IMAGE_SIZE"),
    (lambda d: ((d / "0").mkdir(parents=True), (d / "0" / "x.png").write_bytes(b"not a png")), {},
     "x.png: not a readable image"),
])
def test_an_image_folder_that_does_not_fit_is_refused_naming_the_folder_or_file(tmp_path, build, options, message):
    from pyfed.learning.data import ReadOptions, load_image_folder

    build(tmp_path / "site")
    with pytest.raises(DataError, match=message):
        load_image_folder(tmp_path / "site", ReadOptions(**options))


# --- hostile site files (Hardening II: tried as an attacker) -------------------------------------------

def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, in a few dozen bytes (a decompression
    bomb's header: nothing behind it needs decoding to see it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_an_image_folder_bomb_a_link_loop_a_pipe_or_a_device_neither_hangs_nor_exhausts_the_site(tmp_path):
    import os

    from pyfed.learning.data import load_image_folder

    site = tmp_path / "site"
    write_image(site / "0" / "a.png", np.zeros((4, 4, 3), np.uint8))
    (site / "0" / "loop.png").symlink_to(site / "0" / "loop.png")  # a link to itself
    os.mkfifo(site / "0" / "pipe.png")  # opening it to read would wait for a writer forever
    (site / "0" / "device.png").symlink_to("/dev/zero")  # endless bytes
    x, y = load_image_folder(site)
    assert x.shape == (1, 4, 4, 3) and y.tolist() == [0]  # none of them is a file: none is read
    (site / "0" / "bomb.png").write_bytes(png_declaring(10_000, 10_000))  # 88 bytes, 100 megapixels: under
    with pytest.raises(DataError, match=r"bomb.png: is 10000x10000 \(100 megapixels\), more than the 40 an image "
                                        r"folder may hold"):  # Pillow's own limit (179), which only warns
        load_image_folder(site)


def test_a_csv_with_a_huge_field_a_pipe_or_a_million_columns_is_refused_or_read_as_numbers(tmp_path):
    import os

    from pyfed.learning.data import load_csv

    (tmp_path / "huge.csv").write_text("a,label\n" + "1" * 200_000 + ",0\n")
    with pytest.raises(DataError, match=r"huge.csv: not a readable CSV file \(field larger than field limit"):
        load_csv(tmp_path / "huge.csv")
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(DataError, match="pipe.csv: is not a regular file"):
        load_csv(tmp_path / "pipe.csv")
    columns = 1_000_000  # read a row at a time, as numbers: 8 bytes a value, not a Python string each
    (tmp_path / "wide.csv").write_text(",".join(["label"] + [f"f{i}" for i in range(columns - 1)]) + "\n"
                                       + "".join(f"{k}," + ",".join(["0.5"] * (columns - 1)) + "\n" for k in range(3)))
    x, y = load_csv(tmp_path / "wide.csv")
    assert x.shape == (3, columns - 1) and x.dtype == np.float32 and y.tolist() == [0, 1, 2]


def test_the_embedded_digits_are_the_1797_uci_test_digits_scaled_to_0_1():
    x, y = load_dataset("digits")
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert x.min() == 0.0 and x.max() == 1.0 and round(float(x.sum()) * 16) == 561_718  # the 0-16 counts


def test_no_pyfed_process_imports_scikit_learn():
    """Keras imports scikit-learn whenever it can (1.4 s of processor time at every start): PyFed
    needs none of it, and its client and server modules do not import it themselves."""
    import subprocess
    import sys

    probe = ("import sys; sys.modules['sklearn'] = None; "  # importing it now would raise
             "import pyfed.federation.client, pyfed.federation.server, pyfed.cli, pyfed.learning.training; "
             "from pyfed.learning.data import load_dataset; load_dataset('digits')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
