"""PyFed's wire protocol: one versioned JSON header frame, then one raw frame per numpy array.

A message is a ZeroMQ multipart message::

    frame 0   UTF-8 JSON header: {"v": 1, "type": "...", "round": 0, "client_id": "...",
              "arrays": [["float32", [784, 500]], ...], "body": {...}}
    frame 1.. the raw little-endian bytes of each array, in manifest order

The manifest gives every array's dtype and shape, so a receiver knows each frame's exact size
before it looks at it and can wrap the frame's buffer with ``np.frombuffer`` without a copy.
Nothing here is pickled or evaluated: the header is JSON, the arrays are plain bytes, and every
field is checked against an explicit schema. This module does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from pyfed.ranges import Range
from pyfed.wire import compression
from pyfed.wire import chunks
from pyfed.wire.chunks import CHUNK_BYTES
from pyfed.wire.compression import BroadcastCompression, UpdateCompression

#: 2: FIT and UPDATE carry the round's attempt number, so a resent FIT and its answer are matched
PROTOCOL_VERSION = 3

#: dtypes allowed on the wire; always little-endian.
ALLOWED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
     "uint8", "uint16", "uint32", "uint64", "bool"}
)
MAX_NDIM = 8
#: Matched with ``fullmatch`` only (:func:`is_client_id`): ``$`` with ``match`` lets a trailing newline through.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: At most this many training metrics travel with an update (Keras' loss, accuracy, and a few more).
MAX_HISTORY_METRICS = 32
MAX_EPOCHS = 100_000

#: An array's description on the wire: (dtype name, shape).
ArraySpec = tuple[str, tuple[int, ...]]


class MessageType(str, enum.Enum):
    """Every kind of message; the direction is in the docstring of each body schema below."""

    JOIN = "join"
    WELCOME = "welcome"
    FIT = "fit"
    UPDATE = "update"
    EVALUATE = "evaluate"
    EVALUATION = "evaluation"
    FINISH = "finish"
    STOPPING = "stopping"
    ERROR = "error"
    LEAVE = "leave"
    # flow control of uploads (federation/uploads.py): an update waits for its grant
    UPLOAD_READY = "upload_ready"
    UPLOAD_GRANT = "upload_grant"
    UPDATE_CHUNK = "update_chunk"  # a large UPDATE's arrays, in order (wire/chunks.py)
    # secure aggregation (SecAgg+, federation/secure_aggregation.py): the stages after a FIT with "secagg"
    SECAGG_KEYS = "secagg_keys"
    SECAGG_ROSTER = "secagg_roster"
    SECAGG_SHARES = "secagg_shares"
    SECAGG_BOXES = "secagg_boxes"
    SECAGG_MASKED = "secagg_masked"
    SECAGG_UNMASK = "secagg_unmask"
    SECAGG_REVEAL = "secagg_reveal"
    # site statistics, before round 1 (federation/moments.py): feature scaling from every site's data
    STATS = "stats"
    MOMENTS = "moments"


class ErrorCode(enum.StrEnum):
    """Why the server refused a message (the ``code`` of an ERROR): the one list the server, the
    registry and the client share."""

    # a JOIN that is not admitted
    ID_TAKEN = "id_taken"  # the id is in use by a connected client (retry once it is gone)
    ID_BOUND_TO_KEY = "id_bound_to_key"  # the id belongs to another client's key
    ALREADY_JOINED = "already_joined"  # this peer joined under another id
    JOIN_FLOOD = "join_flood"  # a joined peer repeats JOIN too often (retry later)
    BUSY = "busy"  # too many joins right now (retry later)
    NO_SHARDS = "no_shards"  # every data shard is taken (this client is not needed)
    NO_ID = "no_id"  # a client with its own data must name itself when the server hands out shards
    TOO_MANY_IDS = "too_many_ids"  # this key holds the most ids one key may
    TOO_MANY_EXAMPLES = "too_many_examples"  # it declares more examples than --max-examples
    # a message that is not taken
    BAD_MESSAGE = "bad_message"  # it breaks the protocol
    BAD_REPLY = "bad_reply"  # a well-formed answer that cannot be used (stale, unasked, NaN, too long a history)
    NOT_JOINED = "not_joined"  # from a peer that has not joined (the server restarted: join again)
    WRONG_CLIENT_ID = "wrong_client_id"  # it claims another client's id
    WRONG_KEY = "wrong_key"  # it came with another CURVE key than its client's
    KEY_REVOKED = "key_revoked"  # its key is no longer authorized
    UNEXPECTED_TYPE = "unexpected_type"  # a message type only servers send


#: Refusals that go away by themselves: the client asks again after a backoff.
RETRYABLE_REFUSALS = frozenset({ErrorCode.ID_TAKEN, ErrorCode.BUSY, ErrorCode.JOIN_FLOOD})


class ConnectionEvent(enum.StrEnum):
    """What a client's transport reports about its connection to the server."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    REFUSED = "refused"  # the server refused the handshake (a key not admitted, or one side without CURVE)
    #: the handshake failed with no reason given: a wrong server key looks the same as a connection
    #: closed mid-handshake (a server restarting behind a port proxy), so it may pass
    HANDSHAKE_FAILED = "handshake failed"


class StatsKind(enum.StrEnum):
    """What a STATS request asks a site to summarise. FEATURES: the per-feature moments of its
    training examples, which the server pools into the model's feature scaling. BATCH_NORM: the
    per-channel moments of what one BatchNormalization layer (``layer``, counted in the model's
    order) receives when the weights the request carries run over the site's training examples,
    which the server pools into that layer's moving mean and variance."""

    FEATURES = "features"
    BATCH_NORM = "batch_norm"


#: the most values a MOMENTS message may carry per field (features of tabular data)
MAX_MOMENT_VALUES = 65_536


class LocalLayers(enum.StrEnum):
    """Which of the model's layers each site keeps for itself instead of taking the global model's
    (sent in the plan). BATCHNORM: FedBN (Li et al., ICLR 2021), every BatchNormalization layer's
    scale, offset and moving statistics stay at the site."""

    NONE = "none"
    BATCHNORM = "batchnorm"


class Delivery(enum.Enum):
    """What became of a message handed to the server's socket; true only when it was queued."""

    SENT = "sent"
    CONGESTED = "congested"  # the peer is connected but its queue is full
    UNREACHABLE = "unreachable"  # no connection to the peer any more

    def __bool__(self) -> bool:
        return self is Delivery.SENT


class AdmissionEvent(enum.StrEnum):
    """How a JOIN was admitted: a new id, an id seen before, or a joined peer asking again."""

    JOINED = "joined"
    REJOINED = "rejoined"
    WELCOMED_AGAIN = "welcomed again"


class ProtocolError(ValueError):
    """A message broke the protocol; ``str(error)`` says exactly how."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver enforces before trusting a message."""

    max_header_bytes: int = 4 * 1024 * 1024
    max_arrays: int = 4096
    max_array_bytes: int = 2**34
    max_total_bytes: int = 2**36


@dataclass(frozen=True)
class WireModel:
    """A model as it travels to clients: its Keras architecture (JSON), compile settings and weights."""

    model_json: str
    compile_config: dict[str, Any]
    weights: list[np.ndarray]


@dataclass
class Message:
    """One decoded message. ``arrays`` may be read-only views over the received frames."""

    type: MessageType
    round: int = 0
    client_id: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)


# --- body schemas -----------------------------------------------------------------------------
# Each body field maps to (checker, required). A checker returns the value or raises ValueError.

def _in(bounds: Range) -> Callable[[Any], Any]:
    """A checker for numbers in ``bounds`` (floats come back as float, integers as int)."""
    if bounds.integer:
        return bounds.check
    return lambda value: float(bounds.check(value))


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    return _in(Range(low, high, integer=True))


def _float_in(low: float, high: float) -> Callable[[Any], float]:
    return _in(Range(low, high))


def _text(max_len: int) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        if len(value) > max_len:
            raise ValueError(f"must be at most {max_len} characters, got {len(value)}")
        return value
    return check


def _optional(checker: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else checker(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {type(value).__name__}")
    return value


SHARD_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,123}\.npz")


def is_client_id(value: Any) -> bool:
    """Whether ``value`` is a valid client id: 1-64 characters of [A-Za-z0-9._-], the first alphanumeric."""
    return isinstance(value, str) and CLIENT_ID_PATTERN.fullmatch(value) is not None


def shard_name(client_index: int) -> str:
    """The file name of shard ``client_index`` (1-based): partition writes it, the server hands it out."""
    return f"client-{client_index}.npz"


def is_shard_name(value: Any) -> bool:
    """Whether ``value`` is a bare shard file name (never a path)."""
    return isinstance(value, str) and SHARD_NAME_PATTERN.fullmatch(value) is not None and ".." not in value


def _shard_name(value: Any) -> str:
    """A bare .npz file name: never a path, so a server cannot point a client outside its data dir."""
    if not is_shard_name(value):
        raise ValueError(f"must be a bare file name ending in .npz, got {str(value)[:80]!r}")
    return value


def _b64(length: int | None = None, *, max_length: int | None = None) -> Callable[[Any], str]:
    """Bytes as standard base64 text: exactly ``length`` bytes, or at most ``max_length``. The text
    stays text in the body (JSON both ways); :func:`unb64` gives the bytes."""
    limit = length if length is not None else max_length

    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > 4 * ((limit + 2) // 3):
            raise ValueError(f"must be base64 text of at most {limit} bytes")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not base64 text") from None
        if length is not None and len(raw) != length:
            raise ValueError(f"must be {length} bytes, got {len(raw)}")
        return value
    return check


def b64(raw: bytes) -> str:
    """Bytes as the base64 text the SecAgg bodies carry."""
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    """The bytes of base64 text a body's checker has already accepted."""
    return base64.b64decode(text, validate=True)


def _id_table(value_check: Callable[[Any], Any], max_entries: int) -> Callable[[Any], dict[str, Any]]:
    """{client id: value}, at most ``max_entries`` of them."""
    def check(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) > max_entries:
            raise ValueError(f"must be an object of at most {max_entries} client ids")
        checked = {}
        for key, item in value.items():
            if not is_client_id(key):
                raise ValueError(f"has {str(key)[:70]!r}, which is not a client id")
            try:
                checked[key] = value_check(item)
            except ValueError as error:
                raise ValueError(f"[{key!r}] {error}") from None
        return checked
    return check


def _id_list(max_entries: int) -> Callable[[Any], list[str]]:
    def check(value: Any) -> list[str]:
        if not isinstance(value, list) or len(value) > max_entries or not all(map(is_client_id, value)):
            raise ValueError(f"must be a list of at most {max_entries} client ids")
        if len(set(value)) != len(value):
            raise ValueError("names a client twice")
        return value
    return check


def _tuple(*checkers: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    """A JSON list of exactly ``len(checkers)`` values, each checked by its own checker."""
    def check(value: Any) -> list[Any]:
        if not isinstance(value, list) or len(value) != len(checkers):
            raise ValueError(f"must be a list of {len(checkers)} values")
        return [checker(item) for checker, item in zip(checkers, value)]
    return check


def _floats(max_len: int, *, low: float = -1e300) -> Callable[[Any], list[float]]:
    """A list of at most ``max_len`` finite numbers, each at least ``low``."""
    def check(value: Any) -> list[float]:
        if not isinstance(value, list) or not 1 <= len(value) <= max_len:
            raise ValueError(f"must be a list of 1 to {max_len} numbers")
        for item in value:
            if (not isinstance(item, (int, float)) or isinstance(item, bool) or not math.isfinite(item)
                    or not low <= item <= 1e300):
                raise ValueError(f"holds {str(item)[:24]!r}, not a finite number of at least {low:g}")
        return value
    return check


def _one_of(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {str(value)[:20]!r}")
        return value
    return check


MAX_SECAGG_CLIENTS = 100_000
SECAGG_KEY_BYTES = 32
SECAGG_SHARE_BYTES = 66
SECAGG_SIGNATURE_BYTES = 64
SECAGG_MAX_BOX_BYTES = 2 * (SECAGG_SHARE_BYTES + SECAGG_SIGNATURE_BYTES) + 100  # two signed shares, sealed, and room

SECAGG_SETUP_SCHEMA: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "threshold": (_int_in(2, MAX_SECAGG_CLIENTS), True),
    "degree": (_int_in(2, MAX_SECAGG_CLIENTS), True),
    "quantisation_bits": (_int_in(1, 62), True),
    "ring_bits": (_int_in(2, 64), True),
    "clip": (_float_in(1e-12, 1e12), True),
    "min_clients": (_int_in(2, MAX_SECAGG_CLIENTS), True),  # no sum of fewer is unmasked (the client checks too)
}


def _secagg_setup(value: Any) -> dict[str, Any]:
    return _check_fields(value, SECAGG_SETUP_SCHEMA, "secagg")


def _plan(value: Any) -> dict[str, Any]:
    return _check_fields(value, PLAN_SCHEMA, "plan")


RUN_ID_PATTERN = re.compile(r"[0-9a-f]{8,64}")


def _run_id(value: Any) -> str:
    if not isinstance(value, str) or RUN_ID_PATTERN.fullmatch(value) is None:
        raise ValueError(f"must be 8-64 lowercase hex digits, got {str(value)[:70]!r}")
    return value


def _enum(kind: type[enum.Enum]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"must be one of {', '.join(m.value for m in kind)}, got {str(value)[:40]!r}") from None
    return check


def _history(value: Any) -> dict[str, list[float | None]]:
    """Per-epoch training metrics: {metric name: [one number per epoch]}; NaN travels as null."""
    if not isinstance(value, dict):
        raise ValueError(f"must be an object, got {type(value).__name__}")
    if len(value) > MAX_HISTORY_METRICS:
        raise ValueError(f"must have at most {MAX_HISTORY_METRICS} metrics, got {len(value)}")
    for name, series in value.items():
        if not re.fullmatch(r"[A-Za-z0-9_./-]{1,64}", name):
            raise ValueError(f"metric name {name[:70]!r} is not 1-64 characters of [A-Za-z0-9_./-]")
        if not isinstance(series, list) or len(series) > MAX_EPOCHS:
            raise ValueError(f"metric {name!r} must be a list of at most {MAX_EPOCHS} numbers")
        for item in series:
            if item is not None and (not isinstance(item, (int, float)) or isinstance(item, bool)
                                     or not math.isfinite(item)):
                raise ValueError(f"metric {name!r} holds {str(item)[:20]!r}, not a finite number or null")
    return value


def _json_object(max_bytes: int) -> Callable[[Any], dict]:
    def check(value: Any) -> dict:
        if not isinstance(value, dict):
            raise ValueError(f"must be an object, got {type(value).__name__}")
        if len(json.dumps(value)) > max_bytes:
            raise ValueError(f"must serialise to at most {max_bytes} bytes")
        return value
    return check


def _plan_field(default: Any, bounds: Range | None = None, *, required: bool = True,
                choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"range": bounds, "required": required, "choices": choices})


@dataclass(frozen=True)
class FitPlan:
    """How a client trains in one round (sent with every FIT and in the WELCOME).

    ``proximal_mu`` > 0 adds FedProx's ``mu/2 * ||w - w_global||^2`` to the client's loss;
    ``eval_fraction`` > 0 holds that share of each client's data out of training, for federated
    evaluation of the global model. ``clip_norm`` > 0 has the client clip its update's change from
    the global model to that L2 norm before sending it, and ``local_noise`` > 0 then add Gaussian
    noise of ``local_noise * clip_norm`` (client-side clipping and local DP, strategy/dp.py), and log
    the local epsilon its noised updates have spent at ``local_delta``. Each field's range is the one
    the wire, the configuration and the strategies all check (:meth:`range_of`).
    """

    epochs: int = _plan_field(1, Range(1, MAX_EPOCHS, integer=True))
    batch_size: int = _plan_field(32, Range(1, 10_000_000, integer=True))
    learning_rate: float = _plan_field(0.001, Range(0, 1e6, low_open=True))
    proximal_mu: float = _plan_field(0.0, Range(0, 1e6), required=False)
    eval_fraction: float = _plan_field(0.0, Range(0, 0.9), required=False)
    clip_norm: float = _plan_field(0.0, Range(0, 1e6), required=False)  # > 0: clip the update's change (DP)
    local_noise: float = _plan_field(0.0, Range(0, 1e6), required=False)  # > 0: add N(0, (this*clip_norm)^2)
    local_delta: float = _plan_field(0.0, Range(0, 1), required=False)  # the delta a client's local epsilon is at
    update_compression: str = _plan_field("none", required=False,  # how the update travels (wire/compression.py)
                                          choices=tuple(c.value for c in UpdateCompression))
    topk_fraction: float = _plan_field(0.01, Range(0, 1, low_open=True), required=False)  # of each array, for topk
    broadcast_compression: str = _plan_field("none", required=False,  # how the global model travels to clients
                                             choices=tuple(c.value for c in BroadcastCompression))
    local_layers: str = _plan_field("none", required=False,  # layers each site keeps as its own (FedBN)
                                    choices=tuple(c.value for c in LocalLayers))

    @staticmethod
    def range_of(name: str) -> Range:
        return next(f.metadata["range"] for f in fields(FitPlan) if f.name == name)

    def to_body(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "FitPlan":
        return cls(**body)


PLAN_SCHEMA: dict[str, tuple[Callable[[Any], Any], bool]] = {
    f.name: (_one_of(*f.metadata["choices"]) if f.metadata["choices"] else _in(f.metadata["range"]),
             f.metadata["required"]) for f in fields(FitPlan)}

_ATTEMPT = (_int_in(1, 2**31 - 1), True)  # which attempt at the round a message belongs to
_BROADCAST_ENCODING = (_one_of(*(c.value for c in BroadcastCompression)), False)  # of the global model's arrays
_SEALED_BOXES = {"attempt": _ATTEMPT,  # sealed shares, {the other client: box}, either way through the server
                 "boxes": (_id_table(_b64(max_length=SECAGG_MAX_BOX_BYTES), MAX_SECAGG_CLIENTS), True)}

BODY_SCHEMAS: dict[MessageType, dict[str, tuple[Callable[[Any], Any], bool]]] = {
    # client -> server: "let me in"; header client_id is the id wanted ("" lets the server choose).
    MessageType.JOIN: {
        "num_examples": (_int_in(0, 2**53), False),
        "wants_shard": (_bool, False),  # "give me an id and a data shard" (Compose replicas)
    },
    # server -> client: the model and the current global weights (arrays).
    MessageType.WELCOME: {
        "model_json": (_text(16 * 1024 * 1024), True),
        "compile_config": (_json_object(1024 * 1024), True),
        "plan": (_plan, True),
        "rounds": (_int_in(0, 10_000_000), True),
        "shard": (_optional(_shard_name), False),  # the shard file assigned to this client, if asked
        "encoding": _BROADCAST_ENCODING,
    },
    # server -> client: train round `round` from these global weights (arrays) with this plan. A
    # retried round has a new `attempt`; the same FIT sent again (the client rejoined) has the same one.
    # `run` names the run: within it, a round's global weights never change, so (run, round, plan)
    # is what an answer depends on.
    MessageType.FIT: {
        "plan": (_plan, True),
        "attempt": _ATTEMPT,
        "run": (_run_id, True),
        "secagg": (_secagg_setup, False),  # secure aggregation: answer with SECAGG_KEYS, not UPDATE
        "encoding": _BROADCAST_ENCODING,
    },
    # client -> server: the locally trained weights (arrays) for round `round`, attempt `attempt`.
    MessageType.UPDATE: {
        "attempt": _ATTEMPT,
        "num_examples": (_int_in(1, 2**53), True),
        "fit_s": (_float_in(0.0, 1e9), True),
        "history": (_history, True),
        "within_clip": (_bool, False),  # with a plan's clip_norm: the change's norm was at most it
        # the plan's update_compression: the arrays are each model array's change, encoded (wire/compression.py)
        "encoding": (_one_of(*(c.value for c in UpdateCompression)), False),
        # a large update: no arrays here; they follow in this many UPDATE_CHUNK messages (wire/chunks.py)
        "chunks": (_int_in(1, 2**31 - 1), False),
    },
    # client -> server: chunk `index` of the UPDATE of round `round`, attempt `attempt` (one uint8 frame).
    MessageType.UPDATE_CHUNK: {
        "attempt": _ATTEMPT,
        "index": (_int_in(0, 2**31 - 1), True),
    },
    # client -> server: its update for round `round`, attempt `attempt` is ready (`bytes` on the wire);
    # it sends the UPDATE once granted. Any number wait; --max-inflight-updates are granted at a time.
    MessageType.UPLOAD_READY: {
        "attempt": _ATTEMPT,
        "bytes": (_int_in(0, 2**53), True),
    },
    # server -> client: send the UPDATE for round `round`, attempt `attempt` now.
    MessageType.UPLOAD_GRANT: {
        "attempt": _ATTEMPT,
    },
    # server -> client: evaluate these global weights (arrays) on your held-out data.
    MessageType.EVALUATE: {
        "run": (_run_id, True),
        "encoding": _BROADCAST_ENCODING,
    },
    # client -> server: the result of an EVALUATE for round `round`; num_examples 0 if nothing held out.
    MessageType.EVALUATION: {
        "num_examples": (_int_in(0, 2**53), True),
        "loss": (_optional(_float_in(-1e30, 1e30)), True),
        "accuracy": (_optional(_float_in(0.0, 1.0)), True),
    },
    # server -> client: summarise your training examples (`kind`, a StatsKind) for run `run`: before
    # round 1, the features (no arrays); after the last round, the inputs of BatchNormalization layer
    # `layer` under the weights it carries (the global model, in full precision: what is exported).
    MessageType.STATS: {
        "run": (_run_id, True),
        "kind": (_one_of(*(k.value for k in StatsKind)), True),
        "attempt": (_ATTEMPT[0], False),
        "layer": (_int_in(0, 2**31 - 1), False),
    },
    # client -> server: the answer to a STATS: per feature, the mean of its `count` examples and the sum
    # of squared deviations from it (m2). Nothing else about its data leaves the site.
    MessageType.MOMENTS: {
        "attempt": (_ATTEMPT[0], False),
        "count": (_int_in(1, 2**53), True),
        "mean": (_floats(MAX_MOMENT_VALUES), True),
        "m2": (_floats(MAX_MOMENT_VALUES, low=0.0), True),
    },
    # server -> client: the run is over; the client may exit.
    MessageType.FINISH: {
        "reason": (_text(1000), True),
    },
    # server -> client: the server is shutting down (SIGTERM) and will resume from its checkpoint;
    # the client keeps its state, waits and rejoins when the server is back.
    MessageType.STOPPING: {
        "reason": (_text(1000), True),
    },
    # either way: something went wrong; `code` is machine-readable, `reason` is for people.
    MessageType.ERROR: {
        "code": (_enum(ErrorCode), True),
        "reason": (_text(2000), True),
    },
    # client -> server: the client is leaving the federation.
    MessageType.LEAVE: {
        "reason": (_text(1000), False),
    },
    # --- secure aggregation, one attempt at one round (`round` in the header; `attempt` here) ---
    # client -> server, after training for a FIT with "secagg": this attempt's three public keys.
    # It also commits to its self-mask seed and says the weight (examples) it will mask its update by, signed.
    MessageType.SECAGG_KEYS: {
        "attempt": _ATTEMPT,
        "mask_key": (_b64(SECAGG_KEY_BYTES), True),
        "share_key": (_b64(SECAGG_KEY_BYTES), True),
        "sign_key": (_b64(SECAGG_KEY_BYTES), True),
        "commitment": (_b64(32), True),
        "num_examples": (_int_in(1, 2**40), True),
        "signature": (_b64(SECAGG_SIGNATURE_BYTES), True),  # all of the above, under its signing key
    },
    # server -> client: every key-advertising client's keys, {client id: [mask key, share key, signing key]}.
    MessageType.SECAGG_ROSTER: {
        "attempt": _ATTEMPT,
        "roster": (_id_table(_tuple(_b64(SECAGG_KEY_BYTES), _b64(SECAGG_KEY_BYTES), _b64(SECAGG_KEY_BYTES)),
                             MAX_SECAGG_CLIENTS), True),
    },
    # client -> server: its shares, sealed for each neighbour, {neighbour: box}.
    MessageType.SECAGG_SHARES: _SEALED_BOXES,
    # server -> client: the boxes its neighbours sealed for it, {sender: box}.
    MessageType.SECAGG_BOXES: _SEALED_BOXES,
    # client -> server: its masked, quantised, weighted update (one unsigned array) and its metrics;
    # or, with no array, the senders whose boxes did not open for it (it will not mask against them).
    MessageType.SECAGG_MASKED: {
        "attempt": _ATTEMPT,
        "fit_s": (_float_in(0.0, 1e9), True),
        "history": (_history, True),
        "bad_boxes": (_id_list(MAX_SECAGG_CLIENTS), False),
    },
    # server -> client: who survived (sent a masked input) and who dropped after sharing keys.
    MessageType.SECAGG_UNMASK: {
        "attempt": _ATTEMPT,
        "survivors": (_id_list(MAX_SECAGG_CLIENTS), True),
        "dropped": (_id_list(MAX_SECAGG_CLIENTS), True),
    },
    # client -> server: {owner: ["b" (self-mask seed) | "s" (mask key), its share, the owner's signature of it]}.
    MessageType.SECAGG_REVEAL: {
        "attempt": _ATTEMPT,
        "shares": (_id_table(_tuple(_one_of("b", "s"), _b64(SECAGG_SHARE_BYTES), _b64(SECAGG_SIGNATURE_BYTES)),
                             MAX_SECAGG_CLIENTS), True),
    },
}

#: Message types whose arrays must match the model exactly.
WEIGHT_CARRYING = frozenset({MessageType.WELCOME, MessageType.FIT, MessageType.UPDATE, MessageType.EVALUATE})
#: Message types that carry arrays at all: the weight-carrying ones, and a masked input (one unsigned
#: vector of ring elements, checked against the round by the server).
ARRAY_CARRYING = WEIGHT_CARRYING | {MessageType.SECAGG_MASKED, MessageType.UPDATE_CHUNK, MessageType.STATS}


def _check_fields(value: Any, schema: Mapping[str, tuple[Callable[[Any], Any], bool]], where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(schema))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {', '.join(map(repr, unknown[:5]))}")
    checked = {}
    for name, (checker, required) in schema.items():
        if name not in value:
            if required:
                raise ValueError(f"{where} lacks required field {name!r}")
            continue
        try:
            checked[name] = checker(value[name])
        except ValueError as error:
            raise ValueError(f"{where}.{name} {error}") from None
    return checked


# --- encoding ---------------------------------------------------------------------------------

def array_specs(arrays: Sequence[np.ndarray]) -> list[ArraySpec]:
    """The wire description of a list of arrays (what a receiver should expect)."""
    return [(np.dtype(a.dtype).name, tuple(int(d) for d in a.shape)) for a in arrays]


def _wire_array(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if np.dtype(array.dtype).name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {array.dtype} is not allowed on the wire")
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE_ENDIAN):
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d arrays 0-d


_LITTLE_ENDIAN = np.little_endian


def encode(message: Message) -> list[bytes | memoryview]:
    """Frames for ``message``: the header, then a zero-copy view of each (contiguous) array.

    The body is validated too, so a bug on the sending side fails here, not at the peer.
    """
    try:
        body = _check_fields(message.body, BODY_SCHEMAS[MessageType(message.type)], "body")
    except ValueError as error:
        raise ProtocolError(str(error)) from None
    arrays = [_wire_array(a) for a in message.arrays]
    header = {
        "v": PROTOCOL_VERSION,
        "type": MessageType(message.type).value,
        "round": int(message.round),
        "client_id": message.client_id,
        "arrays": [[name, list(shape)] for name, shape in array_specs(arrays)],
        "body": body,
    }
    frames: list[bytes | memoryview] = [json.dumps(header, separators=(",", ":"), allow_nan=False).encode()]
    frames.extend(memoryview(a).cast("B") if a.size else b"" for a in arrays)
    return frames


def encode_error(code: ErrorCode, reason: str, *, client_id: str = "", round: int = 0) -> list[bytes | memoryview]:
    """Frames for an ERROR message (reason trimmed to the protocol's limit)."""
    return encode(Message(MessageType.ERROR, round=round, client_id=client_id,
                          body={"code": ErrorCode(code), "reason": reason[:2000]}))


# --- decoding ---------------------------------------------------------------------------------

def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a header")


def _buffer(frame: Any) -> memoryview:
    """A byte view of a received frame: bytes, memoryview, or a pyzmq Frame (``.buffer``)."""
    if hasattr(frame, "buffer"):
        frame = frame.buffer
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _parse_manifest(entries: Any, limits: Limits) -> list[ArraySpec]:
    if not isinstance(entries, list):
        raise ProtocolError(f"header.arrays must be a list, got {type(entries).__name__}")
    if len(entries) > limits.max_arrays:
        raise ProtocolError(f"header.arrays lists {len(entries)} arrays; at most {limits.max_arrays} allowed")
    specs = []
    total = 0
    for index, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ProtocolError(f"header.arrays[{index}] must be [dtype, shape]")
        dtype, shape = entry
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"header.arrays[{index}] dtype {str(dtype)[:40]!r} is not allowed")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise ProtocolError(f"header.arrays[{index}] shape must be a list of at most {MAX_NDIM} sizes")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
            raise ProtocolError(f"header.arrays[{index}] shape {shape!r} must hold non-negative integers")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes > limits.max_array_bytes:
            raise ProtocolError(f"header.arrays[{index}] declares {nbytes} bytes; at most {limits.max_array_bytes} allowed")
        total += nbytes
        specs.append((dtype, tuple(shape)))
    if total > limits.max_total_bytes:
        raise ProtocolError(f"message declares {total} bytes of arrays; at most {limits.max_total_bytes} allowed")
    return specs


def _check_stats(body: Mapping[str, Any], specs: Sequence[ArraySpec],
                 expected_arrays: Sequence[ArraySpec] | None) -> None:
    """A STATS for the features carries no arrays and names no layer; one for a BatchNormalization
    layer names it and carries the weights to run (the model's)."""
    if body["kind"] == StatsKind.FEATURES:
        if specs or "layer" in body:
            raise ProtocolError("a stats message for the features carries no arrays and names no layer")
        return
    if "layer" not in body or not specs:
        raise ProtocolError(f"a stats message for {body['kind']} names its layer and carries the weights to run")
    if expected_arrays is not None:
        check_specs(specs, expected_arrays)


def decode(
    frames: Sequence[Any],
    *,
    expected_arrays: Sequence[ArraySpec] | None = None,
    limits: Limits = Limits(),
) -> Message:
    """Validate ``frames`` and return the message; raise :class:`ProtocolError` saying why not.

    ``expected_arrays`` (the model's specs) is enforced for messages that carry weights. Arrays
    are returned as read-only views over the frames: nothing is copied.
    """
    if not frames:
        raise ProtocolError("empty message")
    head = _buffer(frames[0])
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"header is {len(head)} bytes; at most {limits.max_header_bytes} allowed")
    try:
        header = json.loads(bytes(head).decode("utf-8"), parse_constant=_reject_constant)
    except ValueError as error:  # UnicodeDecodeError, JSONDecodeError, over-long integers
        raise ProtocolError(f"header is not valid UTF-8 JSON ({error.__class__.__name__}: {str(error)[:80]})") from None
    except RecursionError:
        raise ProtocolError("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    unknown = sorted(set(header) - {"v", "type", "round", "client_id", "arrays", "body"})
    if unknown:
        raise ProtocolError(f"header has unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}")

    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {str(version)[:20]!r}; this peer speaks {PROTOCOL_VERSION}")
    try:
        kind = MessageType(header.get("type"))
    except ValueError:
        raise ProtocolError(f"unknown message type {str(header.get('type'))[:40]!r}") from None
    round_ = header.get("round", 0)
    if not isinstance(round_, int) or isinstance(round_, bool) or not 0 <= round_ < 2**31:
        raise ProtocolError(f"header.round must be an integer in [0, 2^31), got {str(round_)[:40]!r}")
    client_id = header.get("client_id", "")
    if not isinstance(client_id, str) or (client_id and not is_client_id(client_id)):
        raise ProtocolError(f"header.client_id {str(client_id)[:70]!r} is not 1-64 characters of [A-Za-z0-9._-]")
    try:
        body = _check_fields(header.get("body", {}), BODY_SCHEMAS[kind], "body")
    except ValueError as error:
        raise ProtocolError(f"{kind.value}: {error}") from None

    specs = _parse_manifest(header.get("arrays", []), limits)
    if len(frames) != 1 + len(specs):
        raise ProtocolError(f"header lists {len(specs)} arrays but {len(frames) - 1} array frames arrived")
    if specs and kind not in ARRAY_CARRYING:
        raise ProtocolError(f"a {kind.value} message carries no arrays, but this one lists {len(specs)}")
    if kind is MessageType.SECAGG_MASKED and "bad_boxes" in body:
        if specs or not body["bad_boxes"]:
            raise ProtocolError("a secagg_masked message naming bad boxes names at least one and carries no array")
    elif kind is MessageType.SECAGG_MASKED and (len(specs) != 1 or len(specs[0][1]) != 1
                                                or specs[0][0] not in ("uint32", "uint64")):
        raise ProtocolError("a secagg_masked message carries one vector of uint32 or uint64, "
                            f"not {[f'{d}{list(s)}' for d, s in specs][:3]}")
    if kind is MessageType.UPDATE_CHUNK and (len(specs) != 1 or specs[0][0] != "uint8" or len(specs[0][1]) != 1
                                             or specs[0][1][0] > CHUNK_BYTES):
        raise ProtocolError(f"an update_chunk carries one uint8 vector of at most {CHUNK_BYTES} bytes, "
                            f"not {[f'{d}{list(s)}' for d, s in specs][:3]}")
    if "chunks" in body and specs:
        raise ProtocolError("an update sent in chunks carries no arrays itself")
    if kind is MessageType.STATS:
        _check_stats(body, specs, expected_arrays)
    if (expected_arrays is not None and kind in WEIGHT_CARRYING and body.get("encoding", "none") == "none"
            and "chunks" not in body):
        check_specs(specs, expected_arrays)  # an encoded model is checked against the plan's encoding by its receiver

    arrays = []
    for index, ((dtype, shape), frame) in enumerate(zip(specs, frames[1:])):
        view = _buffer(frame)
        wire_dtype = np.dtype(dtype).newbyteorder("<")
        expected = math.prod(shape) * wire_dtype.itemsize
        if len(view) != expected:
            raise ProtocolError(
                f"array {index} declares {dtype}{list(shape)} = {expected} bytes but its frame has {len(view)}")
        array = np.frombuffer(view, dtype=wire_dtype).reshape(shape) if expected else np.zeros(shape, wire_dtype)
        arrays.append(array)
    return Message(kind, round=round_, client_id=client_id, body=body, arrays=arrays)


def encode_update(message: Message, chunk_bytes: int = CHUNK_BYTES) -> list[list]:
    """An UPDATE as the messages it travels in, each encoded: itself, or, larger than a chunk, its
    header (``"chunks": n``, no arrays) and its ``n`` UPDATE_CHUNKs (wire/chunks.py). Nothing is copied."""
    specs = [(a.dtype.str, a.shape) for a in message.arrays]
    if message.type is not MessageType.UPDATE or not chunks.needs_chunks(specs, chunk_bytes):
        return [encode(message)]
    pieces = chunks.split(message.arrays, chunk_bytes)
    head = Message(MessageType.UPDATE, round=message.round, client_id=message.client_id,
                   body={**message.body, "chunks": len(pieces)})
    return [encode(head)] + [
        encode(Message(MessageType.UPDATE_CHUNK, round=message.round, client_id=message.client_id,
                       body={"attempt": message.body["attempt"], "index": index},
                       arrays=[np.frombuffer(piece, np.uint8)]))
        for index, piece in enumerate(pieces)]


def check_specs(actual: Sequence[ArraySpec], expected: Sequence[ArraySpec]) -> None:
    """Raise :class:`ProtocolError` unless the arrays match the model's count, dtypes and shapes."""
    if len(actual) != len(expected):
        raise ProtocolError(f"expected {len(expected)} arrays (the model's), got {len(actual)}")
    for index, ((dtype, shape), (want_dtype, want_shape)) in enumerate(zip(actual, expected)):
        if tuple(shape) != tuple(want_shape):
            raise ProtocolError(f"array {index} has shape {list(shape)}; the model's is {list(want_shape)}")
        if dtype != want_dtype:
            raise ProtocolError(f"array {index} has dtype {dtype}; the model's is {want_dtype}")


def check_finite(arrays: Sequence[np.ndarray]) -> None:
    """Raise :class:`ProtocolError` if a floating-point array holds NaN or Inf."""
    for index, array in enumerate(arrays):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ProtocolError(f"array {index} holds NaN or Inf")


#: What ZeroMQ adds to a frame on the wire: CurveZMQ boxes each one in a MESSAGE command (name, nonce,
#: flags and a 16-byte tag), and ``MAXMSGSIZE`` counts those bytes too.
FRAME_OVERHEAD_BYTES = 1024


def spec_bytes(spec: ArraySpec) -> int:
    dtype, shape = spec
    return math.prod(shape) * np.dtype(dtype).itemsize


def largest_masked_input(specs: Sequence[ArraySpec]) -> ArraySpec:
    """The largest masked input of a securely aggregated round on this model: one uint64 per float
    of the model and one for the weight, in a single array (so a single frame)."""
    floats = sum(math.prod(shape) for dtype, shape in specs if np.dtype(dtype).kind == "f")
    return "uint64", (floats + 1,)


def max_frame_bytes(specs: Sequence[ArraySpec], limits: Limits = Limits(), *, secure_aggregation: bool = False) -> int:
    """The largest frame a peer of this model may send: for ``zmq.MAXMSGSIZE`` (a per-frame limit).
    Under secure aggregation a masked input, the whole model in one vector, is the largest."""
    largest = min(max((spec_bytes(spec) for spec in specs), default=0), CHUNK_BYTES)  # larger: in chunks
    if secure_aggregation:
        largest = max(largest, spec_bytes(largest_masked_input(specs)))
    return max(largest, limits.max_header_bytes) + FRAME_OVERHEAD_BYTES


def client_limits(specs: Sequence[ArraySpec], epochs: int, *, secagg_neighbours: int = 0,
                  update_compression: UpdateCompression = UpdateCompression.NONE, topk_fraction: float = 0.01) -> Limits:
    """What a server accepts from its clients, sized from the model and the plan's epochs.

    The header holds at most an UPDATE's: its manifest (one short entry per array) and a training
    history of at most :data:`MAX_HISTORY_METRICS` metrics of ``epochs`` numbers each; anything
    longer is refused before it is parsed. Arrays may add up to the model's size, no more, and to a
    chunk (wire/chunks.py) for a model larger than one: its updates travel in chunks. With
    secure aggregation (``secagg_neighbours``: the most neighbours a client has), a header may also
    hold a box or a share for each neighbour, and a masked input is a uint64 per float of the model.
    A compressed update (``update_compression``) may have more frames than the model has arrays
    (int8's scales) and, for top-k of over half the elements, more bytes.
    """
    model_bytes = sum(spec_bytes(spec) for spec in specs)
    encoded = compression.encoded_specs(update_compression, specs, topk_fraction)
    model_bytes = max(model_bytes, sum(spec_bytes(spec) for spec in encoded))  # top-k of over half: 8 bytes a value
    model_bytes = min(model_bytes, CHUNK_BYTES)  # a larger update travels in chunks (wire/chunks.py)
    if secagg_neighbours:
        model_bytes = max(model_bytes, spec_bytes(largest_masked_input(specs)))
    history_bytes = MAX_HISTORY_METRICS * (80 + 26 * min(int(epochs), MAX_EPOCHS))  # '-1.2345678901234567e-05,'
    secagg_bytes = (secagg_neighbours + 1) * (4 * SECAGG_MAX_BOX_BYTES // 3 + 80) if secagg_neighbours else 0
    return Limits(max_header_bytes=4096 + 64 * len(specs) + history_bytes + secagg_bytes,
                  max_arrays=max(1, len(specs), len(encoded)), max_array_bytes=max(1, model_bytes), max_total_bytes=max(1, model_bytes))


def message_budget(limits: Limits) -> int:
    """The most bytes one message within ``limits`` can take on the wire (header + arrays + framing)."""
    return limits.max_header_bytes + limits.max_total_bytes + 64 * (limits.max_arrays + 1)


def check_history(history: Mapping[str, Sequence[Any]], epochs: int) -> None:
    """Refuse a training history with a series longer than the plan's ``epochs``."""
    for name, series in history.items():
        if len(series) > epochs:
            raise ProtocolError(f"history metric {name!r} has {len(series)} values but the plan trains {epochs} "
                                "epochs")
