"""The building blocks of secure aggregation: SecAgg+ (Bell, Bonawitz, Gascón, Lepoint and Raykova,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020), itself built on
SecAgg (Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal and Seth, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017).

Pure logic, no I/O; the cryptography is the ``cryptography`` package's (X25519, HKDF-SHA256,
ChaCha20-Poly1305, and ChaCha20 as the mask generator): nothing here is a cipher.

- **Shamir secret sharing** (Shamir, "How to Share a Secret", CACM 1979) of 32-byte secrets over the
  prime field GF(2^521 - 1): any ``threshold`` shares give the secret back, fewer give nothing.
- **Key agreement**: each client's X25519 key pair; a pair of clients derive one 32-byte key with
  HKDF-SHA256 over their Diffie-Hellman secret, bound to the round and to what the key is for.
- **Sealing**: shares travel through the server sealed with ChaCha20-Poly1305 under the pair's key
  (the nonce is random and sent with the box); the associated data names sender, receiver and round,
  so a box cannot be replayed to another receiver or round.
- **Signed shares**: each client signs every share it deals with an Ed25519 key of the round (its
  public half advertised with its other keys), over the round, the owner, the holder, the kind and
  the share; a holder checks the signatures of the shares it receives, and the server those of the
  shares revealed to it, so a holder cannot pass off a share its owner did not deal.
- **Commitments**: a client commits to its self-mask seed (SHA-256 over the round, its id and the
  seed) when it advertises its keys, so a seed rebuilt from shares can be checked; a rebuilt mask
  key is checked against the advertised public key. A wrong rebuild names the owner who dealt it.
- **Masks**: ChaCha20's keystream under a 32-byte seed, read as unsigned integers of the ring Z_{2^b}.
- **Quantisation**: a float clipped to [-c, c] becomes an integer in [0, R] by stochastic rounding
  (unbiased: its expectation is the float's exact place), R = 2^quantisation_bits - 1; a sum of
  integers is turned back by the same affine map, given how many (or how much weight) went in.
- **The neighbour graph** of SecAgg+: a Harary graph H(k, n) over a random order of the clients, each
  client's k neighbours the k/2 before and after it on the cycle; with k >= n - 1, everyone.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pyfed.wire.protocol import SECAGG_KEY_BYTES, SECAGG_SHARE_BYTES, SECAGG_SIGNATURE_BYTES

FIELD_PRIME = 2**521 - 1  # a Mersenne prime, above every 32-byte secret
SECRET_BYTES = 32
SHARE_BYTES = SECAGG_SHARE_BYTES  # an element of GF(2^521 - 1)
PUBLIC_KEY_BYTES = SECAGG_KEY_BYTES
SIGNATURE_BYTES = SECAGG_SIGNATURE_BYTES
COMMITMENT_BYTES = 32
NONCE_BYTES = 12
MAX_RING_BITS = 64


class SecAggError(ValueError):
    """Something received for secure aggregation is malformed or does not verify; says what."""


# --- Shamir secret sharing -------------------------------------------------------------------------

def share_secret(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Split ``secret`` (32 bytes) so that any ``threshold`` of ``holders`` (distinct positive
    numbers, the x of each share) can rebuild it; returns holder -> share."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if len(set(holders)) != len(holders) or any(not 0 < x < FIELD_PRIME for x in holders):
        raise SecAggError("share holders must be distinct positive numbers")
    if not 1 <= threshold <= len(holders):
        raise SecAggError(f"the threshold must be between 1 and {len(holders)} holders, not {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % FIELD_PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def rebuild_secret(shares: dict[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0). Wrong shares give
    a wrong secret, not an error: shares are authenticated by the sealing they travel in."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot rebuild a secret shared with threshold {threshold}")
    points = []
    for x, share in list(shares.items())[:threshold]:
        if len(share) != SHARE_BYTES:
            raise SecAggError(f"a share is {SHARE_BYTES} bytes, not {len(share)}")
        y = int.from_bytes(share, "big")
        if not 0 < x < FIELD_PRIME or y >= FIELD_PRIME:
            raise SecAggError("a share is not an element of the field")
        points.append((x, y))
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-x_j) % FIELD_PRIME
                denominator = denominator * (x_i - x_j) % FIELD_PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, FIELD_PRIME)) % FIELD_PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("the shares do not rebuild a 32-byte secret (a share is wrong)")
    return secret.to_bytes(SECRET_BYTES, "big")


# --- keys, agreement, sealing ------------------------------------------------------------------------

class KeyPair:
    """One X25519 key pair, new for each round (a key never outlives the round it masks)."""

    def __init__(self, private: bytes | None = None) -> None:
        if private is not None and len(private) != SECRET_BYTES:
            raise SecAggError(f"a private key is {SECRET_BYTES} bytes, not {len(private)}")
        self._private = X25519PrivateKey.generate() if private is None else X25519PrivateKey.from_private_bytes(private)
        self.public = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                               serialization.PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        """The private key, to be secret-shared (the server rebuilds it only for a client that dropped)."""
        return self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())

    def agree(self, peer_public: bytes, context: bytes) -> bytes:
        """The 32-byte key this pair shares with ``peer_public`` for ``context`` (HKDF-SHA256)."""
        if len(peer_public) != PUBLIC_KEY_BYTES:
            raise SecAggError(f"a public key is {PUBLIC_KEY_BYTES} bytes, not {len(peer_public)}")
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as error:  # the all-zero result of a small-order point
            raise SecAggError(f"the peer's public key is not usable ({error})") from None
        return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None,
                    info=b"pyfed-secagg:" + context).derive(shared)


class SigningKey:
    """One Ed25519 key pair, new for each round: its owner signs the shares it deals with it."""

    def __init__(self) -> None:
        self._private = Ed25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                               serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


def check_signing_key(public: bytes) -> None:
    """SecAggError unless ``public`` is an Ed25519 public key (32 bytes encoding a curve point)."""
    if len(public) != PUBLIC_KEY_BYTES:
        raise SecAggError(f"a signing key is {PUBLIC_KEY_BYTES} bytes, not {len(public)}")
    try:
        Ed25519PublicKey.from_public_bytes(public)
    except ValueError as error:
        raise SecAggError(f"a signing key is not an Ed25519 public key ({error})") from None


def signature_holds(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message``."""
    if len(signature) != SIGNATURE_BYTES or len(public) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def commit(secret: bytes, binding: bytes) -> bytes:
    """A commitment to a 32-byte random ``secret``, bound to ``binding`` (the round and the owner):
    SHA-256 of both. Hiding because the secret has 256 random bits; binding by SHA-256."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    return hashlib.sha256(b"pyfed-secagg-commitment|" + binding + b"|" + secret).digest()


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """``plaintext`` encrypted and authenticated under ``key``, bound to ``associated``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, box: bytes, associated: bytes) -> bytes:
    """What :func:`seal` sealed; SecAggError if it was altered, or sealed for other associated data."""
    if len(box) < NONCE_BYTES + 16:
        raise SecAggError(f"a sealed box is at least {NONCE_BYTES + 16} bytes, not {len(box)}")
    try:
        return ChaCha20Poly1305(key).decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggError("a sealed box does not verify (altered, or not for this receiver and round)") from None


# --- masks and the ring ------------------------------------------------------------------------------

def ring_mask(bits: int) -> np.uint64:
    if not 1 <= bits <= MAX_RING_BITS:
        raise SecAggError(f"the ring has between 1 and {MAX_RING_BITS} bits, not {bits}")
    return np.uint64(2**bits - 1)


def expand_mask(seed: bytes, count: int, bits: int, *, offset: int = 0) -> np.ndarray:
    """Elements ``offset`` .. ``offset + count`` of the mask that ``seed`` stands for: ChaCha20's
    keystream as little-endian 64-bit words, reduced to the ring Z_{2^bits}. Any slice of the mask
    can be made on its own, so a long vector can be masked a chunk at a time."""
    if len(seed) != SECRET_BYTES:
        raise SecAggError(f"a mask seed is {SECRET_BYTES} bytes, not {len(seed)}")
    block, skip = divmod(offset * 8, 64)  # ChaCha20 counts 64-byte blocks
    nonce = block.to_bytes(8, "little") + bytes(8)  # the 16-byte IV: block counter, then nonce
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    raw = stream.update(bytes(skip + count * 8))[skip:]
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64) & ring_mask(bits)


def quantise(values: np.ndarray, clip: float, quantisation_bits: int, rng: np.random.Generator) -> np.ndarray:
    """Floats clipped to [-clip, clip], as integers in [0, 2^quantisation_bits - 1] by stochastic
    rounding (unbiased). NaN is refused, not quantised."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise SecAggError("an update to quantise holds NaN or infinity")
    top = float(2**quantisation_bits - 1)
    scaled = (np.clip(values, -clip, clip) + clip) * (top / (2 * clip))
    floor = np.floor(scaled)
    return (floor + (rng.random(scaled.shape) < scaled - floor)).astype(np.uint64)


def dequantise(total: np.ndarray, clip: float, quantisation_bits: int, weight: float) -> np.ndarray:
    """The sum of ``weight`` quantised values (or weighted: sum of w_i * q_i with sum w_i = weight),
    as the sum of the floats they stand for."""
    top = float(2**quantisation_bits - 1)
    return np.asarray(total, dtype=np.float64) * (2 * clip / top) - clip * weight


# --- the neighbour graph -----------------------------------------------------------------------------

def neighbours(clients: Sequence[str], degree: int, order_seed: bytes) -> dict[str, list[str]]:
    """Each client's neighbours in the Harary graph H(degree, n) over the clients put in a random
    order (by ``order_seed``): the degree/2 before and after it on a cycle. degree >= n - 1: all."""
    ordered = sorted(clients, key=lambda cid: hashlib.sha256(order_seed + cid.encode()).digest())
    n = len(ordered)
    if degree >= n - 1:
        return {cid: [other for other in ordered if other != cid] for cid in ordered}
    half = max(1, degree // 2)
    graph = {}
    for index, cid in enumerate(ordered):
        near = {ordered[(index + step) % n] for step in range(-half, half + 1) if step}
        graph[cid] = sorted(near)
    return graph
