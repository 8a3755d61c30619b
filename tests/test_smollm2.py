"""Tests of fedprompt.backbones.smollm2 (GGUF -> keras-nlp LlamaBackbone)."""

import time

import numpy as np
import pytest
import tensorflow as tf

from fedprompt.backbones import preset_io, smollm2


def _llama_cpp_permute(weights, n_head):
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (the reference)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


class UnpermuteTest(tf.test.TestCase):
    def test_inverts_llama_cpp_permute(self):
        w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
        permuted = _llama_cpp_permute(w, 3)
        self.assertNotAllEqual(permuted, w)
        self.assertAllEqual(smollm2.unpermute_rope_rows(permuted, 3), w)

    def test_hand_computed_head(self):
        # One head, head_dim 4: HF rows [r0, r1 | r2, r3] (halves rotated together)
        # are stored by llama.cpp interleaved as [r0, r2, r1, r3].
        stored = np.array([[0.0], [2.0], [1.0], [3.0]])
        self.assertAllEqual(smollm2.unpermute_rope_rows(stored, 1), [[0.0], [1.0], [2.0], [3.0]])

    def test_rejects_bad_shape(self):
        with self.assertRaisesRegex(ValueError, "num_heads"):
            smollm2.unpermute_rope_rows(np.zeros([10, 2]), 4)


def _greedy(backbone, tokenizer, prompt, max_new_tokens):
    """Slow reference greedy decoding (full re-run per token, no cache)."""
    ids = tokenizer.encode(prompt)
    new = []
    for _ in range(max_new_tokens):
        x = {"token_ids": tf.constant([ids]), "padding_mask": tf.ones([1, len(ids)], tf.bool)}
        hidden = backbone(x, training=False)[:, -1]
        next_id = int(tf.argmax(backbone.token_embedding(hidden, reverse=True)[0]))
        if next_id == tokenizer.eos_token_id:
            break
        ids.append(next_id)
        new.append(next_id)
    return tokenizer.decode(new)


@pytest.mark.smollm2
@pytest.mark.slow
class SmolLM2Test(tf.test.TestCase):
    def test_convert_cache_and_answer(self):
        cache_dir = self._cache_dir
        start = time.perf_counter()
        path = smollm2.load_or_convert_smollm2(cache_dir=cache_dir)
        first = time.perf_counter() - start
        converted_at = preset_io.read_metadata(path)["converted_at"]

        start = time.perf_counter()
        again = smollm2.load_or_convert_smollm2(cache_dir=cache_dir)
        backbone, tokenizer = preset_io.load_preset(again)
        second = time.perf_counter() - start
        print(
            f"\nSmolLM2 first load_or_convert {first:.1f} s; cached path + model load {second:.1f} s"
        )
        self.assertEqual(again, path)
        # The cache was hit: no second conversion.
        self.assertEqual(preset_io.read_metadata(again)["converted_at"], converted_at)

        metadata = preset_io.read_metadata(path)
        self.assertEqual(len(metadata["source_sha256"]), 64)
        self.assertEqual(backbone.count_params(), 162_826_560)  # 134.5M + untied LM head copy.
        self.assertEqual(tokenizer.vocabulary_size, 49152)
        self.assertEqual(tokenizer.eos_token_id, 2)  # <|im_end|>

        # Tokenizer: HF SmolLM2 ids of the ChatML prompt; digits split one by one.
        prompt = smollm2.chatml_prompt("What is the capital of France?")
        self.assertEqual(
            tokenizer.encode(prompt),
            [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
        )
        digits = tokenizer.encode("x 12345")
        self.assertEqual([tokenizer.id_to_token(i) for i in digits[-5:]], list("12345"))
        for text in ["Hello world 3.14!", "  spaced\n\ttabs é 中文", prompt]:
            expected = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
            self.assertEqual(tokenizer.decode(tokenizer.encode(text)), expected)

        answer = _greedy(backbone, tokenizer, prompt, max_new_tokens=12)
        print(f"SmolLM2 answer: {answer!r}")
        self.assertIn("Paris", answer)

    @pytest.fixture(autouse=True)
    def _inject_cache_dir(self, cache_dir):
        self._cache_dir = cache_dir
