"""The federated client: joins the server, rebuilds its model once, trains each round it is asked.

The client needs no model code: the server's WELCOME carries the architecture, compile settings
and weights. The compiled model is kept for the whole run; each round only the weights change,
so Keras never re-traces the training step.

The client outlives the server: when its connection drops (the server restarted, or dropped it
after missed heartbeats), ZeroMQ reconnects with backoff, and on reconnecting the client joins
again under its id, gets the current global model and carries on. A JOIN the server answers with
``busy`` or ``join_flood``, or does not answer, is sent again with backoff until it is welcomed.
A FIT it already answered (the server sends it again after a rejoin, in case it was lost, or
retries the round) is answered with the same update, not trained again, when it carries the same
run, round and plan: within a run a round's global weights never change, so the update is the same
function of them, whatever the attempt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pyfed.federation.answers import ClientAnswers
from pyfed.federation.secagg import SecAggError
from pyfed.federation.secure_aggregation import SecAggAborted
from pyfed.wire import protocol
from pyfed.wire.compression import CompressionError, decode_broadcast
from pyfed.learning.data import DataError, load_shard
from pyfed.federation.pool import moments_body, site_moments
from pyfed.learning.model import batch_norm_layers, from_wire, input_shape, output_units, unscaled_features
from pyfed.wire.protocol import (RETRYABLE_REFUSALS, ConnectionEvent, ErrorCode, FitPlan, Message, MessageType,
                                 ProtocolError, StatsKind)
from pyfed.learning.training import EpochLog, LocalTrainer, make_reproducible, training_device
from pyfed.wire.security import CurveKeys
from pyfed.wire.transport import ClientTransport

log = logging.getLogger("pyfed.client")

JOIN_RETRY_S = 30.0
REJOIN_RETRY_S = 10.0  # a rejoin JOIN with no answer is sent again after this long
WAIT_LOG_EVERY_S = 60.0
SLOT_WAIT_WORTH_SAYING_S = 1.0  # an update's wait for its upload slot is logged from this long
SEND_RETRY_S = 10.0  # no connection this long: the server restarted or dropped us, and will ask again
#: a handshake that fails with no reason (ConnectionEvent.HANDSHAKE_FAILED) is tried again this long,
#: with no handshake succeeding, before the client gives up as on a refusal: long enough for a server
#: restarting behind a port proxy (Docker's closes each connection while its container is down)
HANDSHAKE_GRACE_S = 60.0
BACKOFF_MAX_S = 5.0  # a refused join is retried at 1, 2, 4, 5, 5 .. s: back soon after its predecessor is dropped
SECAGG_STAGES = frozenset({MessageType.SECAGG_ROSTER, MessageType.SECAGG_BOXES, MessageType.SECAGG_UNMASK})
LOCAL_DELTA = 1e-5  # local DP: the delta a site reports its epsilon at when the server names none

EXIT_OK = 0
EXIT_ERROR = 1


class NotNeeded(Exception):
    """The server has no data shard left for this client: there is nothing for it to do."""


class ClientError(RuntimeError):
    """The client cannot take part (refused by the server, incompatible model or data)."""


class ClientStopped(BaseException):
    """Raised (from a SIGTERM handler, by :meth:`Client.request_stop`) to make the client leave the
    federation cleanly. A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on
    the way (logging's ``Handler.emit``, for one, swallows what it catches) can eat it."""


class Client:
    """One participant: holds its data, trains the server's model on it each round."""

    def __init__(
        self,
        server_address: str,
        x: np.ndarray | None = None,
        y: np.ndarray | None = None,
        *,
        data_dir: Path | None = None,
        client_id: str = "",
        epochs: int | None = None,
        batch_size: int | None = None,
        compile_override: dict[str, Any] | None = None,
        data_source: str = "the client's data",
        max_wait_s: float | None = None,
        curve: CurveKeys | None = None,
        seed: int | None = None,
        local_noise_floor: float = 0.0,
    ):
        self.server_address = server_address
        if (x is None) != (y is None) or (x is None and data_dir is None):
            raise ValueError("give the client its data (x and y) or a data_dir to load an assigned shard from")
        self.x, self.y = x, y
        self._wants_shard = x is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.client_id = client_id
        self.epochs, self.batch_size = epochs, batch_size
        self.compile_override = compile_override
        self.data_source = data_source
        self.max_wait_s = max_wait_s
        self.curve = curve
        self.seed = seed
        self._answers = ClientAnswers(client_id)  # after training: DP, secure aggregation, compression
        self._ready_at: float | None = None  # when the last update was ready to upload
        self.local_releases: Counter[float] = Counter()  # local DP: noised updates sent, by noise multiplier
        self.local_noise_floor = local_noise_floor  # local DP this site insists on, whatever the server's plan
        self.shard: str | None = None
        self._reconnecting = False
        self._handshake_failing_since: float | None = None  # when handshakes began failing with no reason
        self.model: Any = None
        self._admitted = False
        self.specs: list[protocol.ArraySpec] | None = None
        self.rounds_trained = 0
        self.trainer: LocalTrainer | None = None
        self._training_round, self._epoch_log = 0, EpochLog()
        #: the last answer: ((kind, run, round, plan), the message sent)
        self._last_answer: tuple[tuple, Message] | None = None
        self._rejoin_at: float | None = None  # when to send the next JOIN while waiting to be welcomed again
        self._rejoin_backoff = 1.0
        self._stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Leave the federation now (call it from a signal handler). Raises ClientStopped where the
        client is; the request is also remembered, so that if the exception is swallowed (raised
        inside a ``__del__``, which Python only reports), the client stops at its next wait."""
        self._stop_reason = reason
        raise ClientStopped(reason)

    def _check_stop(self) -> None:
        if self._stop_reason is not None:
            raise ClientStopped(self._stop_reason)

    def run(self) -> int:
        """Take part until the server says the run is over; return the process exit code."""
        with ClientTransport(self.server_address, curve=self.curve) as transport:
            self._transport = transport
            try:
                self._join()
                return self._serve()
            except NotNeeded as reason:
                log.info("not taking part: %s", reason)
                return EXIT_OK
            except ClientStopped as reason:
                log.info("stopping (%s)%s", reason, "; told the server" if self._admitted else "")
                self._leave(str(reason))
                return EXIT_OK
            except (ClientError, DataError) as error:
                log.error("%s", error)
                self._leave(str(error))  # tell the server not to wait for us
                return EXIT_ERROR

    def _leave(self, reason: str) -> None:
        if self._admitted:
            self._transport.send(protocol.encode(Message(MessageType.LEAVE, client_id=self.client_id,
                                                         body={"reason": reason[:1000]})))

    # --- joining --------------------------------------------------------------------------------

    def _join(self) -> None:
        wants_shard = self._wants_shard
        started = time.monotonic()
        last_sent = None
        next_wait_log = started
        backoff = 1.0
        while True:
            now = time.monotonic()
            if self.max_wait_s is not None and now - started > self.max_wait_s:
                raise ClientError(f"no answer from the server at {self.server_address} within {self.max_wait_s:g}s")
            if last_sent is None or now - last_sent > JOIN_RETRY_S:
                if self._transport.send(self._join_frames(wants_shard)):
                    last_sent = now
                    log.info("asked to join the federation at %s%s", self.server_address,
                             f" as {self.client_id}" if self.client_id else "")
                elif now >= next_wait_log:
                    log.info("waiting for the server at %s", self.server_address)
                    next_wait_log = now + 10.0
            message = self._receive(timeout_s=0.5)
            if message is None:
                continue
            if message.type is MessageType.WELCOME:
                self._admitted = True
                self._setup(message)
                return
            if message.type is MessageType.ERROR and message.body["code"] is ErrorCode.NO_SHARDS and wants_shard:
                raise NotNeeded(message.body["reason"])
            if message.type is MessageType.ERROR and message.body["code"] in RETRYABLE_REFUSALS:
                log.warning("the server refused to admit this client for now [%s]: %s; retrying in %.0fs",
                            message.body["code"], message.body["reason"], backoff)
                self._sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                last_sent = None
                continue
            if message.type is MessageType.ERROR:
                raise ClientError(f"the server refused to admit this client [{message.body['code']}]: "
                                  f"{message.body['reason']}")
            log.warning("ignoring %s from the server before being admitted", message.type.value)

    def _join_frames(self, wants_shard: bool) -> list:
        body: dict[str, Any] = {"wants_shard": True} if wants_shard else {}
        if self.y is not None:  # what it holds bounds the examples it may claim in an update
            body["num_examples"] = int(len(self.y))
        return protocol.encode(Message(MessageType.JOIN, client_id=self.client_id, body=body))

    def _sleep(self, seconds: float) -> None:
        """Wait without missing connection events (or a SIGTERM)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._check_stop()
            self._handle_events()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _setup(self, welcome: Message) -> None:
        """Build the model from the WELCOME once, and check the data fits it."""
        self.client_id = welcome.client_id or self.client_id
        self._answers.joined(self.client_id)
        if self._wants_shard and welcome.body.get("shard") != self.shard:
            self._load_assigned_shard(welcome.body.get("shard"))
            if self.trainer is not None:
                self.trainer = self._trainer()
        if self.model is None:
            try:
                self.model = from_wire(welcome.body["model_json"], welcome.body["compile_config"])
            except ValueError as error:
                raise ClientError(str(error)) from None
            if self.compile_override:
                self.model.compile(**self.compile_override)
            self._check_data()
            self.specs = protocol.array_specs(self.model.get_weights())
            self.trainer = self._trainer()
            log.info("training on %s", training_device())
        self.trainer.use_eval_fraction(FitPlan.from_body(welcome.body["plan"]).eval_fraction)
        try:
            if "encoding" in welcome.body:  # the global model in half precision (the plan's broadcast_compression)
                welcome.arrays = decode_broadcast(welcome.arrays, welcome.body["encoding"], self.specs)
            protocol.check_specs(protocol.array_specs(welcome.arrays), self.specs)
        except (ProtocolError, CompressionError) as error:
            raise ClientError(f"the server's weights do not fit its model: {error}") from None
        self.model.set_weights(welcome.arrays)
        log.info("joined as %s: model with %d arrays (%.1f MB), %d rounds planned", self.client_id,
                 len(self.specs), sum(a.nbytes for a in welcome.arrays) / 1e6, welcome.body["rounds"])

    def _trainer(self) -> LocalTrainer:
        if self.seed is not None:
            make_reproducible(self.seed)
        return LocalTrainer(self.model, self.x, self.y, epochs=self.epochs, batch_size=self.batch_size,
                            use_plan_learning_rate=not self.compile_override, shuffle_seed=self.seed,
                            on_epoch=self._epoch_done)

    def _epoch_done(self, epoch: int, epochs: int, logs: dict[str, float]) -> None:
        """Local training's progress: one line for an epoch (see EpochLog for which)."""
        if self._epoch_log.due(epoch, epochs):
            metrics = ", ".join(f"{name} {logs[name]:.4f}" for name in sorted(logs, key=lambda name: name != "loss"))
            log.info("round %d: epoch %d/%d%s", self._training_round, epoch, epochs, f": {metrics}" if metrics else "")

    def _load_assigned_shard(self, shard: str | None) -> None:
        if shard is None:
            raise ClientError("the server assigned no data shard to this client")
        path = self.data_dir / shard  # a bare file name: the protocol refuses anything with a path
        self.x, self.y = load_shard(path)
        self.data_source = str(path)
        self.shard = shard
        log.info("assigned shard %s: %d examples", path, len(self.y))

    def _check_data(self) -> None:
        expected = input_shape(self.model)
        got = tuple(self.x.shape[1:])
        if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
            raise DataError(f"{self.data_source}: examples have shape {list(got)} but the server's model "
                            f"takes {list(expected)}")
        units = output_units(self.model)
        if units and units > 1 and int(self.y.max()) >= units:
            raise DataError(f"{self.data_source}: labels go up to {int(self.y.max())} but the server's model "
                            f"predicts {units} classes")
        warning = unscaled_features(self.model, self.x, self.data_source)
        if warning:
            log.warning("%s", warning)

    # --- rounds ---------------------------------------------------------------------------------

    def _serve(self) -> int:
        next_wait_log = time.monotonic() + WAIT_LOG_EVERY_S
        while True:
            if self._rejoin_at is not None and time.monotonic() >= self._rejoin_at:
                self._rejoin()
            message = self._receive(timeout_s=1.0)
            if message is None:
                if time.monotonic() >= next_wait_log:
                    log.info("waiting for the server's next round")
                    next_wait_log = time.monotonic() + WAIT_LOG_EVERY_S
                continue
            next_wait_log = time.monotonic() + WAIT_LOG_EVERY_S
            if message.type is MessageType.FIT:
                self._fit(message)
            elif message.type is MessageType.UPLOAD_GRANT:
                self._upload(message)
            elif message.type in SECAGG_STAGES:
                self._secure_aggregation_stage(message)
            elif message.type is MessageType.EVALUATE:
                self._evaluate(message)
            elif message.type is MessageType.STATS:
                self._statistics(message)
            elif message.type is MessageType.FINISH:
                self._transport.send(protocol.encode(Message(MessageType.LEAVE, client_id=self.client_id,
                                                             body={"reason": "run complete"})))
                log.info("the server ended the run (%s) after %d rounds trained here",
                         message.body["reason"], self.rounds_trained)
                return EXIT_OK
            elif message.type is MessageType.WELCOME:
                self._rejoin_at, self._rejoin_backoff = None, 1.0
                self._setup(message)
            elif message.type is MessageType.STOPPING:
                log.warning("the server is stopping (%s); waiting for it to come back", message.body["reason"])
            elif message.type is MessageType.ERROR and message.body["code"] is ErrorCode.NOT_JOINED:
                log.warning("the server no longer knows this client (it restarted); joining again as %s",
                            self.client_id)
                self._rejoin()
            elif message.type is MessageType.ERROR and message.body["code"] in (ErrorCode.ID_TAKEN, ErrorCode.ID_BOUND_TO_KEY):
                raise ClientError(f"the server gave this client's id to another client while it was away "
                                  f"[{message.body['code']}]: {message.body['reason']}")
            elif message.type is MessageType.ERROR and message.body["code"] in RETRYABLE_REFUSALS:
                log.warning("the server did not take this client back yet [%s]: %s; asking again in %.0fs",
                            message.body["code"], message.body["reason"], self._rejoin_backoff)
                self._rejoin_at = time.monotonic() + self._rejoin_backoff
                self._rejoin_backoff = min(self._rejoin_backoff * 2, BACKOFF_MAX_S)
            elif message.type is MessageType.ERROR:
                log.warning("the server reported [%s]: %s", message.body["code"], message.body["reason"])
            else:
                log.warning("ignoring unexpected %s from the server", message.type.value)

    def _answer_again(self, key: tuple, what: str, attempt: int | None = None) -> bool:
        """If this request was answered already (resent after a rejoin, or a retried round from the same
        weights), send that answer again, under the new attempt number if it has one."""
        if self._last_answer is None or self._last_answer[0] != key:
            return False
        answer = self._last_answer[1]
        if attempt is not None and answer.body["attempt"] != attempt:
            answer.body["attempt"] = attempt
            if answer.type is MessageType.UPLOAD_READY:  # the held update now answers this attempt
                self._answers.reattempt(answer.round, attempt)
        log.info("the server asked again for the %s; sent the same answer again", what)
        self._send(protocol.encode(answer), what=what)
        return True

    def _fit(self, message: Message) -> None:
        attempt = message.body["attempt"]
        key = ("fit", message.body["run"], message.round, json.dumps(message.body["plan"], sort_keys=True),
               attempt if "secagg" in message.body else None)  # secure aggregation's keys are the attempt's own
        if self._answer_again(key, f"round {message.round} update", attempt):
            return
        plan = self._with_local_noise(FitPlan.from_body(message.body["plan"]))
        self._training_round, self._epoch_log = message.round, EpochLog()
        self.trainer.load(message.arrays, plan)
        log.info("round %d: training%s%s", message.round, f" (attempt {attempt})" if attempt > 1 else "",
                 f" with this site's own BatchNorm layers ({self.trainer.own_arrays} arrays, FedBN)"
                 if self.trainer.own_arrays else "")
        secagg = message.body.get("secagg")
        received = ([np.array(a) for a in message.arrays]  # copies: frames are freed
                    if ClientAnswers.needs_received(plan, secagg) else None)
        del message.arrays[:]  # release the received frames before training
        self._last_answer = None
        weights, num_examples, metrics = self.trainer.train(plan)
        metrics["history"] = _bounded_history(metrics["history"], plan.epochs)
        kind, body, arrays = self._answers.after_training(
            run=message.body["run"], server_round=message.round, attempt=attempt, plan=plan, secagg=secagg,
            weights=weights, received=received, num_examples=num_examples, metrics=metrics)
        del weights, received
        answer = Message(kind, round=message.round, client_id=self.client_id, body=body, arrays=arrays)
        self._last_answer = (key, answer)
        self._send(protocol.encode(answer), what=f"round {message.round} {'keys' if secagg else 'upload request'}")
        self.rounds_trained += 1
        if secagg is not None:
            log.info("round %d: trained on %d examples in %.2fs; taking part in secure aggregation",
                     message.round, num_examples, metrics["fit_s"])
            return
        if plan.clip_norm > 0 and plan.local_noise > 0:
            self._account_local_release(plan)
        summary = ", ".join(f"{k} {v[-1]:.4f}" for k, v in metrics["history"].items() if v and v[-1] is not None)
        self._ready_at = time.monotonic()
        log.info("round %d: trained %d epochs on %d examples in %.2fs%s: %s",
                 message.round, self.epochs or plan.epochs, num_examples, metrics["fit_s"],
                 f" with proximal mu {plan.proximal_mu:g}" if plan.proximal_mu else "", summary)

    def _upload(self, grant: Message) -> None:
        """The server granted an upload slot: send the update held for that round and attempt."""
        attempt = grant.body["attempt"]
        held = self._answers.granted(grant.round, attempt)
        if held is None:
            log.warning("the server granted an upload for round %d attempt %d, which this client holds no update "
                        "for; ignoring it", grant.round, attempt)
            return
        kind, body, arrays = held
        messages = protocol.encode_update(Message(kind, round=grant.round, client_id=self.client_id, body=body,
                                                  arrays=arrays))  # a large one in chunks (wire/chunks.py)
        for frames in messages:
            if not self._send(frames, what=f"round {grant.round} update"):
                return
        waited_s = time.monotonic() - self._ready_at if self._ready_at is not None else 0.0
        log.info("round %d: update sent (%.1f MB%s)%s", grant.round, sum(a.nbytes for a in arrays) / 1e6,
                 f", {len(messages) - 1} chunks" if len(messages) > 1 else "",
                 f" after {waited_s:.1f}s waiting for an upload slot" if waited_s >= SLOT_WAIT_WORTH_SAYING_S else "")

    def _with_local_noise(self, plan: FitPlan) -> FitPlan:
        """The plan with this site's own local DP floor applied: at least ``local_noise_floor`` clip norms
        of noise; a plan without a clip norm (no bound, so no noise scale) is refused, not obeyed."""
        if not self.local_noise_floor or plan.local_noise >= self.local_noise_floor:
            return plan
        if plan.clip_norm <= 0:
            raise ClientError(f"the server asked for an update without clipping, but this site sends only locally "
                              f"private updates (--dp-local-noise-multiplier {self.local_noise_floor:g}); not "
                              f"sending it: run the server with --dp-local-noise-multiplier (or --dp-clipping client)")
        return dataclasses.replace(plan, local_noise=self.local_noise_floor)

    def _secure_aggregation_stage(self, message: Message) -> None:
        """Answer a secure aggregation stage (federation/secure_aggregation.py: ClientStages); a
        message that does not fit this client's round is logged and not answered (the server drops
        the client from the attempt)."""
        try:
            kind, body, arrays = self._answers.stages.answer(message.type, message.round, message.body)
        except (SecAggError, SecAggAborted) as error:
            log.warning("round %d: not answering %s: %s", message.round, message.type.value, error)
            return
        self._send(protocol.encode(Message(kind, round=message.round, client_id=self.client_id, body=body,
                                           arrays=arrays)), what=f"round {message.round} {kind.value}")
        done = {MessageType.SECAGG_SHARES: f"shares sealed for {len(body.get('boxes', {}))} neighbours",
                MessageType.SECAGG_MASKED: "masked update sent",
                MessageType.SECAGG_REVEAL: f"{len(body.get('shares', {}))} unmasking shares sent"}[kind]
        log.info("round %d: secure aggregation: %s", message.round, done)

    def _account_local_release(self, plan: FitPlan) -> None:
        """Local DP: this site's own count of the noised updates it sent, and their epsilon (at the
        plan's delta), whatever the server reports (privacy.py: one Gaussian release each)."""
        from pyfed.federation.privacy import local_epsilon_of

        self.local_releases[plan.local_noise] += 1
        delta = plan.local_delta if 0 < plan.local_delta < 1 else LOCAL_DELTA
        log.info("local differential privacy: %d noised updates sent (noise multiplier %g): this site's "
                 "local epsilon %.4g at delta %g", sum(self.local_releases.values()), plan.local_noise,
                 local_epsilon_of(dict(self.local_releases), delta), delta)

    def _evaluate(self, message: Message) -> None:
        key = ("evaluate", message.body["run"], message.round)
        if self._answer_again(key, f"round {message.round} evaluation"):
            return
        num_examples, loss, accuracy = self.trainer.evaluate(list(message.arrays))
        del message.arrays[:]
        reply = Message(MessageType.EVALUATION, round=message.round, client_id=self.client_id,
                        body={"num_examples": num_examples, "loss": loss, "accuracy": accuracy})
        self._last_answer = (key, reply)
        self._send(protocol.encode(reply), what=f"round {message.round} evaluation")
        if num_examples:
            log.info("round %d: global model on %d held-out examples: loss %.4f%s", message.round, num_examples,
                     loss if loss is not None else float("nan"),
                     f", accuracy {accuracy:.4f}" if accuracy is not None else "")

    def _statistics(self, message: Message) -> None:
        """STATS: the per-feature moments of this site's training examples (feature scaling), or of
        what one BatchNormalization layer receives under the weights sent (its recalibration);
        nothing more."""
        kind = StatsKind(message.body["kind"])
        layer, attempt = message.body.get("layer"), message.body.get("attempt", 1)
        key = ("stats", message.body["run"], kind, message.round, attempt)
        what = "feature statistics" if kind is StatsKind.FEATURES else f"statistics of BatchNorm layer {layer}"
        if self._answer_again(key, what):
            return
        if self.trainer is None:
            log.warning("ignoring the server's request for %s before it welcomed this client", what)
            return
        layers = len(batch_norm_layers(self.model)) if kind is StatsKind.BATCH_NORM else 0
        if kind is StatsKind.BATCH_NORM and not 0 <= layer < layers:
            log.warning("ignoring the server's request for %s: the model has %d BatchNorm layer(s)", what, layers)
            return
        moments = site_moments(self.trainer, kind, layer, message.arrays)
        del message.arrays[:]
        body = moments_body(moments)
        if kind is StatsKind.BATCH_NORM:
            body["attempt"] = attempt
        reply = Message(MessageType.MOMENTS, round=message.round, client_id=self.client_id, body=body)
        self._last_answer = (key, reply)
        self._send(protocol.encode(reply), what=what)
        if kind is StatsKind.FEATURES:
            log.info("sent the mean and spread of each of its %d features over %d examples, for the model's feature "
                     "scaling (nothing else about its data)", len(moments.mean), moments.count)
        else:
            log.info("sent the mean and spread of each of BatchNorm layer %s's %d channels over its %d examples, for "
                     "the global model's moving statistics (nothing else about its data)", layer, len(moments.mean),
                     self.trainer.num_train_examples)

    # --- messages -------------------------------------------------------------------------------

    def _handle_events(self) -> None:
        """React to the connection going away and coming back: log it, and rejoin once admitted."""
        for event, detail in self._transport.events():
            if event is ConnectionEvent.DISCONNECTED and not self._reconnecting:
                self._reconnecting = True
                log.warning("lost the connection to the server at %s; reconnecting (backoff up to 5s)",
                            self.server_address)
            elif event is ConnectionEvent.CONNECTED:
                self._handshake_failing_since = None
                if self._reconnecting:
                    self._reconnecting = False
                    log.info("reconnected to the server%s",
                             f"; rejoining as {self.client_id}" if self._admitted else "")
                    if self._admitted:
                        self._rejoin()
            elif event is ConnectionEvent.HANDSHAKE_FAILED:
                self._handshake_failed(detail)
            elif event is ConnectionEvent.REFUSED:
                raise self._refused(detail)

    def _handshake_failed(self, detail: str) -> None:
        """A handshake failed with no reason: tried again (ZeroMQ reconnects) until one succeeds, or
        refused once they have failed for HANDSHAKE_GRACE_S."""
        now = time.monotonic()
        if self._handshake_failing_since is None:
            self._handshake_failing_since = now
            log.warning("the handshake with the server at %s failed: %s; trying again for up to %.0fs (the server "
                        "may be restarting)", self.server_address, detail, HANDSHAKE_GRACE_S)
        elif now - self._handshake_failing_since >= HANDSHAKE_GRACE_S:
            raise self._refused(f"{detail}, for {now - self._handshake_failing_since:.0f}s")

    def _refused(self, detail: str) -> ClientError:
        return ClientError(f"the server at {self.server_address} refused the connection: {detail}; check "
                           "--curve-secret-key / --server-public-key, and that the server lists this "
                           "client's public key")

    def _rejoin(self) -> None:
        """Ask to be taken back; asked again after REJOIN_RETRY_S (or a refusal's backoff) until welcomed."""
        self._transport.send(self._join_frames(self._wants_shard))
        self._rejoin_at = time.monotonic() + REJOIN_RETRY_S

    def _receive(self, timeout_s: float) -> Message | None:
        self._check_stop()
        self._handle_events()
        frames = self._transport.recv(timeout_s)
        if frames is None:
            return None
        try:
            message = protocol.decode(frames, expected_arrays=self.specs)
            if message.type in (MessageType.FIT, MessageType.EVALUATE) and "encoding" in message.body:
                if self.specs is None:
                    raise ProtocolError(f"a {message.type.value} before this client was welcomed")
                message.arrays = decode_broadcast(message.arrays, message.body["encoding"], self.specs)
            return message
        except (ProtocolError, CompressionError) as error:
            log.warning("ignoring a malformed message from the server: %s", error)
            return None

    def _send(self, frames: list, *, what: str) -> bool:
        """Send one message, retrying while there is no connection; whether it went."""
        started = time.monotonic()
        delay = 0.2
        self._handle_events()  # a reconnect while we trained: rejoin first, so the server knows us
        while not self._transport.send(frames):
            if time.monotonic() - started > SEND_RETRY_S:
                log.warning("discarded the %s: no connection to the server for %gs (a restarted server "
                            "asks again; a running one has dropped this client from the round)", what, SEND_RETRY_S)
                return False
            log.warning("no connection to the server; retrying the %s in %.1fs", what, delay)
            self._sleep(delay)
            delay = min(delay * 2, 5.0)
        return True


def _bounded_history(history: dict[str, list], epochs: int) -> dict[str, list]:
    """The training curves as the server accepts them: at most the plan's ``epochs`` values per
    metric (the last ones, when this client trains more epochs than the plan) and at most
    MAX_HISTORY_METRICS metrics."""
    names = list(history)[: protocol.MAX_HISTORY_METRICS]
    return {name: history[name][-epochs:] for name in names}
