"""What a client sends once it has trained: one home for the networked client
(:mod:`pyfed.federation.client`) and the in-process pool (:mod:`pyfed.federation.pool`), so a
simulation answers exactly as a site would.

After local training, in this order: differential privacy clips the change from the global model
(and, for local DP, adds noise) before anything leaves (:func:`~pyfed.federation.aggregate.clip_and_noise`);
then either secure aggregation takes the change and answers with this attempt's keys (its later
stages are answered by :class:`~pyfed.federation.secure_aggregation.ClientStages`), or the update is
encoded as the plan asks (:class:`~pyfed.wire.compression.UpdateEncoder`), announced (UPLOAD_READY)
and held until the server grants it an upload slot (:mod:`pyfed.federation.uploads`), then sent as
an UPDATE.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pyfed.federation.aggregate import clip_and_noise
from pyfed.federation.secure_aggregation import ClientStages, flatten_change
from pyfed.wire.compression import UpdateEncoder
from pyfed.wire.protocol import FitPlan, MessageType


class ClientAnswers:
    """One client's answers across a run: its local DP noise source, its update encoder (top-k
    memory) and its secure aggregation stages, each kept for its client id."""

    def __init__(self, client_id: str | None, rounding_rng: np.random.Generator | None = None):
        """``rounding_rng``: secure aggregation's stochastic rounding; a simulation draws it from its
        seed so that a run is repeatable, a networked client leaves it None (drawn from the OS)."""
        self._noise_rng = np.random.default_rng(secrets.randbits(128))  # local DP noise: never from a seed
        self._encoder = UpdateEncoder()  # its top-k memory lives for one run and id
        self._rounding_rng = rounding_rng
        self.stages = ClientStages(client_id, rounding_rng)
        self._held: tuple[int, int, tuple[MessageType, dict[str, Any], list[np.ndarray]]] | None = None

    def joined(self, client_id: str) -> None:
        """The client was welcomed (again), under this id: a top-k residual is never carried into
        another membership, and secure aggregation starts afresh under a new id."""
        self._encoder.feedback.reset()
        if self.stages.client_id != client_id:
            self.stages = ClientStages(client_id, self._rounding_rng)

    @property
    def client_id(self) -> str | None:
        return self.stages.client_id

    def after_training(self, *, run: str, server_round: int, attempt: int, plan: FitPlan,
                       secagg: Mapping[str, Any] | None, weights: Sequence[np.ndarray],
                       received: Sequence[np.ndarray] | None, num_examples: int,
                       metrics: dict[str, Any]) -> tuple[MessageType, dict[str, Any], list[np.ndarray]]:
        """The answer to a FIT: (SECAGG_KEYS, body, []), or (UPLOAD_READY, body, []) with the UPDATE
        held until :meth:`granted`. ``received`` are
        the global weights as this client received them (needed when DP, secure aggregation or
        compression work on the change; None otherwise). ``metrics`` gains ``within_clip`` under DP."""
        if plan.clip_norm > 0:  # differential privacy: clip (and, for local DP, noise) before it leaves
            weights, metrics["within_clip"] = clip_and_noise(weights, received, plan.clip_norm, plan.local_noise,
                                                             self._noise_rng)
        if secagg is not None:  # secure aggregation: the update waits, masked, for its stage
            body = self.stages.begin(run, server_round, attempt, secagg, flatten_change(weights, received),
                                     num_examples, {"fit_s": metrics["fit_s"], "history": metrics["history"]})
            return MessageType.SECAGG_KEYS, body, []
        arrays, encoding = self._encoder.encode(weights, received, plan.update_compression, plan.topk_fraction,
                                                (run, self.client_id))
        update = (MessageType.UPDATE, {"attempt": attempt, "num_examples": num_examples, **metrics, **encoding},
                  arrays)
        self._held = (server_round, attempt, update)  # sent when the server grants it a slot (federation/uploads.py)
        return MessageType.UPLOAD_READY, {"attempt": attempt, "bytes": sum(int(a.nbytes) for a in arrays)}, []

    def granted(self, server_round: int, attempt: int) -> tuple[MessageType, dict[str, Any], list[np.ndarray]] | None:
        """The UPDATE held for this round and attempt, now granted (None if none is held for it). It
        stays held: a grant repeated after a lost connection gets the same update."""
        if self._held is None or self._held[:2] != (server_round, attempt):
            return None
        return self._held[2]

    def reattempt(self, server_round: int, attempt: int) -> None:
        """The server retried the round from the same weights and plan: the held update answers
        the new attempt."""
        if self._held is not None and self._held[0] == server_round:
            kind, body, arrays = self._held[2]
            self._held = (server_round, attempt, (kind, {**body, "attempt": attempt}, arrays))

    @staticmethod
    def needs_received(plan: FitPlan, secagg: Mapping[str, Any] | None) -> bool:
        """Whether :meth:`after_training` needs the received global weights kept through training."""
        return plan.clip_norm > 0 or secagg is not None or plan.update_compression != "none"
