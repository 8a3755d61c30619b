"""The frozen backbone restored inside a TFF computation matches eager."""

import collections
import contextlib
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedprompt import data_types, frozen_backbone, prompt_model
from tests.test_prompt_model import tiny_backbone


def _dataset(seq_len=6):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, size=(4, seq_len)).astype(np.int32)
    pad = np.ones((4, seq_len), bool)
    pad[1, 4:] = False
    target = np.zeros((4, seq_len), bool)
    target[:, 2:4] = True
    return tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(token_ids=ids, padding_mask=pad, target_mask=target)
    ).batch(2)


class FrozenBackboneTest(tf.test.TestCase):
    def _frozen(self, kind):
        backbone = tiny_backbone(kind)
        frozen = frozen_backbone.save_frozen_backbone(
            backbone, self.create_tempdir().full_path + "/fb"
        )
        return backbone, frozen

    def test_eager_restore_is_bit_identical(self):
        for kind in ("gpt2", "llama"):
            backbone, frozen = self._frozen(kind)
            restored = frozen_backbone.restore_backbone(frozen)
            for a, b in zip(backbone.weights, restored.weights):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
            self.assertFalse(restored.trainable_weights)

    def test_loss_inside_tff_computation_equals_eager(self):
        for kind in ("gpt2", "llama"):
            backbone, frozen = self._frozen(kind)
            prompt = np.random.default_rng(1).uniform(-0.5, 0.5, (3, 16)).astype(np.float32)
            dataset = _dataset()
            model = prompt_model.PromptTunedLM(backbone)
            eager = sum(model.loss(prompt, b)[0].numpy() for b in dataset)

            @tff.tensorflow.computation(
                tff.TensorType(np.float32, [3, 16]),
                tff.SequenceType(data_types.batch_type(6)),
            )
            def summed_loss(prompt, data):
                tff_model = prompt_model.PromptTunedLM(frozen_backbone.restore_backbone(frozen))  # noqa: B023 (traced in this iteration)
                return data.reduce(
                    tf.constant(0.0), lambda acc, batch: acc + tff_model.loss(prompt, batch)[0]
                )

            self.assertAllClose(summed_loss(prompt, dataset), eager, atol=1e-5, rtol=1e-6)

    def test_fast_graph_construction_builds_the_same_graph_values(self):
        # Restoring in a TF1 graph (as inside a TFF computation) with Keras'
        # constant folding through a Session switched off gives bit-identical outputs.
        ids = np.arange(12, dtype=np.int32).reshape(2, 6) % 50 + 1
        for kind in ("gpt2", "llama"):
            _, frozen = self._frozen(kind)
            outputs = []
            for fast in (True, False):
                patch = (
                    contextlib.nullcontext()
                    if fast
                    else mock.patch.object(
                        frozen_backbone, "_fast_graph_construction", contextlib.nullcontext
                    )
                )
                with tf.Graph().as_default(), patch:
                    restored = frozen_backbone.restore_backbone(frozen)
                    hidden = restored(
                        {"token_ids": tf.constant(ids), "padding_mask": tf.ones([2, 6], tf.bool)}
                    )
                    with tf.compat.v1.Session() as session:
                        session.run(tf.compat.v1.global_variables_initializer())
                        outputs.append(session.run(hidden))
            np.testing.assert_array_equal(outputs[0], outputs[1])
            self.assertGreater(np.abs(outputs[0]).max(), 0.0)

    def test_missing_manifest_is_named(self):
        with self.assertRaisesRegex(frozen_backbone.FrozenCheckpointError, "manifest.json"):
            frozen_backbone.load_frozen_backbone(self.create_tempdir().full_path)


if __name__ == "__main__":
    tf.test.main()
