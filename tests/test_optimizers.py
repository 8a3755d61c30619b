"""Client (tf.keras) and server (tff.learning) optimizers vs their update rules by hand."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from optimizers import (
    ClientOptimizer,
    ServerOptimizer,
    build_client_optimizer,
    build_server_optimizer,
)

W0 = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
GRADS = [
    np.array([[0.1, -0.2], [0.3, 0.0]], np.float32),
    np.array([[-0.4, 0.5], [0.05, 1.0]], np.float32),
    np.array([[0.2, 0.2], [-0.3, -0.1]], np.float32),
]
LR = 0.1


def manual(kind: str, **hp):
    """Applies the textbook update rules with numpy (float64)."""
    w = W0.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    a = np.full_like(w, hp.get("init_acc", 0.1))
    for t, g in enumerate(GRADS, start=1):
        if kind == "sgd":
            w = w - LR * g
        elif kind == "keras_sgdm":
            m = hp["momentum"] * m - LR * g
            w = w + m
        elif kind == "tff_sgdm":
            m = hp["momentum"] * m + g
            w = w - LR * m
        elif kind == "adam":
            b1, b2, eps = hp["beta_1"], hp["beta_2"], hp["epsilon"]
            m = m + (1 - b1) * (g - m)
            v = v + (1 - b2) * (g * g - v)
            lr_t = LR * np.sqrt(1 - b2**t) / (1 - b1**t)
            w = w - lr_t * m / (np.sqrt(v) + eps)
        elif kind == "adagrad":
            a = a + g * g
            w = w - LR * g / np.sqrt(a + hp["epsilon"])
    return w


class ClientOptimizerTest(tf.test.TestCase, parameterized.TestCase):
    def _run(self, optimizer):
        var = tf.Variable(W0)
        optimizer.build([var])
        for g in GRADS:
            optimizer.apply_gradients([(tf.constant(g), var)])
        return var.numpy()

    @parameterized.named_parameters(
        ("sgd", ClientOptimizer.SGD, {}, "sgd", {}),
        ("sgdm_default", ClientOptimizer.SGDM, {}, "keras_sgdm", {"momentum": 0.9}),
        ("sgdm_half", ClientOptimizer.SGDM, {"momentum": 0.5}, "keras_sgdm", {"momentum": 0.5}),
        (
            "adam",
            ClientOptimizer.ADAM,
            {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-3},
            "adam",
            {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-3},
        ),
        (
            "adam_default",
            ClientOptimizer.ADAM,
            {},
            "adam",
            {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
        ),
        ("adagrad", ClientOptimizer.ADAGRAD, {}, "adagrad", {"epsilon": 1e-7}),
        (
            "adagrad_acc",
            ClientOptimizer.ADAGRAD,
            {"initial_accumulator_value": 0.5, "epsilon": 1e-4},
            "adagrad",
            {"init_acc": 0.5, "epsilon": 1e-4},
        ),
    )
    def test_matches_manual_rule(self, kind, kwargs, rule, hp):
        optimizer = build_client_optimizer(kind, learning_rate=LR, **kwargs)
        self.assertIsInstance(optimizer, tf.keras.optimizers.Optimizer)
        self.assertAllClose(self._run(optimizer), manual(rule, **hp), atol=1e-6, rtol=1e-5)

    @parameterized.named_parameters(
        ("lr_zero", ClientOptimizer.SGD, {"learning_rate": 0.0}, "learning_rate"),
        ("lr_negative", ClientOptimizer.ADAM, {"learning_rate": -1.0}, "learning_rate"),
        ("lr_nan", ClientOptimizer.SGD, {"learning_rate": float("nan")}, "learning_rate"),
        ("momentum_one", ClientOptimizer.SGDM, {"learning_rate": 0.1, "momentum": 1.0}, "momentum"),
        (
            "momentum_unused",
            ClientOptimizer.SGD,
            {"learning_rate": 0.1, "momentum": 0.9},
            "momentum",
        ),
        ("beta_unused", ClientOptimizer.SGDM, {"learning_rate": 0.1, "beta_1": 0.9}, "beta_1"),
        ("beta_range", ClientOptimizer.ADAM, {"learning_rate": 0.1, "beta_2": 1.5}, "beta_2"),
        ("epsilon", ClientOptimizer.ADAGRAD, {"learning_rate": 0.1, "epsilon": 0.0}, "epsilon"),
        (
            "accumulator",
            ClientOptimizer.ADAGRAD,
            {"learning_rate": 0.1, "initial_accumulator_value": -1.0},
            "initial_accumulator_value",
        ),
    )
    def test_invalid_arguments_are_named(self, kind, kwargs, name):
        with self.assertRaisesRegex(ValueError, f"`{name}`"):
            build_client_optimizer(kind, **kwargs)

    def test_string_kind_is_rejected(self):
        with self.assertRaisesRegex(TypeError, "ClientOptimizer"):
            build_client_optimizer("sgd", learning_rate=0.1)

    def test_enum_round_trips_strings(self):
        self.assertEqual(ClientOptimizer("adam"), ClientOptimizer.ADAM)
        self.assertEqual(ServerOptimizer("sgdm"), ServerOptimizer.SGDM)


class ServerOptimizerTest(tf.test.TestCase, parameterized.TestCase):
    def _run(self, optimizer):
        state = optimizer.initialize(tf.TensorSpec(W0.shape, tf.float32))
        w = tf.constant(W0)
        for g in GRADS:
            state, w = optimizer.next(state, w, tf.constant(g))
        return w.numpy()

    @parameterized.named_parameters(
        ("sgd", ServerOptimizer.SGD, {}, "sgd", {}),
        ("sgdm", ServerOptimizer.SGDM, {"momentum": 0.7}, "tff_sgdm", {"momentum": 0.7}),
        ("sgdm_default", ServerOptimizer.SGDM, {}, "tff_sgdm", {"momentum": 0.9}),
        ("sgdm_zero", ServerOptimizer.SGDM, {"momentum": 0.0}, "sgd", {}),
        (
            "adam",
            ServerOptimizer.ADAM,
            {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-3},
            "adam",
            {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-3},
        ),
    )
    def test_matches_manual_rule(self, kind, kwargs, rule, hp):
        optimizer = build_server_optimizer(kind, learning_rate=LR, **kwargs)
        self.assertAllClose(self._run(optimizer), manual(rule, **hp), atol=1e-6, rtol=1e-5)

    def test_sgd_lr_one_adds_the_negated_pseudo_gradient(self):
        optimizer = build_server_optimizer(ServerOptimizer.SGD, learning_rate=1.0)
        state = optimizer.initialize(tf.TensorSpec(W0.shape, tf.float32))
        delta = GRADS[0]
        _, w = optimizer.next(state, tf.constant(W0), tf.constant(-delta))
        self.assertAllClose(w, W0 + delta)

    @parameterized.named_parameters(
        ("lr", ServerOptimizer.SGD, {"learning_rate": 0.0}, "learning_rate"),
        (
            "momentum_unused",
            ServerOptimizer.ADAM,
            {"learning_rate": 0.1, "momentum": 0.9},
            "momentum",
        ),
        ("epsilon_unused", ServerOptimizer.SGD, {"learning_rate": 0.1, "epsilon": 1e-3}, "epsilon"),
        ("beta", ServerOptimizer.ADAM, {"learning_rate": 0.1, "beta_1": -0.1}, "beta_1"),
    )
    def test_invalid_arguments_are_named(self, kind, kwargs, name):
        with self.assertRaisesRegex(ValueError, f"`{name}`"):
            build_server_optimizer(kind, **kwargs)

    def test_wrong_kind_type(self):
        with self.assertRaisesRegex(TypeError, "ServerOptimizer"):
            build_server_optimizer(ClientOptimizer.SGD, learning_rate=1.0)


if __name__ == "__main__":
    tf.test.main()
