"""Prompt-tuned forward pass, loss, gradients and cached greedy decoding."""

import collections

import keras_nlp
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from fedprompt import prompt_model

VOCAB = 61


def tiny_backbone(kind: str, seed: int = 0) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(seed)
    if kind == "gpt2":
        return keras_nlp.models.GPT2Backbone(
            vocabulary_size=VOCAB,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            dropout=0.0,
            max_sequence_length=64,
        )
    return keras_nlp.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def _batch(token_ids, padding_mask, target_mask):
    return collections.OrderedDict(
        token_ids=tf.constant(token_ids, tf.int32),
        padding_mask=tf.constant(np.asarray(padding_mask, bool)),
        target_mask=tf.constant(np.asarray(target_mask, bool)),
    )


class PromptModelTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters("gpt2", "llama")
    def test_prompt_of_token_embeddings_equals_prepending_those_tokens(self, kind):
        # Reference: a prompt equal to the embeddings of ids [a, b] must give the
        # backbone's own output on [a, b, x...] (hard prompt == soft prompt).
        backbone = tiny_backbone(kind)
        model = prompt_model.PromptTunedLM(backbone)
        prefix = np.array([5, 9, 2])
        tokens = np.array([[7, 8, 11, 3], [4, 6, 0, 0]])
        mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
        prompt = tf.gather(model.embedding_matrix, prefix)
        ours = model.hidden_states(prompt, tf.constant(tokens), tf.constant(mask))
        full_ids = np.concatenate([np.tile(prefix, (2, 1)), tokens], axis=1)
        full_mask = np.concatenate([np.ones((2, 3), int), mask], axis=1)
        reference = backbone({"token_ids": full_ids, "padding_mask": full_mask})
        # Compare only real positions (padded positions are unconstrained).
        real = full_mask.astype(bool)
        self.assertAllClose(ours.numpy()[real], reference.numpy()[real], atol=1e-5)

    def test_target_mask_excludes_input_tokens_hand_computed(self):
        backbone = tiny_backbone("gpt2")
        model = prompt_model.PromptTunedLM(backbone)
        prompt = tf.random.stateless_normal([2, 16], seed=[1, 2])
        # Tokens: input [7, 8], target [11, 3]; only 11 and 3 are scored.
        batch = _batch([[7, 8, 11, 3, 0]], [[1, 1, 1, 1, 0]], [[0, 0, 1, 1, 0]])
        loss_sum, count = model.loss(prompt, batch)
        hidden = model.hidden_states(prompt, batch["token_ids"], batch["padding_mask"])
        logits = model.logits_from_hidden(hidden).numpy()[0]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        # Prompt length 2: token t is predicted at position 2 + t - 1.
        expected = -(logp[2 + 2 - 1, 11] + logp[2 + 3 - 1, 3])
        self.assertEqual(count.numpy(), 2.0)
        self.assertAllClose(loss_sum.numpy(), expected, rtol=1e-5)

    @parameterized.parameters("gpt2", "llama")
    def test_gradients_reach_prompt_only_and_backbone_is_unchanged(self, kind):
        backbone = tiny_backbone(kind)
        model = prompt_model.PromptTunedLM(backbone)
        before = [w.numpy().copy() for w in backbone.weights]
        prompt = tf.Variable(
            tf.random.stateless_uniform([3, 16], seed=[3, 4], minval=-0.5, maxval=0.5)
        )
        initial = prompt.numpy().copy()
        batch = _batch(
            [[7, 8, 11, 3], [4, 6, 9, 0]],
            [[1, 1, 1, 1], [1, 1, 1, 0]],
            [[0, 0, 1, 1], [0, 1, 1, 0]],
        )
        optimizer = tf.keras.optimizers.Adam(0.1)
        optimizer.build([prompt])
        for _ in range(3):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(prompt)
                loss = model.mean_loss(prompt, batch)
            grads = tape.gradient(loss, [prompt])
            optimizer.apply_gradients(zip(grads, [prompt]))
        for b, a in zip(before, backbone.weights):
            np.testing.assert_array_equal(b, a.numpy())
        self.assertGreater(np.abs(prompt.numpy() - initial).max(), 1e-3)

    @parameterized.parameters("gpt2", "llama")
    def test_cached_greedy_decoding_matches_full_recompute(self, kind):
        backbone = tiny_backbone(kind, seed=1)
        model = prompt_model.PromptTunedLM(backbone)
        prompt = tf.random.stateless_uniform([3, 16], seed=[5, 6], minval=-1, maxval=1)
        rows = [[7, 8, 11, 3], [4, 6]]
        width = 4
        input_ids = np.zeros((2, width), np.int32)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = row
        new_tokens = 6
        tokens, lengths = model.greedy_generate(
            prompt,
            input_ids,
            [len(r) for r in rows],
            max_new_tokens=new_tokens,
            stop_token_ids=[VOCAB + 5],  # never produced: decode the full budget
        )
        # Reference: rerun the whole [prompt; tokens] sequence for every new token.
        for i, row in enumerate(rows):
            seq = list(row)
            for _ in range(new_tokens):
                hidden = model.hidden_states(
                    prompt, tf.constant([seq]), tf.ones([1, len(seq)], tf.int32)
                )
                seq.append(int(tf.argmax(model.logits_from_hidden(hidden[:, -1]), -1)[0]))
            self.assertEqual(list(tokens.numpy()[i]), seq[len(row) :])
            self.assertEqual(lengths.numpy()[i], new_tokens)

    def test_decoding_stops_at_stop_token_and_pads(self):
        backbone = tiny_backbone("gpt2", seed=2)
        model = prompt_model.PromptTunedLM(backbone)
        prompt = tf.zeros([2, 16])
        ids = np.array([[0, 7, 8]], np.int32)
        free, _ = model.greedy_generate(
            prompt, ids, [2], max_new_tokens=5, stop_token_ids=[VOCAB + 1]
        )
        stop = int(free.numpy()[0, 2])  # make the third generated token the stop token
        tokens, lengths = model.greedy_generate(
            prompt, ids, [2], max_new_tokens=5, stop_token_ids=[stop], pad_token_id=0
        )
        first_stop = list(free.numpy()[0]).index(stop)
        self.assertEqual(lengths.numpy()[0], first_stop)
        self.assertAllEqual(tokens.numpy()[0, first_stop:], [0] * (5 - first_stop))
        self.assertAllEqual(tokens.numpy()[0, :first_stop], free.numpy()[0, :first_stop])

    @parameterized.parameters("gpt2", "llama")
    def test_length_ordered_chunked_decoding_equals_one_padded_batch(self, kind):
        from fedprompt import evaluation

        model = prompt_model.PromptTunedLM(tiny_backbone(kind, seed=3))
        prompt = tf.random.stateless_uniform([3, 16], seed=[9, 1], minval=-1, maxval=1)
        rows = [[7, 8, 11, 3, 5, 2], [4, 6], [9, 9, 12], [3], [8, 1, 5, 5]]
        ids, lengths = evaluation.left_pad(rows, pad_token_id=0, width=12)
        kwargs = dict(max_new_tokens=5, stop_token_ids=[VOCAB + 5], pad_token_id=0)
        reference = model.greedy_generate(prompt, ids, lengths, **kwargs)
        spec = [tf.TensorSpec([3, 16]), tf.TensorSpec([None, None], tf.int32)]
        for chunk_size in (None, 1, 2, 3, 8):
            graph = tf.function(
                lambda p, i, n, c=chunk_size: evaluation.generate_in_length_order(
                    model, p, i, n, chunk_size=c, **kwargs
                ),
                input_signature=spec + [tf.TensorSpec([None], tf.int32)],
            )
            for tokens, generated in (
                evaluation.generate_in_length_order(
                    model, prompt, ids, lengths, chunk_size=chunk_size, **kwargs
                ),
                graph(prompt, ids, lengths),
            ):
                self.assertAllEqual(tokens, reference[0], msg=f"chunk_size={chunk_size}")
                self.assertAllEqual(generated, reference[1])
        tokens, generated = evaluation.generate_in_length_order(
            model, prompt, ids[:0], lengths[:0], chunk_size=2, **kwargs
        )
        self.assertAllEqual(tokens.shape, [0, 5])
        self.assertAllEqual(generated.shape, [0])
        with self.assertRaisesRegex(ValueError, "chunk_size"):
            evaluation.generate_in_length_order(model, prompt, ids, lengths, chunk_size=0, **kwargs)

    def test_init_modes_produce_documented_values(self):
        emb = np.arange(40, dtype=np.float32).reshape(10, 4)
        uniform = prompt_model.create_initial_prompt(
            embedding_matrix=emb,
            prompt_length=5,
            init=prompt_model.PromptInit.RANDOM_UNIFORM,
            seed=0,
        )
        expected = np.random.default_rng(0).uniform(-0.5, 0.5, size=(5, 4)).astype(np.float32)
        self.assertAllEqual(uniform, expected)
        sampled = prompt_model.create_initial_prompt(
            embedding_matrix=emb,
            prompt_length=4,
            init=prompt_model.PromptInit.VOCAB_SAMPLE,
            seed=1,
            excluded_token_ids=[0, 1],
        )
        rows = sampled[:, 0] / 4
        self.assertLen(set(rows), 4)  # without replacement
        self.assertTrue(set(rows.astype(int)) <= set(range(2, 10)))
        self.assertAllEqual(sampled, emb[rows.astype(int)])
        text = prompt_model.create_initial_prompt(
            embedding_matrix=emb,
            prompt_length=5,
            init=prompt_model.PromptInit.TEXT,
            seed=0,
            init_token_ids=[3, 7],
        )
        self.assertAllEqual(text, emb[[3, 7, 3, 7, 3]])

    def test_bad_prompt_length_is_rejected_with_its_name(self):
        with self.assertRaisesRegex(ValueError, "`prompt_length` must be >= 1, got 0"):
            prompt_model.create_initial_prompt(
                embedding_matrix=np.zeros((3, 2)), prompt_length=0, init="random_uniform", seed=0
            )

    def test_trim_right_padding_keeps_columns_up_to_the_last_used_one(self):
        batch = _batch(
            [[7, 8, 0, 0, 0, 0], [4, 6, 9, 0, 0, 0]],
            [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
            [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 0]],  # a stray target at column 4 is kept
        )
        trimmed = prompt_model.trim_right_padding(batch)
        self.assertAllEqual(trimmed["token_ids"], [[7, 8, 0, 0, 0], [4, 6, 9, 0, 0]])
        self.assertAllEqual(trimmed["target_mask"].shape, [2, 5])
        empty = _batch([[0, 0, 0]], [[0, 0, 0]], [[0, 0, 0]])
        self.assertAllEqual(prompt_model.trim_right_padding(empty)["token_ids"].shape, [1, 1])

    @parameterized.parameters("gpt2", "llama")
    def test_loss_of_a_heavily_padded_batch_equals_the_unpadded_loss(self, kind):
        # The loss cuts trailing padding; with and without 40 extra pad columns,
        # and in a graph with unknown width, the value must be the same.
        model = prompt_model.PromptTunedLM(tiny_backbone(kind))
        prompt = tf.random.stateless_uniform([3, 16], seed=[7, 8], minval=-1, maxval=1)
        ids = [[7, 8, 11, 3], [4, 6, 9, 0]]
        pad = [[1, 1, 1, 1], [1, 1, 1, 0]]
        target = [[0, 0, 1, 1], [0, 1, 1, 0]]
        tight = model.loss(prompt, _batch(ids, pad, target))
        padded = _batch(
            np.pad(ids, [(0, 0), (0, 40)]),
            np.pad(pad, [(0, 0), (0, 40)]),
            np.pad(target, [(0, 0), (0, 40)]),
        )
        spec = {k: tf.TensorSpec([None, None], v.dtype) for k, v in padded.items()}
        graph_loss = tf.function(model.loss, input_signature=[tf.TensorSpec([3, 16]), spec])
        for value in (model.loss(prompt, padded), graph_loss(prompt, padded)):
            self.assertAllClose(value[0], tight[0], rtol=1e-6)
            self.assertEqual(float(value[1]), 4.0)
        # The reference without any trimming: the static-shape (XLA) loss.
        self.assertAllClose(model.static_shape_loss(prompt, padded)[0], tight[0], rtol=1e-5)

    def test_too_long_sequence_for_gpt2_positions_is_rejected(self):
        model = prompt_model.PromptTunedLM(tiny_backbone("gpt2"))
        with self.assertRaisesRegex(ValueError, "max_sequence_length 64"):
            model.hidden_states(tf.zeros([10, 16]), tf.zeros([1, 60], tf.int32), tf.ones([1, 60]))


if __name__ == "__main__":
    tf.test.main()
