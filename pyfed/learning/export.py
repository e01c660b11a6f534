"""The trained model as files a user takes away: ``latest.keras`` after every round, ``best.keras``
whenever a round's global model scores best so far, and conversions of either (or of any
checkpoint) to a SavedModel or a TensorFlow Lite file (``pyfed export``, through Keras's own
``Model.export``).

A ``.keras`` file is Keras's own archive: the architecture, the compile settings and the weights.
It loads with ``keras.saving.load_model(path)`` in any process, without PyFed. Each file is written
through the one atomic write (temp file, fsync, rename, directory fsync), so a reader, or a server
restarted after a crash, finds the previous file or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pyfed.learning.model import ModelError, check_keras_config, model_lock
from pyfed.persistence.files import open_regular, staged_beside, write_atomic, write_json_atomic

log = logging.getLogger("pyfed.export")

LATEST = "latest.keras"
BEST = "best.keras"
RECORD = "files.json"


def save_keras(model: keras.Model, path: Path) -> None:
    """``model`` as a ``.keras`` archive at ``path``, atomically, never holding its weights twice.

    Keras's own archive writer builds the weights file in memory when the machine has room (with
    the next round's uploads, the server's peak). So Keras writes its unzipped form (the same files,
    the weights as an HDF5 file on disk) beside ``path``, and the archive is streamed from those
    files: the same archive, loaded the same way.

    An optimizer that has not been built is saved as it is, without slots: building it would hold
    two more model copies (Adam's) for the whole run and write them into every file, all zeros, and
    PyFed starts every round with a fresh optimizer anyway. Keras says "Skipping variable loading
    for optimizer" when it loads such a file; the model trains on from it as from a compiled one
    (:func:`load_model_file` keeps that warning out of PyFed's own output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(**staged_beside(path)) as staging:
        unzipped = Path(staging) / "model"
        model.save(unzipped, zipped=False)
        write_atomic(path, lambda handle: _zip_directory(unzipped, handle))


def _zip_directory(directory: Path, handle: Any) -> None:
    """Every file under ``directory`` into a stored (uncompressed) zip archive on ``handle``, as Keras
    writes its archives, each file streamed in pieces."""
    with zipfile.ZipFile(handle, "w") as archive:
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(directory).as_posix())


class ModelFiles:
    """Writes the global model into ``directory`` after each round (see the module docstring), and
    ``files.json``, which says which round each file holds (``summary.json`` repeats it). A file that
    could not be written keeps its previous round there: what the record says is what is on disk.

    ``model`` is the server's copy of the architecture; its weights are replaced on each call, so
    call it where that model is not in use meanwhile (the engine calls it right after evaluating,
    in the thread that evaluates)."""

    def __init__(self, model: keras.Model, directory: Path, best_metric: str):
        self.model = model
        self.directory = Path(directory)
        self.best_metric = best_metric
        self._written = self._read_record()

    @property
    def latest_path(self) -> Path:
        return self.directory / LATEST

    @property
    def best_path(self) -> Path:
        return self.directory / BEST

    @property
    def record_path(self) -> Path:
        return self.directory / RECORD

    def written(self) -> dict[str, Any]:
        """{"latest": {"file", "round"} or None, "best": {"file", "round", "metric"} or None}."""
        return {name: dict(entry) if entry else None for name, entry in self._written.items()}

    def __call__(self, weights: Sequence[np.ndarray], server_round: int, is_best: bool) -> None:
        with model_lock(self.model):
            self._write(weights, server_round, is_best)

    def _write(self, weights: Sequence[np.ndarray], server_round: int, is_best: bool) -> None:
        self.model.set_weights(list(weights))
        save_keras(self.model, self.latest_path)
        self._written["latest"] = {"file": f"{self.directory.name}/{LATEST}", "round": int(server_round)}
        if is_best:
            with open_regular(self.latest_path) as source:
                write_atomic(self.best_path, lambda handle: shutil.copyfileobj(source, handle))
            self._written["best"] = {"file": f"{self.directory.name}/{BEST}", "round": int(server_round),
                                     "metric": self.best_metric}
        write_json_atomic(self.record_path, self._written)
        log.debug("round %d: wrote %s%s", server_round, self.latest_path, f" and {self.best_path}" if is_best else "")

    def best_weights(self) -> list[np.ndarray] | None:
        """The weights ``best.keras`` holds (this run's own file), or None (said why) if it cannot be read."""
        if self._written.get("best") is None:
            return None
        try:
            return load_model_file(self.best_path).get_weights()
        except ExportError as error:
            log.warning("could not read %s back: %s", self.best_path, error)
            return None

    def write_best(self, weights: Sequence[np.ndarray], server_round: int) -> None:
        """Replace ``best.keras`` (still round ``server_round``'s model, its statistics recalibrated)."""
        with model_lock(self.model):
            self.model.set_weights(list(weights))
            save_keras(self.model, self.best_path)

    def _read_record(self) -> dict[str, Any]:
        """What an earlier server process of this run wrote (a resumed run continues it); a missing
        or unreadable record is started afresh (the next round rewrites it)."""
        empty: dict[str, Any] = {"latest": None, "best": None}
        try:
            with open_regular(self.record_path) as handle:
                record = json.loads(handle.read(1 << 20))
        except FileNotFoundError:
            return empty
        except (OSError, ValueError) as error:
            log.warning("ignoring %s (%s); it is rewritten after the next round", self.record_path, error)
            return empty
        if not (isinstance(record, dict) and set(record) == {"latest", "best"}
                and all(entry is None or _entry_ok(entry, name) for name, entry in record.items())):
            log.warning("ignoring %s: not a model-files record; it is rewritten after the next round", self.record_path)
            return empty
        if record["best"] is not None and record["best"]["metric"] != self.best_metric:
            log.warning("best.keras was chosen by %s, now by %s: it is replaced by the next round that is best by %s",
                        record["best"]["metric"], self.best_metric, self.best_metric)
        return record


def _entry_ok(entry: Any, name: str) -> bool:
    keys = {"file", "round", "metric"} if name == "best" else {"file", "round"}
    return (isinstance(entry, dict) and set(entry) == keys and isinstance(entry["file"], str)
            and isinstance(entry["round"], int) and not isinstance(entry["round"], bool) and entry["round"] >= 0
            and (name != "best" or isinstance(entry["metric"], str)))


# --- pyfed export -------------------------------------------------------------------------------

FORMATS = ("keras", "savedmodel", "tflite")
#: ``--format all``: every format, named after --out (a stem): STEM.keras, STEM.tflite, STEM-savedmodel/
ALL_FORMATS = "all"


class ExportError(Exception):
    """What to export could not be found or loaded, or not written as asked (one line, naming it)."""


#: A Keras file's weights may declare at most this many times the file's own size (plus the margin
#: below): Keras stores them uncompressed, so more is a decompression bomb (a 1.2 kB file whose
#: weights declare 4 GB made Keras allocate 16 GB before it refused them).
MAX_WEIGHTS_PER_FILE_BYTE = 4
WEIGHTS_MARGIN_BYTES = 64 << 20
MAX_CONFIG_BYTES = 16 << 20


def check_keras_archive(path: Path) -> None:
    """What can be checked of a ``.keras`` archive before Keras reads it: its configuration names
    only Keras objects (as a model received from a server must: model.check_keras_config) and its
    weights declare no more than the file can hold (:func:`check_weights_file`). ExportError names
    what is wrong."""
    try:
        with open_regular(path, follow_symlinks=True) as file, zipfile.ZipFile(file) as archive:
            size = os.fstat(file.fileno()).st_size
            names = archive.namelist()
            if any(name.startswith("/") or ".." in Path(name).parts for name in names):
                raise ExportError(f"{path}: its archive holds a path outside itself")
            if "config.json" not in names:
                raise ExportError(f"{path}: not a Keras model archive (no config.json)")
            if archive.getinfo("config.json").file_size > MAX_CONFIG_BYTES:
                raise ExportError(f"{path}: its config.json is larger than {MAX_CONFIG_BYTES >> 20} MiB")
            check_keras_config(json.loads(archive.read("config.json")), "file's configuration")
            if "model.weights.h5" in names:
                with archive.open("model.weights.h5") as weights:
                    _check_weights(weights, size, path)
    except ModelError as error:
        raise ExportError(f"{path}: {error}") from None
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as error:
        raise ExportError(f"{path}: not a loadable Keras model ({error.__class__.__name__}: {str(error)[:200]})") from None


def check_weights_file(path: Path) -> None:
    """A ``.weights.h5`` file whose datasets declare no more than the file can hold (ExportError)."""
    try:
        with open_regular(path, follow_symlinks=True) as file:
            _check_weights(file, os.fstat(file.fileno()).st_size, path)
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: not a weights file ({error.__class__.__name__}: {str(error)[:200]})") from None


def _check_weights(handle: Any, file_size: int, path: Path) -> None:
    import h5py

    declared = 0

    def count(name: str, item: Any) -> None:
        nonlocal declared
        if isinstance(item, h5py.Dataset):
            declared += int(np.prod(item.shape, dtype=np.float64)) * item.dtype.itemsize

    with h5py.File(handle, "r") as weights:
        weights.visititems(count)
    if declared > MAX_WEIGHTS_PER_FILE_BYTE * file_size + WEIGHTS_MARGIN_BYTES:
        raise ExportError(f"{path}: its weights declare {declared:,} bytes in a file of {file_size:,} (a "
                          f"decompression bomb, or not a file Keras wrote)")


def load_model_file(path: Path) -> keras.Model:
    """A ``.keras`` archive, checked (:func:`check_keras_archive`), then loaded in Keras's safe mode
    (no code runs from the file)."""
    if not path.is_file():
        raise ExportError(f"{path}: {'is not a regular file' if path.exists() else 'no such file'}")
    check_keras_archive(path)
    try:
        with warnings.catch_warnings():  # a server's file has no optimizer slots (see save_keras)
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises many kinds for a bad archive
        raise ExportError(f"{path}: not a loadable Keras model ({error.__class__.__name__}: {str(error)[:200]})") from None


def model_to_export(source: Path, *, which: str = "latest", model_spec: str | None = None) -> keras.Model:
    """The model ``pyfed export --from source`` means: a ``.keras`` file; a run's LOGDIR (its
    ``model/latest.keras`` or ``model/best.keras``); or a checkpoint ``.npz`` with the server's
    ``model_spec``, whose structure must be the one the checkpoint was written for."""
    source = Path(source)
    if source.is_dir():
        name = LATEST if which == "latest" else BEST
        # a run's LOGDIR, or its model folder as copied out of Compose (docker compose cp ...:/logs/model .)
        path = source / name if (source / LATEST).is_file() or (source / BEST).is_file() else source / "model" / name
        if not path.is_file():
            raise ExportError(f"{source} holds no {name} (nor model/{name}): not a run's LOGDIR or its model "
                              f"folder, or no round has finished"
                              f"{' with a score to choose the best by' if which == 'best' else ''}")
        return load_model_file(path)
    if source.suffix == ".keras":
        return load_model_file(source)
    if source.suffix == ".npz":
        return _model_from_checkpoint(source, model_spec)
    raise ExportError(f"{source}: give a .keras file, a run's LOGDIR or a checkpoint .npz")


def _model_from_checkpoint(path: Path, model_spec: str | None) -> keras.Model:
    """The server's model (``model_spec``) with a checkpoint's weights; every array's dtype and shape
    must match. (The run's fingerprint also hashes the compile settings, which a model rebuilt here
    need not share, so it is not compared.)"""
    from pyfed.learning.model import ModelError, load_model_spec
    from pyfed.persistence.files import CheckpointError, load_state
    from pyfed.wire.protocol import ProtocolError, array_specs, check_specs

    if model_spec is None:
        raise ExportError(f"{path}: a checkpoint holds weights only; give --model / MODEL, the server's model")
    if not path.is_file():
        raise ExportError(f"{path}: {'is not a regular file' if path.exists() else 'no such file'}")
    try:
        model = load_model_spec(model_spec)
        state = load_state(path)
    except (ModelError, CheckpointError) as error:
        raise ExportError(str(error)) from None
    weights = state.get("weights")
    if not isinstance(weights, list) or not all(isinstance(w, np.ndarray) for w in weights):
        raise ExportError(f"{path}: not a PyFed checkpoint (it holds no weights)")
    try:
        check_specs(array_specs(weights), array_specs(model.get_weights()))
    except ProtocolError as error:
        raise ExportError(f"{path}: its weights do not fit {model_spec}: {error}") from None
    model.set_weights(weights)
    return model


def export_models(model: keras.Model, fmt: str, out: Path) -> list[tuple[str, Path]]:
    """``export_model`` for one format, or, with ``all``, for each of FORMATS, named after ``out``
    (a stem: STEM.keras, STEM.tflite and the SavedModel directory STEM-savedmodel). Returns
    (format, path written) pairs."""
    if fmt != ALL_FORMATS:
        return [(fmt, export_model(model, fmt, out))]
    out = Path(out)
    if out.suffix:
        raise ExportError(f"--out {out}: with --format all, give a name without a suffix (each format adds its own)")
    return [(each, export_model(model, each, out.with_name(out.name + suffix)))
            for each, suffix in (("keras", ".keras"), ("savedmodel", "-savedmodel"), ("tflite", ".tflite"))]


def export_model(model: keras.Model, fmt: str, out: Path) -> Path:
    """Write ``model`` to ``out`` as ``fmt`` (one of FORMATS) with Keras's own exporters; a file
    appears whole or not at all, and an existing SavedModel directory is never overwritten. A folder
    it may not write into is one ExportError saying so (as in a container whose user does not own it)."""
    out = Path(out)
    try:
        return _export_model(model, fmt, out)
    except OSError as error:
        raise ExportError(f"--out {out}: cannot write there ({error.strerror or error}): write into a folder this "
                          f"user (uid {os.getuid()}) may write to; in a container, run it as the folder's owner "
                          f"(docker compose run -u \"$(id -u):$(id -g)\" ...)") from None


def _export_model(model: keras.Model, fmt: str, out: Path) -> Path:
    if fmt == "keras":
        if out.suffix != ".keras":
            raise ExportError(f"--out {out}: a Keras archive's name must end in .keras")
        save_keras(model, out)
        return out
    if fmt == "tflite":
        if out.suffix != ".tflite":
            raise ExportError(f"--out {out}: a TensorFlow Lite file's name must end in .tflite")
    elif fmt == "savedmodel":
        if out.exists():
            raise ExportError(f"--out {out}: already exists; a SavedModel is a directory, and this one is not replaced")
    else:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        target = staging / out.name
        model.export(str(target), format="litert" if fmt == "tflite" else "tf_saved_model", verbose=False)
        if fmt == "tflite":
            with open(target, "rb") as source:
                write_atomic(out, lambda handle: shutil.copyfileobj(source, handle))
        else:
            os.rename(target, out)  # the same file system: the whole directory appears at once
    except (ExportError, PermissionError):
        raise
    except Exception as error:  # the converters raise many kinds for a model they cannot express
        raise ExportError(f"cannot export the model as {fmt} ({error.__class__.__name__}: {str(error)[:300]})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# --- starting from pretrained weights ---------------------------------------------------------------

def load_initial_weights(model: keras.Model, path: Path) -> None:
    """Put the weights in ``path`` (a ``.keras`` model, or a ``.weights.h5`` file from
    ``model.save_weights``) into ``model``; ExportError, naming the file and the first array that
    differs, if they do not fit it. The model itself (architecture, compile settings) stays."""
    from pyfed.wire.protocol import ProtocolError, array_specs, check_specs

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if path.name.endswith(".weights.h5"):
        check_weights_file(path)
        try:
            with warnings.catch_warnings():  # only the model's weights are wanted, not the saved optimizer's
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(path)
        except Exception as error:  # Keras raises ValueError and h5py's errors for a file that does not fit
            raise ExportError(f"{path}: its weights do not fit the model ({error.__class__.__name__}: "
                              f"{str(error)[:300]})") from None
        return
    if path.suffix != ".keras":
        raise ExportError(f"{path}: give a .keras model or a .weights.h5 file")
    weights = load_model_file(path).get_weights()
    try:
        check_specs(array_specs(weights), array_specs(model.get_weights()))
    except ProtocolError as error:
        raise ExportError(f"{path}: its weights do not fit the model: {error}") from None
    model.set_weights(weights)
