"""FedSGD TFF process vs one full-batch gradient step on the union of the clients' data."""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from absl.testing import parameterized

from fedprompt import fed_avg, fed_sgd
from fedprompt import server_update as server_update_lib
from optimizers import ClientOptimizer, ServerOptimizer
from tests import federated_toy as toy

CLIENT_SIZES = (3, 5, 2)


def _client_examples(poison_index=None):
    return [
        toy.make_examples(n, seed=20 + i, poison=(i == poison_index))
        for i, n in enumerate(CLIENT_SIZES)
    ]


def _datasets(examples):
    return [toy.make_dataset(e, 2) for e in examples]


def _union_gradient(prompt, examples):
    """Gradient of the token-mean loss over all examples, as one batch."""
    union = collections.OrderedDict(
        (k, np.concatenate([e[k] for e in examples])) for k in examples[0]
    )
    p = tf.constant(prompt)
    with tf.GradientTape() as tape:
        tape.watch(p)
        s, n = toy.eager_loss_fn()(p, union)
        mean = s / n
    return tape.gradient(mean, p).numpy(), float(mean)


def _build(**kwargs):
    args = dict(
        model_fn=toy.model_fn,
        prompt_shape=toy.PROMPT_SHAPE,
        batch_spec=toy.batch_spec(),
        initial_prompt=toy.initial_prompt(),
        server_optimizer=ServerOptimizer.SGD,
        server_learning_rate=0.5,
    )
    args.update(kwargs)
    return fed_sgd.build_fed_sgd(**args)


class FedSGDTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.process = _build()

    def test_two_rounds_equal_full_batch_gradient_steps_on_the_union(self):
        examples = _client_examples()
        p = toy.initial_prompt()
        state = self.process.initialize()
        for chosen in ([0, 1, 2], [1, 2]):
            sampled = [examples[i] for i in chosen]
            grad, loss = _union_gradient(p, sampled)
            state, metrics = self.process.next(state, _datasets(sampled))
            p = p - 0.5 * grad
            self.assertAllClose(state.prompt, p, atol=1e-6)
            self.assertAllClose(metrics["train_loss"], loss, atol=1e-6)
            self.assertAllClose(metrics["server_grad_norm"], np.linalg.norm(grad), atol=1e-6)
            self.assertEqual(metrics["num_clients"], len(chosen))
        self.assertEqual(state.round_num, 2)

    def test_union_gradient_is_token_weighted_not_client_mean(self):
        examples = _client_examples()
        p0 = toy.initial_prompt()
        grad, _ = _union_gradient(p0, examples)
        client_grads = [_union_gradient(p0, [e])[0] for e in examples]
        # The plain mean of client mean-gradients is a different (wrong) step.
        self.assertGreater(np.abs(np.mean(client_grads, axis=0) - grad).max(), 1e-4)
        _, metrics = self.process.next(self.process.initialize(), _datasets(examples))
        norms = [np.linalg.norm(g) for g in client_grads]
        self.assertAllClose(metrics["grad_norm_min"], min(norms), atol=1e-6)
        self.assertAllClose(metrics["grad_norm_max"], max(norms), atol=1e-6)
        self.assertAllClose(metrics["grad_norm_mean"], np.mean(norms), atol=1e-6)

    def test_server_momentum_vs_manual(self):
        process = _build(server_optimizer=ServerOptimizer.SGDM, server_momentum=0.5)
        examples = _client_examples()
        p, m = toy.initial_prompt(), 0.0
        state = process.initialize()
        for _ in range(2):
            grad, _ = _union_gradient(p, examples)
            m = 0.5 * m + grad
            p = p - 0.5 * m
            state, _ = process.next(state, _datasets(examples))
        self.assertAllClose(state.prompt, p, atol=1e-6)

    def test_nonfinite_client_is_excluded_and_counted(self):
        examples = _client_examples(poison_index=0)
        p0 = toy.initial_prompt()
        grad, _ = _union_gradient(p0, examples[1:])
        state, metrics = self.process.next(self.process.initialize(), _datasets(examples))
        self.assertAllClose(state.prompt, p0 - 0.5 * grad, atol=1e-6)
        self.assertEqual(metrics["num_nonfinite_clients"], 1)
        self.assertEqual(metrics["num_examples"], sum(CLIENT_SIZES[1:]))

        poisoned = [toy.make_examples(2, seed=1, poison=True)]
        state0 = self.process.initialize()
        state, metrics = self.process.next(state0, _datasets(poisoned))
        tf.nest.map_structure(self.assertAllEqual, state, state0)
        self.assertFalse(metrics["update_applied"])

    def test_state_type_matches_fed_avg_and_holds_no_backbone(self):
        state_type = self.process.initialize.type_signature.result
        for _, shape in server_update_lib.tensor_shapes(state_type):
            self.assertIn(shape, [(), toy.PROMPT_SHAPE])
        avg = fed_avg.build_fed_avg(
            model_fn=toy.model_fn,
            prompt_shape=toy.PROMPT_SHAPE,
            batch_spec=toy.batch_spec(),
            initial_prompt=toy.initial_prompt(),
            client_optimizer=ClientOptimizer.SGD,
            client_learning_rate=0.1,
            server_optimizer=ServerOptimizer.SGD,
            server_learning_rate=0.5,
        )
        # Same state type: a program can switch algorithms (or resume) on one state.
        self.assertTrue(state_type.is_equivalent_to(avg.initialize.type_signature.result))
        self.assertIsInstance(self.process, tff.templates.IterativeProcess)

    def test_learning_rate_is_required(self):
        with self.assertRaisesRegex(ValueError, "`server_learning_rate`"):
            _build(server_learning_rate=None)


if __name__ == "__main__":
    tf.test.main()
