"""CurveZMQ keys and client admission.

Keys are pyzmq's certificate files (``zmq.auth``): ``NAME.key`` holds a public key,
``NAME.key_secret`` the pair. ``pyfed keys`` writes a server pair and one pair per client.

The server encrypts every connection with its secret key and runs a ZAP handler
(:class:`Admission`, in pyzmq's authenticator thread) that admits a client only if its public
key is one of the ``*.key`` files in the authorized-keys directory (or any key, without one).
The directory is re-read when it changes, so adding a client's key needs no restart. The
admitted key travels with every message (ZeroMQ's ``User-Id`` property); the server binds each
client id to the key that first claimed it, so no client can act as another.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("pyfed.security")

SERVER_KEY_NAME = "server"


class KeyFileError(ValueError):
    """A key file is missing or not a CurveZMQ certificate; the message names it."""


@dataclass(frozen=True)
class CurveKeys:
    """A CurveZMQ key pair (z85 bytes), plus, for a client, the server's public key."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None


def client_key_name(index: int) -> str:
    return f"client-{index}"


def generate_keys(out: Path, clients: int) -> tuple[list[Path], list[Path]]:
    """Create ``server.key[_secret]`` and ``client-<i>.key[_secret]`` (i = 1..clients) in ``out``.

    Existing pairs are kept, never overwritten (a new server key would lock every client out).
    Returns (created, kept) secret-key paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    created, kept = [], []
    for name in [SERVER_KEY_NAME, *(client_key_name(i) for i in range(1, clients + 1))]:
        secret = out / f"{name}.key_secret"
        if secret.exists() and (out / f"{name}.key").exists():
            load_key_pair(secret)  # an existing pair must be readable, or we say so now
            kept.append(secret)
            continue
        zmq.auth.create_certificates(str(out), name)
        secret.chmod(0o600)
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
    if not path.is_file():
        raise KeyFileError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as error:
        raise KeyFileError(f"{path}: not a CurveZMQ certificate ({error})") from None
    if not public or len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeyFileError(f"{path}: not a CurveZMQ certificate (keys must be 40 z85 characters)")
    return public, secret


def server_keys(secret_key_file: Path) -> CurveKeys:
    public, secret = load_key_pair(secret_key_file)
    return CurveKeys(public, secret)


def client_keys(secret_key_file: Path, server_public_key_file: Path) -> CurveKeys:
    public, secret = load_key_pair(secret_key_file)
    return CurveKeys(public, secret, load_public_key(server_public_key_file))


class Admission:
    """The ZAP decision: is this client public key allowed in? Runs in the authenticator thread."""

    def __init__(self, authorized_dir: Path | None, server_public: bytes):
        self.authorized_dir = Path(authorized_dir) if authorized_dir else None
        self.server_public = server_public
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._keys: frozenset[bytes] = frozenset()
        self.denied = 0
        if self.authorized_dir is not None:
            if not self.authorized_dir.is_dir():
                raise KeyFileError(f"{self.authorized_dir}: the authorized-keys directory does not exist")
            self._reload()
            log.info("admitting clients whose public key is in %s (%d keys)", self.authorized_dir, len(self._keys))

    def _reload(self) -> None:
        files = sorted(self.authorized_dir.glob("*.key"))
        stamp = tuple((f.name, f.stat().st_mtime_ns) for f in files)
        if stamp == self._stamp:
            return
        keys = set()
        for file in files:
            try:
                keys.add(load_public_key(file))
            except KeyFileError as error:
                log.warning("ignoring authorized key: %s", error)
        keys.discard(self.server_public)  # the server's own public key sits beside the clients' in Compose
        self._keys, self._stamp = frozenset(keys), stamp

    def callback(self, domain: str, key: bytes) -> bool:
        if self.authorized_dir is None:
            return True
        with self._lock:
            self._reload()
            allowed = key in self._keys
        if not allowed:
            self.denied += 1
            if self.denied <= 20 or self.denied % 1000 == 0:
                log.warning("refused a connection: public key %s is not in %s (%d refused so far)",
                            key.decode(errors="replace"), self.authorized_dir, self.denied)
        return allowed


def start_authenticator(context: zmq.Context, admission: Admission) -> ThreadAuthenticator:
    """Run the ZAP handler for ``context``'s CURVE sockets; stop it with ``.stop()``."""
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("pyfed.zap"))
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=admission)
    return authenticator
