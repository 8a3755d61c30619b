"""FedAvg TFF process vs hand computation and vs tff.learning's own FedAvg."""

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from absl.testing import parameterized

from fedprompt import fed_avg
from fedprompt import server_update as server_update_lib
from fedprompt.client_update import client_update
from optimizers import ClientOptimizer, ServerOptimizer, build_client_optimizer
from tests import federated_toy as toy

CLIENT_SIZES = (3, 5, 2)
BATCH_SIZE = 2


def _client_examples(poison_index=None):
    return [
        toy.make_examples(n, seed=10 + i, poison=(i == poison_index))
        for i, n in enumerate(CLIENT_SIZES)
    ]


def _datasets(examples, batch_size=BATCH_SIZE):
    return [toy.make_dataset(e, batch_size) for e in examples]


def _manual_local_sgd(p0, dataset, lr, epochs=1):
    """Local SGD by hand: returns (delta, examples, tokens, loss_sum, mean grad norm)."""
    loss_fn = toy.eager_loss_fn()
    p = tf.constant(p0)
    examples, tokens, loss_total, norms = 0, 0.0, 0.0, []
    for _ in range(epochs):
        for batch in dataset:
            with tf.GradientTape() as tape:
                tape.watch(p)
                s, n = loss_fn(p, batch)
                mean = s / n
            g = tape.gradient(mean, p)
            p = p - lr * g
            examples += int(batch["token_ids"].shape[0])
            tokens += float(n)
            loss_total += float(s)
            norms.append(float(tf.norm(g)))
    return (p - p0).numpy(), examples, tokens, loss_total, float(np.mean(norms))


def _build(**kwargs):
    args = dict(
        model_fn=toy.model_fn,
        prompt_shape=toy.PROMPT_SHAPE,
        batch_spec=toy.batch_spec(),
        initial_prompt=toy.initial_prompt(),
        client_optimizer=ClientOptimizer.SGD,
        client_learning_rate=0.5,
    )
    args.update(kwargs)
    return fed_avg.build_fed_avg(**args)


class FedAvgMathTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.process = _build()  # SGD lr 0.5, one epoch, server SGD lr 1.0, NUM_EXAMPLES

    def test_one_client_one_step_is_one_sgd_step(self):
        examples = toy.make_examples(4, seed=3)
        dataset = toy.make_dataset(examples, 4)  # a single batch: one local step
        p0 = toy.initial_prompt()
        loss_fn = toy.eager_loss_fn()
        prompt = tf.constant(p0)
        with tf.GradientTape() as tape:
            tape.watch(prompt)
            s, n = loss_fn(prompt, next(iter(dataset)))
            mean = s / n
        grad = tape.gradient(mean, prompt)
        state = self.process.initialize()
        self.assertAllClose(state.prompt, p0)
        state, metrics = self.process.next(state, [dataset])
        self.assertAllClose(state.prompt, p0 - 0.5 * grad.numpy(), atol=1e-6)
        self.assertEqual(state.round_num, 1)
        self.assertAllClose(metrics["train_loss"], mean, atol=1e-6)
        self.assertAllClose(metrics["grad_norm_mean"], tf.norm(grad), atol=1e-6)
        self.assertAllClose(metrics["update_norm_max"], 0.5 * tf.norm(grad), atol=1e-6)
        self.assertEqual(metrics["num_clients"], 1)
        self.assertEqual(metrics["num_nonfinite_clients"], 0)
        self.assertTrue(metrics["update_applied"])

    def test_several_clients_weighted_average_and_metrics(self):
        p0 = toy.initial_prompt()
        datasets = _datasets(_client_examples())
        manual = [_manual_local_sgd(p0, ds, 0.5) for ds in datasets]
        weights = np.array([m[1] for m in manual], np.float64)
        expected_delta = sum(w * m[0] for w, m in zip(weights, manual)) / weights.sum()
        state, metrics = self.process.next(self.process.initialize(), datasets)
        self.assertAllClose(state.prompt, p0 + expected_delta, atol=1e-6)
        # Not a plain (unweighted) mean: the clients differ enough for the test to bite.
        plain = np.mean([m[0] for m in manual], axis=0)
        self.assertGreater(np.abs(plain - expected_delta).max(), 1e-4)

        tokens = np.array([m[2] for m in manual])
        update_norms = [np.linalg.norm(m[0]) for m in manual]
        grad_norms = [m[4] for m in manual]
        self.assertAllClose(metrics["train_loss"], sum(m[3] for m in manual) / tokens.sum())
        self.assertAllClose(metrics["grad_norm_mean"], np.mean(grad_norms), atol=1e-6)
        self.assertAllClose(metrics["grad_norm_min"], np.min(grad_norms), atol=1e-6)
        self.assertAllClose(metrics["grad_norm_max"], np.max(grad_norms), atol=1e-6)
        self.assertAllClose(metrics["update_norm_mean"], np.mean(update_norms), atol=1e-6)
        self.assertAllClose(metrics["update_norm_min"], np.min(update_norms), atol=1e-6)
        self.assertAllClose(metrics["update_norm_max"], np.max(update_norms), atol=1e-6)
        self.assertEqual(metrics["num_examples"], sum(CLIENT_SIZES))
        self.assertAllClose(metrics["num_tokens"], tokens.sum())
        self.assertAllClose(
            metrics["server_update_norm"], np.linalg.norm(expected_delta), atol=1e-6
        )

    @parameterized.named_parameters(
        ("uniform", fed_avg.ClientWeighting.UNIFORM), ("tokens", fed_avg.ClientWeighting.NUM_TOKENS)
    )
    def test_other_client_weightings(self, weighting):
        p0 = toy.initial_prompt()
        datasets = _datasets(_client_examples())
        manual = [_manual_local_sgd(p0, ds, 0.5, epochs=2) for ds in datasets]
        if weighting == fed_avg.ClientWeighting.UNIFORM:
            weights = np.ones(len(manual))
        else:
            weights = np.array([m[2] for m in manual])
        expected = sum(w * m[0] for w, m in zip(weights, manual)) / weights.sum()
        process = _build(client_weighting=weighting, local_epochs=2)
        state, _ = process.next(process.initialize(), datasets)
        self.assertAllClose(state.prompt, p0 + expected, atol=1e-6)

    def test_nonfinite_client_is_excluded_and_counted(self):
        examples = _client_examples(poison_index=1)
        state0 = self.process.initialize()
        state, metrics = self.process.next(state0, _datasets(examples))
        # Same as a round with only the two healthy clients.
        reference, ref_metrics = self.process.next(state0, _datasets([examples[0], examples[2]]))
        self.assertAllClose(state.prompt, reference.prompt, atol=1e-7)
        self.assertEqual(metrics["num_clients"], 3)
        self.assertEqual(metrics["num_nonfinite_clients"], 1)
        self.assertAllClose(metrics["train_loss"], ref_metrics["train_loss"])
        self.assertAllClose(metrics["grad_norm_max"], ref_metrics["grad_norm_max"])
        self.assertAllClose(metrics["update_norm_min"], ref_metrics["update_norm_min"])
        self.assertTrue(np.all(np.isfinite(state.prompt)))

    def test_all_nonfinite_clients_leave_the_state_unchanged(self):
        process = _build(server_optimizer=ServerOptimizer.ADAM, server_learning_rate=0.1)
        state0, _ = process.next(process.initialize(), _datasets(_client_examples()))
        poisoned = [toy.make_examples(3, seed=i, poison=True) for i in range(2)]
        state, metrics = process.next(state0, _datasets(poisoned))
        tf.nest.map_structure(self.assertAllEqual, state, state0)
        self.assertFalse(metrics["update_applied"])
        self.assertEqual(metrics["num_nonfinite_clients"], 2)
        self.assertTrue(np.isnan(metrics["train_loss"]))
        self.assertEqual(metrics["server_update_norm"], 0.0)

    def test_server_state_holds_only_the_prompt_and_optimizer_state(self):
        process = _build(server_optimizer=ServerOptimizer.ADAM, server_learning_rate=0.1)
        state_type = process.initialize.type_signature.result
        self.assertEqual(state_type.placement, tff.SERVER)
        self.assertEqual(
            [name for name, _ in tff.structure.iter_elements(state_type.member)],
            ["prompt", "optimizer_state", "round_num"],
        )
        shapes = server_update_lib.tensor_shapes(state_type)
        for path, shape in shapes:
            self.assertIn(shape, [(), toy.PROMPT_SHAPE], msg=path)
        # prompt + Adam's accumulator and preconditioner; everything else is a scalar.
        self.assertLen([s for _, s in shapes if s == toy.PROMPT_SHAPE], 3)
        # What a client receives: the prompt and its data, nothing else.
        client_work = fed_avg.build_fed_avg_components(
            model_fn=toy.model_fn,
            prompt_shape=toy.PROMPT_SHAPE,
            batch_spec=toy.batch_spec(),
            initial_prompt=toy.initial_prompt(),
            client_learning_rate=0.1,
        ).client_work
        param_shapes = server_update_lib.tensor_shapes(client_work.type_signature.parameter)
        self.assertEqual(param_shapes[0][1], toy.PROMPT_SHAPE)
        for path, shape in param_shapes[1:]:
            self.assertIn("/*", path)  # dataset elements
            self.assertEqual(shape, (None, toy.SEQ_LEN))

    def test_callable_adam_client_is_fresh_every_round(self):
        # Adam's moments and step count must restart on every client call: each
        # round equals a fresh eager client_update from the new global prompt.
        def make_adam():
            return build_client_optimizer(ClientOptimizer.ADAM, learning_rate=0.05, beta_1=0.8)

        process = _build(
            client_optimizer=make_adam,
            client_learning_rate=None,
            local_epochs=None,
            local_steps=3,
            initial_prompt=None,
            initial_prompt_fn=lambda: tf.constant(toy.initial_prompt()) * 2.0,
        )
        examples = toy.make_examples(5, seed=5)
        p = 2.0 * toy.initial_prompt()
        state = process.initialize()
        self.assertAllClose(state.prompt, p)
        for _ in range(2):
            var = tf.Variable(tf.zeros(toy.PROMPT_SHAPE))
            opt = make_adam()
            opt.build([var])
            out = client_update(
                loss_fn=toy.eager_loss_fn(),
                prompt_variable=var,
                initial_prompt=tf.constant(p),
                dataset=toy.make_dataset(examples, 2),
                optimizer=opt,
                num_epochs=None,
                max_steps=3,
            )
            p = p + out.prompt_delta.numpy()
            state, metrics = process.next(state, [toy.make_dataset(examples, 2)])
            self.assertAllClose(state.prompt, p, atol=1e-6)
            self.assertEqual(metrics["num_examples"], 2 + 2 + 1)

    @parameterized.named_parameters(
        ("two_inits", {"initial_prompt_fn": lambda: tf.zeros(toy.PROMPT_SHAPE)}, "initial_prompt"),
        ("no_lr", {"client_learning_rate": None}, "client_learning_rate"),
        ("bad_lr", {"client_learning_rate": -1.0}, "learning_rate"),
        ("shape", {"initial_prompt": np.zeros((2, 2), np.float32)}, "initial_prompt"),
        ("prompt_shape", {"prompt_shape": (0, 4)}, "prompt_shape"),
        ("epochs", {"local_epochs": 0}, "num_epochs"),
        ("clip", {"clip_norm": 0.0}, "clip_norm"),
        ("server_lr", {"server_optimizer": ServerOptimizer.ADAM}, "server_learning_rate"),
    )
    def test_invalid_arguments(self, kwargs, name):
        with self.assertRaisesRegex(ValueError, f"`{name}`"):
            _build(**kwargs)

    def test_weighting_must_be_enum(self):
        with self.assertRaisesRegex(TypeError, "client_weighting"):
            _build(client_weighting="uniform")


class FedAvgVsTFFTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(("sgd", None, None, 1.0), ("sgdm_both", 0.9, 0.5, 0.7))
    def test_matches_tff_learning_fed_avg(self, client_momentum, server_momentum, server_lr):
        client_lr, epochs, rounds = 0.3, 2, 2
        p0 = toy.initial_prompt()
        ours = fed_avg.build_fed_avg(
            model_fn=toy.model_fn,
            prompt_shape=toy.PROMPT_SHAPE,
            batch_spec=toy.batch_spec(),
            initial_prompt=p0,
            client_optimizer=ClientOptimizer.SGD
            if client_momentum is None
            else ClientOptimizer.SGDM,
            client_learning_rate=client_lr,
            client_momentum=client_momentum,
            local_epochs=epochs,
            server_optimizer=ServerOptimizer.SGD
            if server_momentum is None
            else ServerOptimizer.SGDM,
            server_learning_rate=server_lr,
            server_momentum=server_momentum,
        )
        reference = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn=lambda: toy.ToyVariableModel(p0),
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(
                learning_rate=client_lr, momentum=client_momentum
            ),
            server_optimizer_fn=tff.learning.optimizers.build_sgdm(
                learning_rate=server_lr, momentum=server_momentum
            ),
        )
        examples = _client_examples()
        our_state = ours.initialize()
        ref_state = reference.initialize()
        for round_index in range(rounds):
            # Different client subsets per round, as a sampler would pick them.
            chosen = [examples[i] for i in ([0, 1, 2] if round_index == 0 else [2, 0])]
            our_state, _ = ours.next(our_state, _datasets(chosen))
            ref_output = reference.next(ref_state, [d.repeat(epochs) for d in _datasets(chosen)])
            ref_state = ref_output.state
            ref_prompt = reference.get_model_weights(ref_state).trainable[0]
            self.assertAllClose(our_state.prompt, ref_prompt, atol=1e-5, rtol=0)
        self.assertGreater(np.abs(our_state.prompt - p0).max(), 1e-3)


if __name__ == "__main__":
    tf.test.main()
