"""Compressed arrays on the wire: pure functions, no I/O.

A client's update travels as its change from the global model (``delta``), one encoding per model
array, each encoding a fixed list of frames the receiver can check against the model before it
trusts them:

* ``fp16``: the delta in IEEE half precision, one frame of the array's shape (relative error at
  most 2^-11 per element; a delta beyond half precision's range is refused by the encoder).
* ``int8``: per block of :data:`INT8_BLOCK` elements, a scale ``s = max|x| / 127`` (a float32 frame
  of one scale per block) and ``q = floor(x / s + u)``, ``u ~ U[0, 1)`` (an int8 frame of the
  array's shape): stochastic rounding, so ``E[q s] = x`` and ``|q s - x| < s`` for every element
  (QSGD, Alistarh, Grubic, Li, Tomioka and Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
  Quantization and Encoding", NeurIPS 2017, arXiv:1610.02132, with one level per step of s).
* ``topk``: the ``k = ceil(fraction * size)`` largest-magnitude elements of the array, as sorted
  flat indices (uint32) and their values (float32); with error feedback on the client
  (:class:`ErrorFeedback`): what was not sent is added to the next round's delta, so the sent
  updates add up to the true ones over rounds (Stich, Cordonnier and Jaggi, "Sparsified SGD with
  Memory", NeurIPS 2018, arXiv:1809.07599; Aji and Heafield, "Sparse Communication for Distributed
  Gradient Descent", EMNLP 2017, arXiv:1704.05021).

The receiver folds an encoded array straight into a running float64 sum, a chunk at a time
(:func:`fold`), so no dense float copy of an update is made beyond the sum itself.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from enum import Enum

import numpy as np

INT8_BLOCK = 4096  # elements per int8 scale: 4 bytes of scale per 4 KiB of values
INT8_LEVELS = 127  # q in [-127, 127]
FOLD_CHUNK = 262_144  # elements folded at a time (a multiple of INT8_BLOCK)
FP16_MAX = float(np.finfo(np.float16).max)
#: The largest int8 scale an encoder makes: max|x| / 127 for a float32 change x. A larger scale stands
#: for values float32 cannot hold (the review's scale of 3e38 decoded to infinity).
INT8_MAX_SCALE = float(np.finfo(np.float32).max) / INT8_LEVELS

ArraySpec = tuple[str, tuple[int, ...]]


class UpdateCompression(str, Enum):
    """How a client's update travels to the server."""

    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"
    TOPK = "topk"


class BroadcastCompression(str, Enum):
    """How the global model travels to the clients."""

    NONE = "none"
    FP16 = "fp16"


class CompressionError(ValueError):
    """An encoded array that does not fit its model array, or an array that cannot be encoded."""


def topk_count(size: int, fraction: float) -> int:
    """How many elements top-k keeps of an array of ``size``: ``ceil(fraction * size)``, at least one."""
    if not 0 < fraction <= 1:
        raise CompressionError(f"the top-k fraction must be in (0, 1], got {fraction}")
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def int8_blocks(size: int) -> int:
    return -(-size // INT8_BLOCK)


def frame_specs(codec: UpdateCompression | BroadcastCompression, spec: ArraySpec,
                topk_fraction: float = 0.01) -> list[ArraySpec]:
    """The frames an array of ``spec`` (dtype, shape) is encoded into: what a receiver expects."""
    dtype, shape = spec
    size = math.prod(shape)
    codec = UpdateCompression(codec.value)
    if codec is UpdateCompression.NONE:
        return [(dtype, tuple(shape))]
    if codec is UpdateCompression.FP16:
        return [("float16", tuple(shape))]
    if codec is UpdateCompression.INT8:
        return [("int8", tuple(shape)), ("float32", (int8_blocks(size),))]
    k = topk_count(size, topk_fraction)
    return [("uint32", (k,)), ("float32", (k,))]


def compressible(spec: ArraySpec) -> bool:
    """Only floating-point arrays are compressed; integer arrays (counters, step numbers) travel as they are."""
    return np.dtype(spec[0]).kind == "f"


def encode(delta: np.ndarray, codec: UpdateCompression | BroadcastCompression, rng: np.random.Generator,
           topk_fraction: float = 0.01) -> list[np.ndarray]:
    """``delta`` (one array) as the frames of ``codec``; see the module docstring."""
    codec = UpdateCompression(codec.value)
    if codec is UpdateCompression.NONE or not compressible((delta.dtype.str, delta.shape)):
        return [delta]
    flat = np.asarray(delta, np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        raise CompressionError("cannot encode an array holding NaN or Inf")
    if codec is UpdateCompression.FP16:
        if flat.size and float(np.abs(flat).max()) > FP16_MAX:
            raise CompressionError(f"a value of magnitude {float(np.abs(flat).max()):.3g} is beyond half precision "
                                   f"({FP16_MAX:g}); use another encoding")
        return [flat.astype(np.float16).reshape(delta.shape)]
    if codec is UpdateCompression.INT8:
        return _encode_int8(flat, delta.shape, rng)
    k = topk_count(flat.size, topk_fraction)
    if k == 0:
        return [np.zeros(0, np.uint32), np.zeros(0, np.float32)]
    chosen = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:] if k < flat.size else np.arange(flat.size)
    chosen.sort()
    return [chosen.astype(np.uint32), flat[chosen]]


def _encode_int8(flat: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> list[np.ndarray]:
    blocks = int8_blocks(flat.size)
    padded = np.zeros(blocks * INT8_BLOCK, np.float32)
    padded[: flat.size] = flat
    by_block = padded.reshape(blocks, INT8_BLOCK)
    scales = (np.abs(by_block).max(axis=1) / INT8_LEVELS).astype(np.float32)
    safe = np.where(scales > 0, scales, 1).astype(np.float32)
    scaled = by_block / safe[:, None]
    q = np.floor(scaled + rng.random(scaled.shape, np.float32))
    np.clip(q, -INT8_LEVELS, INT8_LEVELS, out=q)  # float rounding at exactly +-127 + u
    return [q.reshape(-1)[: flat.size].astype(np.int8).reshape(shape), scales]


def check(frames: Sequence[np.ndarray], codec: UpdateCompression | BroadcastCompression, spec: ArraySpec,
          topk_fraction: float = 0.01) -> None:
    """Raise :class:`CompressionError` unless ``frames`` are a well-formed encoding of an array of ``spec``."""
    codec = UpdateCompression(codec.value)
    if not compressible(spec):
        codec = UpdateCompression.NONE
    expected = frame_specs(codec, spec, topk_fraction)
    if len(frames) != len(expected):
        raise CompressionError(f"{codec.value} encodes an array in {len(expected)} frame(s), got {len(frames)}")
    for frame, (dtype, shape) in zip(frames, expected):
        if frame.dtype != np.dtype(dtype) or tuple(frame.shape) != tuple(shape):
            raise CompressionError(f"{codec.value} of a {spec[0]}{list(spec[1])} array needs {dtype}{list(shape)}, "
                                   f"got {frame.dtype}{list(frame.shape)}")
    if codec is UpdateCompression.NONE:
        return
    values = frames[0] if codec is UpdateCompression.FP16 else frames[1]
    if not np.isfinite(values).all():
        raise CompressionError(f"{codec.value} values hold NaN or Inf")
    if codec is UpdateCompression.INT8:
        if (frames[1] < 0).any():
            raise CompressionError("int8 scales must not be negative")
        if (frames[1] > INT8_MAX_SCALE).any():
            raise CompressionError(f"an int8 scale of {float(frames[1].max()):.3g} stands for values beyond float32 "
                                   f"(at most {INT8_MAX_SCALE:.3g})")
        if (frames[0] == -128).any():
            raise CompressionError(f"int8 values lie in [-{INT8_LEVELS}, {INT8_LEVELS}]; -128 is not one")
    if codec is UpdateCompression.TOPK and frames[0].size:
        indices = frames[0]
        if int(indices[-1]) >= math.prod(spec[1]):
            raise CompressionError(f"top-k index {int(indices[-1])} is outside an array of {math.prod(spec[1])}")
        if frames[0].size > 1 and not (np.diff(indices.astype(np.int64)) > 0).all():
            raise CompressionError("top-k indices must be strictly increasing (sorted, each once)")


def fold(total: np.ndarray, frames: Sequence[np.ndarray], codec: UpdateCompression | BroadcastCompression,
         weight: float, scratch: np.ndarray) -> None:
    """``total += weight * decode(frames)`` in place, a chunk at a time (``total`` flat float64;
    ``scratch`` float64 of at least ``min(FOLD_CHUNK, total.size)`` elements). ``frames`` must have
    passed :func:`check`."""
    codec = UpdateCompression(codec.value)
    w = np.float64(weight)
    if codec is UpdateCompression.TOPK:
        indices, values = frames
        total[indices] += w * values.astype(np.float64)  # k elements: the indices are unique (checked)
        return
    values = frames[0].reshape(-1)
    for start in range(0, total.size, FOLD_CHUNK):
        stop = min(start + FOLD_CHUNK, total.size)
        part = scratch[: stop - start]
        np.multiply(values[start:stop], w, out=part)
        if codec is UpdateCompression.INT8:
            block_scales = frames[1][start // INT8_BLOCK: -(-stop // INT8_BLOCK)]
            part *= np.repeat(block_scales.astype(np.float64), INT8_BLOCK)[: stop - start]
        total[start:stop] += part


def squared_norm(frames: Sequence[np.ndarray], codec: UpdateCompression | BroadcastCompression) -> float:
    """The squared L2 norm of the change ``frames`` encode, in float64, a chunk at a time (no dense
    copy). ``frames`` must have passed :func:`check`."""
    codec = UpdateCompression(codec.value)
    if codec is UpdateCompression.TOPK:
        values = frames[1].astype(np.float64)
        return float(np.dot(values, values))
    total = 0.0
    values = frames[0].reshape(-1)
    scratch = np.empty(min(FOLD_CHUNK, max(values.size, 1)), np.float64)
    for start in range(0, values.size, FOLD_CHUNK):
        stop = min(start + FOLD_CHUNK, values.size)
        part = scratch[: stop - start]
        part[:] = values[start:stop]
        if codec is UpdateCompression.INT8:
            part *= np.repeat(frames[1][start // INT8_BLOCK: -(-stop // INT8_BLOCK)].astype(np.float64),
                              INT8_BLOCK)[: stop - start]
        total += float(np.dot(part, part))
    return total


def why_decoded_unusable(base: np.ndarray, frames: Sequence[np.ndarray],
                         codec: UpdateCompression | BroadcastCompression) -> str | None:
    """Why ``base + decode(frames)`` (the weights an encoded change stands for) does not hold finite
    values of ``base``'s dtype, or None: checked a chunk at a time, no dense copy. ``frames`` must
    have passed :func:`check`."""
    codec = UpdateCompression(codec.value)
    limit = float(np.finfo(base.dtype).max)
    flat = np.asarray(base).reshape(-1)
    if codec is UpdateCompression.TOPK:
        indices, values = frames
        moved = flat[indices].astype(np.float64) + values.astype(np.float64)
        bad = np.flatnonzero(~(np.abs(moved) <= limit))
        return (f"element {int(indices[bad[0]])} decodes to {float(moved[bad[0]]):.3g}, beyond {base.dtype}"
                if bad.size else None)
    scratch = np.empty(min(FOLD_CHUNK, max(flat.size, 1)), np.float64)
    for start in range(0, flat.size, FOLD_CHUNK):
        stop = min(start + FOLD_CHUNK, flat.size)
        part = scratch[: stop - start]
        part[:] = frames[0].reshape(-1)[start:stop]
        if codec is UpdateCompression.INT8:
            block_scales = frames[1][start // INT8_BLOCK: -(-stop // INT8_BLOCK)]
            part *= np.repeat(block_scales.astype(np.float64), INT8_BLOCK)[: stop - start]
        part += flat[start:stop]
        bad = np.flatnonzero(~(np.abs(part) <= limit))
        if bad.size:
            return f"element {start + int(bad[0])} decodes to {float(part[bad[0]]):.3g}, beyond {base.dtype}"
    return None


def decode(frames: Sequence[np.ndarray], codec: UpdateCompression | BroadcastCompression,
           spec: ArraySpec) -> np.ndarray:
    """The dense array (of ``spec``'s dtype and shape) that ``frames`` encode (checked first)."""
    check_codec = UpdateCompression(codec.value)
    dtype, shape = spec
    if check_codec is UpdateCompression.NONE or not compressible(spec):
        return frames[0]
    total = np.zeros(math.prod(shape), np.float64)
    fold(total, frames, check_codec, 1.0, np.empty(min(FOLD_CHUNK, max(total.size, 1)), np.float64))
    return total.astype(dtype).reshape(shape)


def encoded_bytes(frames: Sequence[np.ndarray]) -> int:
    return sum(int(frame.nbytes) for frame in frames)


class ErrorFeedback:
    """A client's top-k memory: what it did not send is added to its next delta (Stich et al. 2018).

    Held in memory only, for one federation run and one client id (``key``): a different key (a
    new run, a new id after a rejoin) or a model of other shapes starts from zero, so a residual is
    never added to a model it was not made against. Nothing of it is saved.
    """

    def __init__(self) -> None:
        self._key: object = None
        self._residual: list[np.ndarray] | None = None

    def reset(self) -> None:
        self._key, self._residual = None, None

    def encode(self, key: object, deltas: Sequence[np.ndarray], fraction: float,
               rng: np.random.Generator) -> list[list[np.ndarray]]:
        """Each delta plus its residual, top-k encoded; the residuals become what was left out."""
        shapes = [d.shape for d in deltas]
        if key != self._key or self._residual is None or [r.shape for r in self._residual] != shapes:
            self._key, self._residual = key, [np.zeros(s, np.float32) for s in shapes]
        encoded = []
        for index, delta in enumerate(deltas):
            if not compressible((delta.dtype.str, delta.shape)):
                encoded.append([delta])
                continue
            corrected = (self._residual[index] + np.asarray(delta, np.float32)).astype(np.float32)
            frames = encode(corrected, UpdateCompression.TOPK, rng, fraction)
            flat = corrected.reshape(-1)
            flat[frames[0]] = 0  # what was sent leaves the residual
            self._residual[index] = corrected
            encoded.append(frames)
        return encoded


def encoded_specs(codec: UpdateCompression | BroadcastCompression, specs: Sequence[ArraySpec],
                  topk_fraction: float = 0.01) -> list[ArraySpec]:
    """The frames, in order, of a whole model of ``specs`` under ``codec`` (integer arrays as they are)."""
    return [frame for spec in specs
            for frame in frame_specs(codec if compressible(spec) else UpdateCompression.NONE, spec, topk_fraction)]


def encoded_bytes_of(codec: UpdateCompression | BroadcastCompression, specs: Sequence[ArraySpec],
                     topk_fraction: float = 0.01) -> int:
    """The bytes of a whole model of ``specs`` under ``codec``: what one update's arrays are on the wire."""
    return sum(np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in encoded_specs(codec, specs, topk_fraction))


def split(frames: Sequence[np.ndarray], codec: UpdateCompression | BroadcastCompression, specs: Sequence[ArraySpec],
          topk_fraction: float = 0.01) -> list[list[np.ndarray]]:
    """``frames`` grouped by model array, each group checked (:class:`CompressionError` naming the array)."""
    groups, at = [], 0
    for index, spec in enumerate(specs):
        count = len(frame_specs(codec if compressible(spec) else UpdateCompression.NONE, spec, topk_fraction))
        group = list(frames[at: at + count])
        at += count
        try:
            check(group, codec, spec, topk_fraction)
        except CompressionError as error:
            raise CompressionError(f"array {index}: {error}") from None
        groups.append(group)
    if at != len(frames):
        raise CompressionError(f"{codec.value} of this model is {at} frames, got {len(frames)}")
    return groups


def encode_update(trained: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], codec: UpdateCompression,
                  rng: np.random.Generator, *, topk_fraction: float = 0.01, feedback: ErrorFeedback | None = None,
                  key: object = None) -> list[np.ndarray]:
    """A client's trained model as the frames of an UPDATE under ``codec``: each float array's change
    from ``global_weights`` encoded (top-k through ``feedback``, keyed by run and client), integer
    arrays as they are. ``none``: the trained arrays themselves."""
    codec = UpdateCompression(codec)
    if codec is UpdateCompression.NONE:
        return list(trained)
    changes = [np.subtract(t, g, dtype=np.float32) if compressible((g.dtype.str, g.shape)) else t
               for t, g in zip(trained, global_weights)]
    if codec is UpdateCompression.TOPK:
        groups = (feedback or ErrorFeedback()).encode(key, changes, topk_fraction, rng)
    else:
        groups = [encode(c, codec, rng, topk_fraction) for c in changes]
    return [frame for group in groups for frame in group]


class UpdateEncoder:
    """One client's side of update compression: its top-k memory and its rounding randomness (from
    the operating system: a known seed would tell the server the rounding)."""

    def __init__(self) -> None:
        self.feedback = ErrorFeedback()
        self._rng = np.random.default_rng(secrets.randbits(128))

    def encode(self, trained: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], codec: str,
               topk_fraction: float, key: object) -> tuple[list[np.ndarray], dict[str, str]]:
        """The UPDATE's arrays and the body field that declares their encoding (none: no field)."""
        codec = UpdateCompression(codec)
        if codec is UpdateCompression.NONE:
            return list(trained), {}
        return (encode_update(trained, global_weights, codec, self._rng, topk_fraction=topk_fraction,
                              feedback=self.feedback, key=key), {"encoding": codec.value})


def encode_broadcast(weights: Sequence[np.ndarray], codec: BroadcastCompression | str) -> list[np.ndarray]:
    """The global model as the server sends it: ``fp16`` halves each float array (integer arrays as
    they are); ``none``: the arrays themselves. One encoding serves every client of a round."""
    codec = BroadcastCompression(codec)
    if codec is BroadcastCompression.NONE:
        return list(weights)
    encoded = []
    for index, array in enumerate(weights):
        if not compressible((array.dtype.str, array.shape)):
            encoded.append(array)
            continue
        try:
            encoded.append(encode(array, codec, np.random.default_rng(0))[0])  # fp16: deterministic, no rng drawn
        except CompressionError as error:
            raise CompressionError(f"global array {index}: {error}") from None
    return encoded


def broadcast(weights: Sequence[np.ndarray], codec: BroadcastCompression | str
              ) -> tuple[list[np.ndarray], BroadcastCompression, str | None]:
    """The global model as it goes out this round: encoded under ``codec`` when it can be, else its
    arrays as they are (a weight beyond half precision's range: fp16 cannot hold this model, so
    this round's model travels in full precision). Returns (arrays, the codec used, why not ``codec``)."""
    codec = BroadcastCompression(codec)
    try:
        return encode_broadcast(weights, codec), codec, None
    except CompressionError as error:
        return list(weights), BroadcastCompression.NONE, str(error)


def decode_broadcast(arrays: Sequence[np.ndarray], codec: BroadcastCompression | str,
                     specs: Sequence[ArraySpec]) -> list[np.ndarray]:
    """The global model from what the server sent under ``codec``, checked against the model's
    ``specs`` (:class:`CompressionError` naming the array), in the model's dtypes."""
    codec = BroadcastCompression(codec)
    if len(arrays) != len(specs):
        raise CompressionError(f"expected {len(specs)} arrays (the model's), got {len(arrays)}")
    decoded = []
    for index, (array, spec) in enumerate(zip(arrays, specs)):
        try:
            check([array], codec, spec)
        except CompressionError as error:
            raise CompressionError(f"array {index}: {error}") from None
        decoded.append(array.astype(spec[0]) if compressible(spec) else array)
    return decoded


def as_received(weights: Sequence[np.ndarray], codec: BroadcastCompression | str) -> list[np.ndarray]:
    """The global model as a client decodes it after a broadcast under ``codec`` (for in-process clients)."""
    arrays, used, _ = broadcast(weights, codec)
    if used is BroadcastCompression.NONE:
        return arrays
    return decode_broadcast(arrays, used, [(a.dtype.str.lstrip("<>|="), a.shape) for a in weights])
