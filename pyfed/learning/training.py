"""Local training and evaluation on one client's data: the same code in a client process and in
an in-process simulation (where many trainers share one compiled model)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pyfed.learning.model import (batch_norm_inputs, clear_proximal_term, evaluate, evaluation_dataset,
                                  local_array_indices, reset_optimizer, set_learning_rate, set_proximal_term,
                                  training_dataset)
from pyfed.wire.protocol import FitPlan, LocalLayers

#: on_epoch(epoch, epochs, logs): called after each local epoch (1-based) with its metrics
EpochHook = Callable[[int, int, dict[str, float]], None]


class LocalTrainer:
    """Holds one client's (x, y); trains or evaluates a compiled Keras model on it.

    Part of the data may be held out (``plan.eval_fraction``) for federated evaluation; the split
    is fixed by ``seed`` so the same examples are held out every round. The tf.data pipelines are
    built once per split and batch size and reused, so Keras never re-traces between rounds.
    With ``shuffle_seed`` the batches come in a reproducible order (see :func:`make_reproducible`).

    Under ``plan.local_layers`` (FedBN) the trainer keeps the arrays of those layers from its last
    training and puts them over the global model's each time it loads one, for training and for
    evaluation alike: the site's model is the global one with its own batch normalisation. Until it
    has trained once it uses the global model's.
    """

    def __init__(self, model: Any, x: np.ndarray, y: np.ndarray, *, epochs: int | None = None,
                 batch_size: int | None = None, use_plan_learning_rate: bool = True, seed: int = 0,
                 shuffle_seed: int | None = None, on_epoch: EpochHook | None = None):
        self.model, self.x, self.y = model, x, y
        self.on_epoch = on_epoch
        self.epochs, self.batch_size = epochs, batch_size
        self.use_plan_learning_rate = use_plan_learning_rate
        self.seed = seed
        self.shuffle_seed = shuffle_seed
        self._eval_fraction: float | None = None
        self._train_rows: np.ndarray | None = None
        self._holdout_rows: np.ndarray = np.zeros(0, np.int64)
        self._train_dataset: tuple[int, Any] | None = None
        self._eval_dataset: Any = None
        self._local_layers: str = LocalLayers.NONE
        self._local: dict[int, np.ndarray] = {}  # position in get_weights() -> this site's own array

    @property
    def num_examples(self) -> int:
        """All the examples this client holds (training and held-out)."""
        return len(self.y)

    @property
    def num_train_examples(self) -> int:
        return len(self.y) if self._train_rows is None else len(self._train_rows)

    @property
    def own_arrays(self) -> int:
        """How many of the loaded model's arrays are this site's own (FedBN), not the global model's."""
        return len(self._local)

    def use_eval_fraction(self, eval_fraction: float) -> None:
        """Hold out ``eval_fraction`` of the data (at least one example stays for training)."""
        if eval_fraction == self._eval_fraction:
            return
        self._eval_fraction = eval_fraction
        self._train_rows, self._holdout_rows = holdout_split(len(self.y), eval_fraction, self.seed)
        self._train_dataset = self._eval_dataset = None

    def fit(self, weights: list[np.ndarray], plan: FitPlan) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train from ``weights`` with ``plan``: (new weights, examples trained on, {fit_s, history})."""
        self.load(weights, plan)
        return self.train(plan)

    def load(self, weights: list[np.ndarray], plan: FitPlan) -> None:
        """Start a round: the global weights into the model (and FedProx's anchor), a fresh optimizer.

        After this the caller may free ``weights`` (e.g. received frames) before :meth:`train`.
        """
        self.use_eval_fraction(plan.eval_fraction)
        if plan.local_layers != self._local_layers:
            self._local_layers, self._local = plan.local_layers, {}
        weights = self._with_local(weights)
        self.model.set_weights(weights)
        reset_optimizer(self.model)
        if self.use_plan_learning_rate:
            set_learning_rate(self.model, plan.learning_rate)
        set_proximal_term(self.model, plan.proximal_mu, weights)

    def _with_local(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """``weights`` with this site's own arrays in place of the global model's (FedBN)."""
        if not self._local:
            return weights
        return [self._local.get(index, array) for index, array in enumerate(weights)]

    def train(self, plan: FitPlan) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train the loaded weights with ``plan``: (new weights, examples trained on, {fit_s, history})."""
        epochs = self.epochs or plan.epochs
        batch_size = self.batch_size or plan.batch_size
        if self._train_dataset is None or self._train_dataset[0] != batch_size:
            x, y = (self.x, self.y) if self._train_rows is None else (self.x[self._train_rows], self.y[self._train_rows])
            self._train_dataset = (batch_size, training_dataset(x, y, batch_size, seed=self.shuffle_seed))
        started = time.perf_counter()
        try:
            history = self.model.fit(self._train_dataset[1], epochs=epochs, verbose=0, shuffle=False,  # tf.data shuffles
                                     callbacks=[_epoch_callback(self.on_epoch, epochs)] if self.on_epoch else None)
        finally:
            clear_proximal_term(self.model)  # the term belongs to training; evaluation losses must not include it
        fit_s = time.perf_counter() - started
        curves = {name: [float(v) if math.isfinite(float(v)) else None for v in values]
                  for name, values in history.history.items()}
        trained = self.model.get_weights()
        self._local = {index: trained[index].copy() for index in local_array_indices(self.model, self._local_layers)}
        return trained, self.num_train_examples, {"fit_s": round(fit_s, 6), "history": curves}

    def training_examples(self) -> np.ndarray:
        """The examples this site trains on (not the held-out ones): what its statistics summarise."""
        return self.x if self._train_rows is None else self.x[self._train_rows]

    def batch_norm_inputs(self, weights: list[np.ndarray], position: int, fold: Callable[[np.ndarray], None]) -> None:
        """Run ``weights`` (the global model as sent, this site's own layers not put over it: it is the
        global model's statistics that are measured) over the training examples and hand ``fold`` what
        BatchNormalization layer ``position`` receives (see :func:`~pyfed.learning.model.batch_norm_inputs`)."""
        self.model.set_weights(weights)
        batch_norm_inputs(self.model, position, self.training_examples(), fold)

    def evaluate(self, weights: list[np.ndarray]) -> tuple[int, float | None, float | None]:
        """(held-out examples, loss, accuracy) of ``weights`` (with this site's own layers, under FedBN);
        (0, None, None) if nothing is held out."""
        if not len(self._holdout_rows):
            return 0, None, None
        if self._eval_dataset is None:
            self._eval_dataset = evaluation_dataset(self.x[self._holdout_rows], self.y[self._holdout_rows])
        self.model.set_weights(self._with_local(weights))
        loss, accuracy = evaluate(self.model, self._eval_dataset)
        return len(self._holdout_rows), (loss if math.isfinite(loss) else None), accuracy


def holdout_split(num_rows: int, eval_fraction: float, seed: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(training rows, held-out rows) of a site's ``num_rows`` examples: ``eval_fraction`` of them held
    out, at least one left for training, the same rows for the same ``seed``; (None, no rows) if
    nothing is held out."""
    num_holdout = min(int(math.floor(eval_fraction * num_rows)), num_rows - 1)
    if num_holdout <= 0:
        return None, np.zeros(0, np.int64)
    order = np.random.default_rng(seed).permutation(num_rows)
    return np.sort(order[num_holdout:]), np.sort(order[:num_holdout])


def _epoch_callback(on_epoch: EpochHook, epochs: int) -> Any:
    """A Keras callback that hands each finished epoch's metrics to ``on_epoch``."""
    import keras

    class EpochCallback(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            on_epoch(epoch + 1, epochs, {k: float(v) for k, v in (logs or {}).items()})

    return EpochCallback()


class EpochLog:
    """When a client says how its local training goes: after the first epoch, then at most once every
    ``every_s`` seconds (a long epoch: each one), never after the last (the round's own line follows)."""

    def __init__(self, every_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.clock = every_s, clock
        self._last: float | None = None

    def due(self, epoch: int, epochs: int) -> bool:
        now = self.clock()
        if epoch >= epochs or (epoch > 1 and self._last is not None and now - self._last < self.every_s):
            return False
        self._last = now
        return True


def training_device() -> str:
    """Where TensorFlow places this process's training: ``GPU:0`` (the first visible GPU) or ``CPU``."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name.replace("/device:", "") if gpus else "CPU"


def make_reproducible(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and ask TensorFlow for deterministic ops, so a client
    given the same weights, data and seed trains to the same bytes every time."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
