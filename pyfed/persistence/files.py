"""State files: JSON values and lists of numpy arrays in one ``.npz``, and the one atomic write
that every file PyFed persists goes through (checkpoints, strategy state, summary.json, shards).

One ``.npz`` file: the JSON part as a UTF-8 byte array, each array as its own entry. It is
written atomically (temp file, fsync, rename), so a crash leaves the old file or the new one.

It is read by :func:`read_npz`, not ``np.load``: every entry must be stored uncompressed, hold a
plain (never object) dtype, and declare a shape whose size matches the bytes actually in the file,
checked before anything is allocated; so a corrupt or crafted file is refused with its name and
the reason, and cannot make the reader allocate more than the file's own size.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT = "pyfed-state/1"


class CheckpointError(ValueError):
    """A state file is missing, corrupt or not a PyFed state file; the message names it."""


class CheckpointMismatch(CheckpointError):
    """A sound checkpoint of another run (other model, strategy, shards, or more rounds than asked)."""


def _split(value: Any, arrays: dict[str, np.ndarray], key: str) -> Any:
    """``value`` with every list of numpy arrays replaced by a reference into ``arrays``."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
        for index, array in enumerate(value):
            arrays[f"{key}/{index}"] = array
        return {"__arrays__": key, "count": len(value)}
    if isinstance(value, dict):
        return {k: _split(v, arrays, f"{key}/{k}") for k, v in value.items()}
    if isinstance(value, np.ndarray):
        arrays[key] = value
        return {"__array__": key}
    return value


def _join(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict) and "__arrays__" in value:
        key, count = value["__arrays__"], value.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= len(arrays):
            raise ValueError(f"array list {str(key)[:40]!r} has a bad count {str(count)[:20]!r}")
        return [arrays[f"{key}/{i}"] for i in range(count)]
    if isinstance(value, dict) and "__array__" in value:
        return arrays[value["__array__"]]
    if isinstance(value, dict):
        return {k: _join(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, arrays) for v in value]
    return value


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (JSON values, numpy arrays, lists of arrays) to ``path`` atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    document = {"format": FORMAT, "state": _split(state, arrays, "state")}
    arrays["__json__"] = np.frombuffer(json.dumps(document, allow_nan=False).encode(), np.uint8)
    write_atomic(path, lambda handle: np.savez(handle, **arrays))


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


#: What :func:`staged_beside` names, with tempfile's 8 random characters: ``.<target name>.<random>.tmp``.
_STAGED = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def staged_beside(path: Path) -> dict[str, Any]:
    """Where a write stages ``path``'s new content before it replaces ``path``: beside it (the same
    file system, so the rename is atomic), hidden, named so that :func:`remove_interrupted_writes`
    knows it. Arguments for ``tempfile.mkstemp`` and ``tempfile.TemporaryDirectory``."""
    return {"dir": path.parent, "prefix": f".{path.name}.", "suffix": ".tmp"}


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temp file beside ``path``, fsync it, rename it over ``path``, fsync the
    directory: a reader (or a restart after a crash) sees the old file or the new one, never half.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask), not the
    temp file's 0600: data shards written by one user are read by the services' own user."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(**staged_beside(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_interrupted_writes(directory: Path | None) -> list[str]:
    """Remove what writes killed midway (SIGKILL, an out-of-memory kill) left in ``directory``: what
    they staged with :func:`staged_beside` (:func:`write_atomic`'s temp files,
    :func:`~pyfed.learning.export.save_keras`'s folders; up to a model's size each, one per crash).
    Call it before anything writes there; returns the names removed."""
    if directory is None or not Path(directory).is_dir():
        return []
    removed = []
    for entry in sorted(Path(directory).iterdir()):
        if not _STAGED.fullmatch(entry.name) or entry.is_symlink():
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def write_json_atomic(path: Path, document: Any) -> None:
    """Write ``document`` to ``path`` so that a reader sees the old or the new file, never half of one.

    Compact (no indentation): summary.json grows with every round and is rewritten after each."""
    data = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    write_atomic(path, lambda handle: handle.write(data))


def load_state(path: Path) -> dict[str, Any]:
    """Read what :func:`save_state` wrote; raise :class:`CheckpointError` naming the file if it cannot."""
    path = Path(path)
    try:
        arrays = read_npz(path)
        if "__json__" not in arrays:
            raise CheckpointError(f"{path}: not a PyFed state file (no __json__ entry)")
        document = json.loads(arrays.pop("__json__").tobytes().decode())
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            found = document.get("format") if isinstance(document, dict) else type(document).__name__
            raise CheckpointError(f"{path}: unknown state format {str(found)[:40]!r}")
        state = _join(document["state"], arrays)
        if not isinstance(state, dict):
            raise ValueError(f"the state is a {type(state).__name__}, not a mapping")
        return state
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError, EOFError, RecursionError,
            MemoryError) as error:
        raise CheckpointError(f"{path}: corrupt state file ({error.__class__.__name__}: {str(error)[:160]})") from None


def open_regular(path: Path, *, follow_symlinks: bool = False) -> BinaryIO:
    """``path`` opened for reading if it is a regular file that is not a symlink (OSError otherwise):
    a file PyFed wrote itself is never either, so one that became a link or a FIFO (someone with write
    access to the directory) is refused, never followed or waited on. ``follow_symlinks``: a file the
    operator names (a model, weights) may be a link, to a regular file."""
    flags = (os.O_RDONLY | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
             | getattr(os, "O_NONBLOCK", 0))
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path}: is a symbolic link, not a file PyFed wrote") from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, f"{path}: is not a regular file")
    return os.fdopen(descriptor, "rb")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an uncompressed ``.npz`` (what ``np.savez`` writes), checked before it is read.

    Raises ValueError (or zipfile/OS errors) for anything else: a compressed or non-``.npy`` entry,
    an object or structured dtype, a declared shape that does not match the entry's bytes, or
    entries larger than the file itself.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    with open_regular(path) as file, zipfile.ZipFile(file) as archive:
        file_size = os.fstat(file.fileno()).st_size
        members = archive.infolist()
        if sum(m.file_size for m in members) > file_size:
            raise ValueError("its entries declare more bytes than the file holds")
        for member in members:
            if member.compress_type != zipfile.ZIP_STORED or not member.filename.endswith(".npy"):
                raise ValueError(f"entry {member.filename[:60]!r} is not an uncompressed .npy array")
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle, max_header_size=10_000)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle, max_header_size=10_000)
                else:
                    raise ValueError(f"entry {member.filename[:60]!r} has .npy format version {version}")
                if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufc":
                    raise ValueError(f"entry {member.filename[:60]!r} has dtype {dtype}, not a plain number type")
                expected = math.prod(shape) * dtype.itemsize
                if expected != member.file_size - handle.tell():
                    raise ValueError(f"entry {member.filename[:60]!r} declares shape {list(shape)[:8]} "
                                     f"({expected} bytes) but holds {member.file_size - handle.tell()} bytes")
                data = bytearray(expected)  # writable, like np.load's arrays, and read without a copy
                if expected and handle.readinto(data) != expected:
                    raise ValueError(f"entry {member.filename[:60]!r} is truncated")
            array = np.frombuffer(data, dtype=dtype)
            array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
            arrays[member.filename[:-4]] = array
    return arrays
