"""Local training: FedProx's proximal term, the held-out split for federated evaluation, and the
weighted combination of clients' evaluations."""

import numpy as np
import pytest

from pyfed.learning.model import default_model, set_proximal_term
from pyfed.wire.protocol import FitPlan
from pyfed.federation.aggregate import weighted_evaluation
from pyfed.learning.training import LocalTrainer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def distance_after_training(data, mu):
    import keras

    keras.utils.set_random_seed(0)
    model = default_model((8,), 2, 0.05)
    start = [w.copy() for w in model.get_weights()]
    trainer = LocalTrainer(model, *data, seed=0)
    weights, _, _ = trainer.fit(start, FitPlan(epochs=5, batch_size=8, learning_rate=0.05, proximal_mu=mu))
    return float(np.sqrt(sum(np.sum((w - s) ** 2) for w, s in zip(weights, start)))), model


def test_the_proximal_term_keeps_local_weights_near_the_global_ones(data):
    free, model = distance_after_training(data, 0.0)
    held, held_model = distance_after_training(data, 10.0)
    assert held < 0.5 * free
    # the term is attached to the variables, not added as model weights
    assert len(held_model.get_weights()) == len(model.get_weights()) == 6


def test_the_proximal_term_is_zero_at_the_anchor_and_adds_mu_half_squared_distance(data):
    import keras

    model = default_model((8,), 2)
    weights = model.get_weights()
    set_proximal_term(model, 2.0, weights)
    assert float(keras.ops.sum(model.losses)) == pytest.approx(0.0)
    shifted = [w + 0.5 for w in weights]
    set_proximal_term(model, 2.0, shifted)  # anchor moved by 0.5 in every trainable coordinate
    num_trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert float(keras.ops.sum(model.losses)) == pytest.approx(0.5 * 2.0 * 0.25 * num_trainable, rel=1e-5)
    set_proximal_term(model, 0.0, shifted)
    assert float(keras.ops.sum(model.losses)) == pytest.approx(0.0)


def test_evaluation_after_fedprox_training_reports_the_plain_loss(data):
    import keras

    _, model = distance_after_training(data, 10.0)
    assert float(keras.ops.sum(model.losses)) == 0.0  # the term is off outside training
    trainer = LocalTrainer(model, *data, seed=0)
    trainer.use_eval_fraction(0.5)
    _, loss, _ = trainer.evaluate(model.get_weights())
    plain = keras.losses.SparseCategoricalCrossentropy()(data[1][trainer._holdout_rows],
                                                         model.predict(data[0][trainer._holdout_rows], verbose=0))
    assert loss == pytest.approx(float(plain), rel=1e-4)


def test_mu_zero_on_a_fresh_model_adds_nothing(data):
    model = default_model((8,), 2)
    set_proximal_term(model, 0.0, model.get_weights())
    assert all(v.regularizer is None for v in model.trainable_weights)


def test_held_out_examples_are_fixed_never_trained_on_and_evaluated(data):
    model = default_model((8,), 2)
    trainer = LocalTrainer(model, *data, seed=3)
    _, num_examples, metrics = trainer.fit(model.get_weights(), FitPlan(epochs=1, eval_fraction=0.25))
    assert num_examples == 45 and trainer.num_train_examples == 45
    held_out, loss, accuracy = trainer.evaluate(model.get_weights())
    assert held_out == 15 and loss > 0 and 0 <= accuracy <= 1
    rows = trainer._holdout_rows.copy()
    trainer.fit(model.get_weights(), FitPlan(epochs=1, eval_fraction=0.25))
    np.testing.assert_array_equal(trainer._holdout_rows, rows)  # same examples every round
    assert len(np.intersect1d(trainer._train_rows, rows)) == 0
    assert LocalTrainer(model, *data, seed=3).evaluate(model.get_weights()) == (0, None, None)  # nothing held out


def test_the_largest_fraction_still_leaves_examples_for_training():
    x, y = np.zeros((10, 8), np.float32), np.arange(10) % 2
    trainer = LocalTrainer(default_model((8,), 2), x, y)
    trainer.use_eval_fraction(0.9)
    assert trainer.num_train_examples == 1 and len(trainer._holdout_rows) == 9
    trainer.use_eval_fraction(0.05)  # rounds down to nothing held out
    assert trainer.num_train_examples == 10 and len(trainer._holdout_rows) == 0


def test_weighted_evaluation_by_hand():
    combined = weighted_evaluation({"a": (10, 1.0, 0.5), "b": (30, 2.0, 0.9), "c": (0, None, None)})
    assert combined["num_examples"] == 40
    assert combined["loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert combined["accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert set(combined["clients"]) == {"a", "b"}
    assert weighted_evaluation({"a": (0, None, None)}) is None
    assert weighted_evaluation({"a": (5, 1.0, None)})["accuracy"] is None


def test_each_round_starts_with_a_fresh_optimizer_and_keeps_its_learning_rate(data):
    """A round trained after ``reset_optimizer`` equals the same round on a just-compiled model, and
    a recompiled model (a new optimizer) is reset too."""
    import keras

    from pyfed.learning.model import reset_optimizer

    def trained(model, start):
        keras.utils.set_random_seed(1)
        model.set_weights(start)
        model.fit(*data, epochs=2, batch_size=8, verbose=0, shuffle=False)
        return model.get_weights()

    keras.utils.set_random_seed(0)
    model = default_model((8,), 2, 0.05)
    start = [w.copy() for w in model.get_weights()]
    fresh = trained(model, start)
    for compiled_again in (False, True):
        if compiled_again:
            model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
            trained(model, start)
        reset_optimizer(model)
        optimizer = model.optimizer
        slots = [v for v in optimizer.variables if v is not optimizer._learning_rate]
        assert slots and all(not np.asarray(v).any() for v in slots)
        assert float(np.asarray(optimizer.learning_rate)) == pytest.approx(0.05)
        assert all(np.array_equal(a, b) for a, b in zip(trained(model, start), fresh))


def test_each_local_epoch_hands_its_metrics_to_the_hook_and_the_history_matches(data):
    import keras

    keras.utils.set_random_seed(0)
    model = default_model((8,), 2, 0.05)
    seen = []
    trainer = LocalTrainer(model, *data, seed=0, on_epoch=lambda epoch, epochs, logs: seen.append((epoch, epochs, logs)))
    _, _, metrics = trainer.fit(model.get_weights(), FitPlan(epochs=3, batch_size=8, learning_rate=0.05))
    assert [(epoch, epochs) for epoch, epochs, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [logs["loss"] for _, _, logs in seen] == pytest.approx(metrics["history"]["loss"])
    assert all("accuracy" in logs for _, _, logs in seen)


def test_epoch_lines_come_after_the_first_epoch_then_at_most_every_few_seconds_and_never_after_the_last():
    from pyfed.learning.training import EpochLog

    now = [0.0]
    epoch_log = EpochLog(every_s=5.0, clock=lambda: now[0])
    said = []
    for epoch in range(1, 21):  # epochs of 1 s each
        now[0] += 1.0
        if epoch_log.due(epoch, 20):
            said.append(epoch)
    assert said == [1, 6, 11, 16]  # not 20: the round's own line gives the last epoch
    slow = EpochLog(every_s=5.0, clock=lambda: now[0])
    said = []
    for epoch in range(1, 4):  # epochs of 10 s each: every one is said, but the last
        now[0] += 10.0
        if slow.due(epoch, 3):
            said.append(epoch)
    assert said == [1, 2]


def batch_norm_model():
    import keras

    from pyfed.learning.model import compile_default

    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6),
                              keras.layers.BatchNormalization(name="inner_bn")], name="block")
    model = keras.Sequential([keras.Input((8,)), inner, keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Dense(2, activation="softmax")])
    compile_default(model, 0.05)
    return model


def test_fedbn_finds_every_batch_norm_array_nested_ones_too_and_none_without_it():
    from pyfed.learning.model import local_array_indices

    model = batch_norm_model()
    kept = local_array_indices(model, "batchnorm")
    names = [model.weights[i].path for i in kept]
    assert len(kept) == 8 and all("bn" in name for name in names), names  # 2 layers x (gamma, beta, mean, var)
    assert local_array_indices(model, "none") == ()
    assert local_array_indices(default_model((8,), 2, 0.05), "batchnorm") == ()


def test_under_fedbn_a_site_trains_and_evaluates_with_its_own_batch_norm_and_the_global_other_layers(data):
    from pyfed.learning.model import local_array_indices

    model = batch_norm_model()
    kept = set(local_array_indices(model, "batchnorm"))
    plan = FitPlan(epochs=2, batch_size=8, learning_rate=0.05, local_layers="batchnorm", eval_fraction=0.2)
    trainer = LocalTrainer(model, *data, seed=0)
    global_1 = [w.copy() for w in model.get_weights()]
    trained_1, _, _ = trainer.fit(global_1, plan)
    assert any(not np.array_equal(trained_1[i], global_1[i]) for i in kept)  # moving statistics moved

    # the next global model: other BatchNorm values (the sites' average), other dense weights
    global_2 = [w + 0.5 for w in trained_1]
    trainer.load(global_2, plan)
    loaded = model.get_weights()
    for index, array in enumerate(loaded):
        expected = trained_1[index] if index in kept else global_2[index]
        assert np.array_equal(array, expected), (index, model.weights[index].path)
    # federated evaluation measures the site's own model: the global one with its BatchNorm layers
    model.set_weights(global_2)
    trainer.evaluate(global_2)
    assert all(np.array_equal(model.get_weights()[i], trained_1[i]) for i in kept)

    # without FedBN (a new run's plan) the site takes every global array again
    trainer.load(global_2, FitPlan(epochs=2, batch_size=8, learning_rate=0.05))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), global_2))


def test_the_server_names_batch_norm_layers_and_what_is_done_with_them():
    from pyfed.learning.model import batch_norm_notice

    model = batch_norm_model()
    averaged, local = batch_norm_notice(model, "none"), batch_norm_notice(model, "batchnorm")
    assert "2 BatchNormalization layer(s) (inner_bn, bn)" in averaged and "LOCAL_LAYERS=batchnorm" in averaged
    assert "stay at each site (FedBN" in local
    assert batch_norm_notice(default_model((8,), 2, 0.05), "batchnorm") is None
