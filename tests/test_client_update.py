"""client_update and fedsgd_client_gradient (pure TF, no TFF) vs hand computations."""

import collections

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from fedprompt import client_update as cu
from optimizers import ClientOptimizer, build_client_optimizer
from tests import federated_toy as toy

P0 = np.array([[0.5, -1.0, 0.2], [2.0, 0.25, -0.3]], np.float32)
A = np.array([[0.3, -0.4, 0.0], [1.2, 0.0, 0.5]], np.float32)


def linear_loss(prompt, batch):
    """Token-mean loss `sum(A * P)` for every batch: gradient exactly A."""
    n = tf.reduce_sum(tf.cast(batch["target_mask"], tf.float32))
    return tf.reduce_sum(A * prompt) * n, n


def _dataset(num_batches=3, batch_size=2, seq_len=4, tokens_per_row=2):
    target = np.zeros((num_batches * batch_size, seq_len), bool)
    target[:, :tokens_per_row] = True
    examples = collections.OrderedDict(
        token_ids=np.zeros((num_batches * batch_size, seq_len), np.int32),
        padding_mask=np.ones((num_batches * batch_size, seq_len), bool),
        target_mask=target,
    )
    return tf.data.Dataset.from_tensor_slices(examples).batch(batch_size)


def _run(loss_fn, dataset, kind=ClientOptimizer.SGD, lr=0.1, prompt=P0, wrap=False, **kwargs):
    var = tf.Variable(tf.zeros(prompt.shape))
    opt = build_client_optimizer(kind, learning_rate=lr)
    opt.build([var])

    def fn(p, ds):
        return cu.client_update(
            loss_fn=loss_fn,
            prompt_variable=var,
            initial_prompt=p,
            dataset=ds,
            optimizer=opt,
            **kwargs,
        )

    if wrap:
        fn = tf.function(fn)
    return fn(tf.constant(prompt), dataset)


class ClientUpdateTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(("eager", False), ("tf_function", True))
    def test_one_sgd_step_on_toy_model(self, wrap):
        examples = toy.make_examples(4, seed=3)
        dataset = toy.make_dataset(examples, 4)
        loss_fn = toy.eager_loss_fn()
        p0 = toy.initial_prompt()
        prompt = tf.constant(p0)
        with tf.GradientTape() as tape:
            tape.watch(prompt)
            loss_sum, n = loss_fn(prompt, next(iter(dataset)))
            mean = loss_sum / n
        grad = tape.gradient(mean, prompt)
        out = _run(loss_fn, dataset, lr=0.3, prompt=p0, wrap=wrap)
        self.assertAllClose(out.prompt_delta, -0.3 * grad, atol=1e-6)
        self.assertAllClose(out.loss_mean, mean, atol=1e-6)
        self.assertAllClose(out.grad_norm, tf.norm(grad), atol=1e-6)
        self.assertAllClose(out.update_norm, 0.3 * tf.norm(grad), atol=1e-6)
        self.assertEqual(int(out.num_examples), 4)
        self.assertEqual(int(out.num_steps), 1)
        self.assertEqual(float(out.num_tokens), float(n))
        self.assertTrue(bool(out.is_finite))

    def test_l2_gradient_is_lambda_times_distance(self):
        ref = np.full_like(P0, 0.1)
        lam, lr = 0.7, 0.1
        out = _run(linear_loss, _dataset(num_batches=1), lr=lr, l2_strength=lam, l2_reference=ref)
        gradient = A + lam * (P0 - ref)
        self.assertAllClose(out.prompt_delta, -lr * gradient, atol=1e-6)
        self.assertAllClose(out.grad_norm, np.linalg.norm(gradient), atol=1e-6)
        # The reported loss is the data loss only, without the penalty.
        self.assertAllClose(out.loss_mean, np.sum(A * P0), atol=1e-6)

    def test_l2_reference_defaults_to_initial_prompt(self):
        lam, lr = 2.0, 0.1
        out = _run(linear_loss, _dataset(num_batches=2), lr=lr, l2_strength=lam)
        # Step 1 sits on the reference (penalty gradient 0); step 2 is pulled back.
        p1 = P0 - lr * A
        p2 = p1 - lr * (A + lam * (p1 - P0))
        self.assertAllClose(out.prompt_delta, p2 - P0, atol=1e-6)

    def test_clipping_bounds_the_step_and_reports_the_raw_norm(self):
        norm_a = np.linalg.norm(A)
        out = _run(linear_loss, _dataset(num_batches=1), lr=0.1, clip_norm=0.5)
        self.assertAllClose(out.prompt_delta, -0.1 * A * 0.5 / norm_a, atol=1e-6)
        self.assertAllClose(out.grad_norm, norm_a, atol=1e-6)
        # A bound above the norm leaves the gradient alone.
        out = _run(linear_loss, _dataset(num_batches=1), lr=0.1, clip_norm=10.0)
        self.assertAllClose(out.prompt_delta, -0.1 * A, atol=1e-6)

    @parameterized.named_parameters(("sgdm", ClientOptimizer.SGDM), ("adam", ClientOptimizer.ADAM))
    def test_stateful_optimizers_vs_manual(self, kind):
        lam, lr, steps = 0.5, 0.05, 3
        ref = np.zeros_like(P0)
        out = _run(
            linear_loss,
            _dataset(num_batches=steps),
            kind=kind,
            lr=lr,
            wrap=True,
            l2_strength=lam,
            l2_reference=ref,
        )
        p = P0.astype(np.float64)
        m = np.zeros_like(p)
        v = np.zeros_like(p)
        norms = []
        for t in range(1, steps + 1):
            g = A + lam * (p - ref)
            norms.append(np.linalg.norm(g))
            if kind == ClientOptimizer.SGDM:
                m = 0.9 * m - lr * g
                p = p + m
            else:
                m = m + 0.1 * (g - m)
                v = v + 0.001 * (g * g - v)
                p = p - lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-7)
        self.assertAllClose(out.prompt_delta, p - P0, atol=1e-5)
        self.assertAllClose(out.grad_norm, np.mean(norms), atol=1e-5)

    def test_epochs_and_max_steps(self):
        dataset = _dataset(num_batches=3, batch_size=2)  # 6 examples, 4 tokens per batch
        out = _run(linear_loss, dataset, num_epochs=2)
        self.assertEqual(int(out.num_steps), 6)
        self.assertEqual(int(out.num_examples), 12)
        self.assertEqual(float(out.num_tokens), 24.0)
        self.assertAllClose(out.prompt_delta, -0.1 * 6 * A, atol=1e-5)
        out = _run(linear_loss, dataset, num_epochs=None, max_steps=4)
        self.assertEqual(int(out.num_steps), 4)
        out = _run(linear_loss, dataset, num_epochs=1, max_steps=10)
        self.assertEqual(int(out.num_steps), 3)

    def test_loss_mean_is_token_weighted_over_steps(self):
        examples = toy.make_examples(5, seed=4)
        dataset = toy.make_dataset(examples, 2)  # batches of 2, 2, 1
        loss_fn = toy.eager_loss_fn()
        lr = 0.2
        p = tf.constant(toy.initial_prompt())
        total, tokens = 0.0, 0.0
        for batch in dataset:  # replay by hand
            with tf.GradientTape() as tape:
                tape.watch(p)
                s, n = loss_fn(p, batch)
                mean = s / n
            p = p - lr * tape.gradient(mean, p)
            total, tokens = total + float(s), tokens + float(n)
        out = _run(loss_fn, dataset, lr=lr, prompt=toy.initial_prompt(), wrap=True)
        self.assertAllClose(out.loss_mean, total / tokens, atol=1e-6)
        self.assertAllClose(out.prompt_delta, p - toy.initial_prompt(), atol=1e-6)
        self.assertEqual(float(out.num_tokens), tokens)

    def test_empty_dataset_and_no_target_tokens(self):
        empty = _dataset(num_batches=1).take(0)
        out = _run(linear_loss, empty)
        self.assertAllEqual(out.prompt_delta, np.zeros_like(P0))
        self.assertEqual(int(out.num_steps), 0)
        self.assertTrue(bool(out.is_finite))
        no_targets = _dataset(num_batches=1, tokens_per_row=0)
        out = _run(linear_loss, no_targets)
        # divide_no_nan: a batch without targets contributes a zero gradient, not NaN.
        self.assertAllEqual(out.prompt_delta, np.zeros_like(P0))
        self.assertTrue(bool(out.is_finite))

    def test_nan_loss_is_flagged(self):
        examples = toy.make_examples(3, seed=1, poison=True)
        out = _run(toy.eager_loss_fn(), toy.make_dataset(examples, 3), prompt=toy.initial_prompt())
        self.assertFalse(bool(out.is_finite))

    def test_loss_without_prompt_dependence_gives_zero_gradient(self):
        def constant_loss(prompt, batch):
            del prompt
            n = tf.reduce_sum(tf.cast(batch["target_mask"], tf.float32))
            return 2.0 * n, n

        out = _run(constant_loss, _dataset(num_batches=1), wrap=True)
        self.assertAllEqual(out.prompt_delta, np.zeros_like(P0))
        self.assertAllClose(out.loss_mean, 2.0)

    def test_train_step_compiles_with_xla_and_matches_client_update(self):
        examples = toy.make_examples(4, seed=2)
        batch = next(iter(toy.make_dataset(examples, 4)))
        p0 = toy.initial_prompt()
        var = tf.Variable(p0)
        opt = build_client_optimizer(ClientOptimizer.ADAM, learning_rate=0.05)
        opt.build([var])
        step = tf.function(
            lambda b: cu.client_train_step(
                loss_fn=toy.eager_loss_fn(),
                prompt_variable=var,
                batch=b,
                optimizer=opt,
                clip_norm=0.1,
                l2_strength=0.3,
                l2_reference=tf.zeros(toy.PROMPT_SHAPE),
            ),
            jit_compile=True,
        )
        for _ in range(2):
            loss_sum, num_tokens, _ = step(batch)
        reference = _run(
            toy.eager_loss_fn(),
            toy.make_dataset(examples, 4),
            kind=ClientOptimizer.ADAM,
            lr=0.05,
            prompt=p0,
            num_epochs=2,
            clip_norm=0.1,
            l2_strength=0.3,
            l2_reference=np.zeros(toy.PROMPT_SHAPE, np.float32),
        )
        self.assertAllClose(var.numpy() - p0, reference.prompt_delta, atol=1e-6)
        self.assertAllClose(num_tokens * 2, reference.num_tokens)
        self.assertGreater(float(loss_sum), 0.0)

    @parameterized.named_parameters(
        ("epochs", {"num_epochs": 0}, "num_epochs"),
        ("steps", {"max_steps": 0}, "max_steps"),
        ("neither", {"num_epochs": None}, "num_epochs"),
        ("clip", {"clip_norm": -1.0}, "clip_norm"),
        ("l2", {"l2_strength": -0.1}, "l2_strength"),
    )
    def test_invalid_arguments(self, kwargs, name):
        with self.assertRaisesRegex(ValueError, f"`{name}`"):
            _run(linear_loss, _dataset(num_batches=1), **kwargs)


class FedSGDClientGradientTest(tf.test.TestCase):
    def test_gradient_sum_equals_gradient_of_the_total_loss(self):
        examples = toy.make_examples(5, seed=7)
        loss_fn = toy.eager_loss_fn()
        prompt = tf.constant(toy.initial_prompt())
        with tf.GradientTape() as tape:
            tape.watch(prompt)
            # All 5 examples as one batch: the summed loss is additive over batches.
            total, n = loss_fn(prompt, next(iter(toy.make_dataset(examples, 5))))
        expected = tape.gradient(total, prompt)
        out = tf.function(
            lambda p, ds: cu.fedsgd_client_gradient(loss_fn=loss_fn, prompt=p, dataset=ds)
        )(prompt, toy.make_dataset(examples, 2))
        self.assertAllClose(out.gradient_sum, expected, atol=1e-5)
        self.assertAllClose(out.loss_sum, total, atol=1e-5)
        self.assertEqual(float(out.num_tokens), float(n))
        self.assertEqual(int(out.num_examples), 5)
        self.assertAllClose(out.grad_norm, tf.norm(expected / n), atol=1e-6)
        self.assertTrue(bool(out.is_finite))

    def test_poisoned_data_is_flagged(self):
        examples = toy.make_examples(3, seed=1, poison=True)
        out = cu.fedsgd_client_gradient(
            loss_fn=toy.eager_loss_fn(),
            prompt=tf.constant(toy.initial_prompt()),
            dataset=toy.make_dataset(examples, 3),
        )
        self.assertFalse(bool(out.is_finite))


if __name__ == "__main__":
    tf.test.main()
