"""Saving state made of JSON values and lists of numpy arrays (a strategy's, later the server's).

One ``.npz`` file: the JSON part as a UTF-8 byte array, each array as its own entry. It is read
with ``allow_pickle=False`` and written atomically (temp file, fsync, rename), so a crash leaves
the old file or the new one, and a file that is not ours is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT = "pyfed-state/1"


class CheckpointError(ValueError):
    """A state file is missing, corrupt or not a PyFed state file; the message names it."""


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


def _join(value: Any, archive: Any) -> Any:
    if isinstance(value, dict) and "__arrays__" in value:
        return [archive[f"{value['__arrays__']}/{i}"] for i in range(value["count"])]
    if isinstance(value, dict) and "__array__" in value:
        return archive[value["__array__"]]
    if isinstance(value, dict):
        return {k: _join(v, archive) for k, v in value.items()}
    return value


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (JSON values, numpy arrays, lists of arrays) to ``path`` atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    document = {"format": FORMAT, "state": _split(state, arrays, "state")}
    arrays["__json__"] = np.frombuffer(json.dumps(document, allow_nan=False).encode(), np.uint8)
    write_atomic(path, lambda handle: np.savez(handle, **arrays))


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temp file beside ``path``, fsync it, rename it over ``path``, fsync the
    directory: a reader (or a restart after a crash) sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def load_state(path: Path) -> dict[str, Any]:
    """Read what :func:`save_state` wrote; raise :class:`CheckpointError` naming the file if it cannot."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "__json__" not in archive.files:
                raise CheckpointError(f"{path}: not a PyFed state file (no __json__ entry)")
            document = json.loads(archive["__json__"].tobytes().decode())
            if not isinstance(document, dict) or document.get("format") != FORMAT:
                raise CheckpointError(f"{path}: unknown state format {str(document.get('format'))[:40]!r}")
            return _join(document["state"], archive)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as error:
        raise CheckpointError(f"{path}: corrupt state file ({error.__class__.__name__}: {str(error)[:120]})") from None


# --- the server's checkpoints: one file per completed round, the newest K kept -------------------

CHECKPOINT_GLOB = "round-*.npz"


def checkpoint_path(directory: Path, server_round: int) -> Path:
    return Path(directory) / f"round-{server_round:06d}.npz"


def list_checkpoints(directory: Path) -> list[Path]:
    """The directory's checkpoints, oldest first (temp files of an interrupted write are ignored)."""
    return sorted(p for p in Path(directory).glob(CHECKPOINT_GLOB) if p.name[6:12].isdigit())


def save_checkpoint(directory: Path, server_round: int, state: dict[str, Any], keep: int) -> Path:
    """Write the server's state after ``server_round`` atomically, then delete all but the newest ``keep``."""
    path = checkpoint_path(directory, server_round)
    save_state(path, state)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def check_fingerprint(path: Path, saved: Any, current: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a run with a different model or strategy, naming what differs."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: has no run fingerprint; it was not written by a PyFed server")
    for key, value in current.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"{path}: was written by a run with a different {key} ({str(saved.get(key))[:80]} here, "
                f"{str(value)[:80]} now); resume with the original settings, or pass --fresh-start to "
                f"archive it and begin a new run")
