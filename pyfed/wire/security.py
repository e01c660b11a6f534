"""CurveZMQ keys and client admission.

Keys are pyzmq's certificate files (``zmq.auth``): ``NAME.key`` holds a public key,
``NAME.key_secret`` the pair. ``pyfed keys`` writes a server pair and one pair per client, or
(``--site``) one site's own pair on the site's machine, whose secret never leaves it.

The server encrypts every connection with its secret key and runs a ZAP handler
(:class:`Admission`, in pyzmq's authenticator thread) that admits a client only if its public
key is one of the ``*.key`` files in the authorized-keys directory (or any key, without one).
The directory is re-read when it changes, so adding a client's key needs no restart and deleting
one revokes it (the server also drops the revoked key's open connections). A key file that does
not parse is refused, with its name, and the rest of the directory still counts; if the directory
itself cannot be read, the previous key set stays. The ZAP callback never raises: an exception in
pyzmq's authenticator thread would end it, and every later handshake would hang.

The admitted key travels with every message (ZeroMQ's ``User-Id`` property); the server binds each
client id to the key that first claimed it, so no client can act as another.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("pyfed.security")

SERVER_KEY_NAME = "server"
MAX_KEY_FILE_BYTES = 64 * 1024  # a certificate is a few hundred bytes


class KeyFileError(ValueError):
    """A key file is missing or not a CurveZMQ certificate; the message names it."""


@dataclass(frozen=True)
class CurveKeys:
    """A CurveZMQ key pair (z85 bytes), plus, for a client, the server's public key."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None


def client_key_name(index: int, prefix: str = "client") -> str:
    return f"{prefix}-{index}"


def generate_keys(out: Path, clients: int, prefix: str = "client") -> tuple[list[Path], list[Path]]:
    """Create ``server.key[_secret]`` and ``<prefix>-<i>.key[_secret]`` (i = 1..clients) in ``out``.

    Existing pairs are kept, never overwritten (a new server key would lock every client out).
    Returns (created, kept) secret-key paths.
    """
    return _make_pairs(out, [SERVER_KEY_NAME, *(client_key_name(i, prefix) for i in range(1, clients + 1))])


def generate_site_key(out: Path, site: str) -> tuple[list[Path], list[Path]]:
    """One site's own pair, made on the site's machine: ``<site>.key`` (public: the server's operator
    puts it in the authorized directory) and ``<site>.key_secret`` (mode 0600; it never leaves the
    site). An existing pair is kept. Returns (created, kept) as :func:`generate_keys`."""
    if site == SERVER_KEY_NAME:
        raise KeyFileError(f"a site's key pair cannot be named {SERVER_KEY_NAME!r}: that name is the server's")
    return _make_pairs(out, [site])


def _make_pairs(out: Path, names: list[str]) -> tuple[list[Path], list[Path]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    created, kept = [], []
    for name in names:
        secret = out / f"{name}.key_secret"
        if secret.exists() and (out / f"{name}.key").exists():
            load_key_pair(secret)  # an existing pair must be readable, or we say so now
            kept.append(secret)
            continue
        # zmq.auth writes the files with the process's umask and has no mode argument: under 077 the
        # secret is never readable by others, not even for the moment before a chmod
        previous = os.umask(0o077)
        try:
            zmq.auth.create_certificates(str(out), name)
        finally:
            os.umask(previous)
        secret.chmod(0o600)
        (out / f"{name}.key").chmod(0o644)  # public: readable by whoever it is handed to
        created.append(secret)
    return created, kept


def load_key_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key (use the .key_secret file, not the .key file)")
    return public, secret


def load_public_key(path: Path) -> bytes:
    """The public key from a ``.key`` (or ``.key_secret``) file."""
    return _load(path)[0]


def _load(path: Path) -> tuple[bytes, bytes | None]:
    path = Path(path)
    try:
        info = path.stat()
    except OSError:
        raise KeyFileError(f"{path}: no such key file") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: no such key file (not a regular file)")
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: not a CurveZMQ certificate ({info.st_size} bytes; a certificate has a few hundred)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except PermissionError:
        raise KeyFileError(f"{path}: cannot be read by this process (uid {os.getuid()}); a container's user "
                           f"needs the file readable to it") from None
    except Exception as error:  # pyzmq's parser raises IndexError, ValueError, OSError ... on odd files
        raise KeyFileError(f"{path}: not a CurveZMQ certificate ({error.__class__.__name__}: {error})") from None
    for name, key in (("public", public), ("secret", secret)):
        if key is None and name == "secret":
            continue
        if not key or len(key) != 40 or not _is_z85_key(key):
            raise KeyFileError(f"{path}: not a CurveZMQ certificate (its {name} key is not 40 z85 characters)")
    return public, secret


def _is_z85_key(key: bytes) -> bool:
    try:
        return len(z85.decode(key)) == 32
    except Exception:  # pyzmq raises KeyError or ValueError for characters outside Z85
        return False


def server_keys(secret_key_file: Path) -> CurveKeys:
    public, secret = load_key_pair(secret_key_file)
    return CurveKeys(public, secret)


def client_keys(secret_key_file: Path, server_public_key_file: Path) -> CurveKeys:
    """This client's key pair (a ``.key_secret`` file, or one claimed from a directory of them: see
    :func:`claim_key_pair`) and the server's public key."""
    if Path(secret_key_file).is_dir():
        secret_key_file = claim_key_pair(Path(secret_key_file))
    public, secret = load_key_pair(secret_key_file)
    return CurveKeys(public, secret, load_public_key(server_public_key_file))


_CLAIMS: list[Any] = []  # the open files whose locks hold this process's claims, for its lifetime


def claim_key_pair(directory: Path) -> Path:
    """The first ``*.key_secret`` in ``directory`` that no other process on this machine holds, now
    held by this one (an exclusive ``flock`` on the file, released when the process ends): replicas of
    one service sharing a folder of key pairs (Compose's ``client-keys`` volume) each take a pair of
    their own, so each is a party of its own to secure aggregation; a replica that restarts takes a free
    pair again (its own, unless another took it meanwhile). KeyFileError if every pair is held."""
    import fcntl

    pairs = sorted(p for p in Path(directory).glob("*.key_secret") if p.name != f"{SERVER_KEY_NAME}.key_secret")
    if not pairs:
        raise KeyFileError(f"{directory}: holds no client key pair (*.key_secret)")
    for path in pairs:
        handle = open(path, "rb")  # noqa: SIM115 - held open: the lock lives as long as the process
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _CLAIMS.append(handle)
        log.info("using key pair %s (the first in %s no other process holds)", path.name, directory)
        return path
    raise KeyFileError(f"{directory}: all {len(pairs)} key pairs are held by other processes on this machine; one "
                       f"pair per client (make more: pyfed keys --clients N, or NUM_CLIENTS in Compose)")


class Admission:
    """The ZAP decision: is this client public key allowed in? Runs in the authenticator thread;
    the server also asks :meth:`is_authorized` from its own thread to drop revoked keys' connections."""

    RELOAD_EVERY_S = 1.0  # the directory is checked for changes at most this often

    def __init__(self, authorized_dir: Path | None, server_public: bytes):
        self.authorized_dir = Path(authorized_dir) if authorized_dir else None
        self.server_public = server_public
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = float("-inf")
        self._keys: frozenset[bytes] = frozenset()
        self._refused_files: dict[str, str] = {}  # file name -> why it was refused (logged once each)
        self.denied = 0
        self.reload_errors = 0
        if self.authorized_dir is not None:
            if not self.authorized_dir.is_dir():
                raise KeyFileError(f"{self.authorized_dir}: the authorized-keys directory does not exist")
            self._reload()
            log.info("admitting clients whose public key is in %s (%d keys)", self.authorized_dir, len(self._keys))

    @property
    def keys(self) -> frozenset[bytes]:
        """The admitted public keys (z85), as of the last reload."""
        return self._keys

    def _reload(self) -> None:
        """Re-read the directory if it changed. Files that do not parse are refused by name; if the
        directory cannot be listed at all, the previous key set stays and the error is logged."""
        try:
            entries = sorted((entry.name, entry.path) for entry in os.scandir(self.authorized_dir)
                             if entry.name.endswith(".key"))
            stamp = tuple((name, _file_stamp(path)) for name, path in entries)
        except OSError as error:
            self.reload_errors += 1
            if self.reload_errors <= 5 or self.reload_errors % 100 == 0:
                log.error("cannot read the authorized-keys directory %s (%s); keeping the %d keys read before",
                          self.authorized_dir, error, len(self._keys))
            return
        if stamp == self._stamp:
            return
        keys, refused = set(), {}
        for name, path in entries:
            try:
                keys.add(load_public_key(Path(path)))
            except KeyFileError as error:  # also a file deleted between the listing and the read
                refused[name] = str(error)
        for name, reason in refused.items():
            if self._refused_files.get(name) != reason:
                log.warning("refusing authorized key file %s", reason)
        keys.discard(self.server_public)  # the server's own public key sits beside the clients' in Compose
        self._keys, self._stamp, self._refused_files = frozenset(keys), stamp, refused

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked >= self.RELOAD_EVERY_S:
            self._checked = now
            self._reload()

    def is_authorized(self, key: bytes) -> bool:
        """Whether ``key`` (z85) is admitted now (re-reading the directory at most every second)."""
        if self.authorized_dir is None:
            return True
        with self._lock:
            self._refresh()
            return key in self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's CURVE credentials callback. It never raises: on any unexpected error the key is
        judged against the key set read before, and the error is logged."""
        if self.authorized_dir is None:
            return True
        try:
            with self._lock:
                self._checked = float("-inf")  # a new connection always sees the directory as it is now
                self._refresh()
        except Exception:  # noqa: BLE001 - the authenticator thread must outlive any surprise
            log.exception("error while re-reading %s; deciding on the keys read before", self.authorized_dir)
        allowed = key in self._keys
        if not allowed:
            self.denied += 1
            if self.denied <= 20 or self.denied % 1000 == 0:
                log.warning("refused a connection: public key %s is not in %s (%d refused so far)",
                            key.decode(errors="replace"), self.authorized_dir, self.denied)
        return allowed


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when a key file is replaced or rewritten (None: it vanished or cannot be read)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def start_authenticator(context: zmq.Context, admission: Admission) -> ThreadAuthenticator:
    """Run the ZAP handler for ``context``'s CURVE sockets; stop it with ``.stop()``."""
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("pyfed.zap"))
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=admission)
    return authenticator
