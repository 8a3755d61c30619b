"""Tests of fedprompt.backbones.tiny (BPE training, pre-training, cache)."""

import keras_nlp
import numpy as np
import tensorflow as tf

from fedprompt.backbones import preset_io, tiny

# Reduced build: seconds, not minutes. The real default is run once by the lead.
SMALL = tiny.TinyConfig(
    vocabulary_size=400,
    num_layers=1,
    num_heads=2,
    hidden_dim=32,
    intermediate_dim=64,
    max_sequence_length=64,
    train_sequence_length=64,
    instances_per_task=20,
    batch_size=16,
    steps=60,
    learning_rate=1e-2,
    warmup_steps=5,
    log_every=20,
)


class ByteLevelBpeTest(tf.test.TestCase):
    def test_hand_computed_merges(self):
        # Words: "ab", " ab" x2, "abc". Pair counts: (a,b)=4, (Ġ,a)=2, (b,c)=1,
        # so "a b" first; then (Ġ,ab)=2 beats (ab,c)=1.
        vocabulary, merges = tiny.train_byte_level_bpe(
            ["ab ab ab<|endoftext|>", "abc"], vocabulary_size=1 + 256 + 2
        )
        self.assertEqual(merges, ["a b", "Ġ ab"])
        self.assertEqual(vocabulary["<|endoftext|>"], 0)
        self.assertEqual(vocabulary["ab"], 257)
        self.assertEqual(vocabulary["Ġab"], 258)
        self.assertLen(vocabulary, 259)

    def test_stops_when_no_pairs_left(self):
        vocabulary, merges = tiny.train_byte_level_bpe(["aa"], vocabulary_size=400)
        self.assertEqual(merges, ["a a"])
        self.assertLen(vocabulary, 258)

    def test_tokenizer_round_trip_on_corpus(self):
        texts = tiny.pretraining_texts(seed=0, instances_per_task=5)
        self.assertLen(texts, 24 * 5)
        vocabulary, merges = tiny.train_byte_level_bpe(texts, vocabulary_size=300)
        tokenizer = tiny.build_tokenizer(vocabulary, merges)
        for text, ids in zip(texts, tokenizer.encode_batch(texts)):
            self.assertEqual(ids[-1], tokenizer.eos_token_id)
            self.assertEqual(tokenizer.decode(ids), text.replace(tiny.EOS_TOKEN, ""))
        # Digits are single tokens (pre-split), never merged.
        ids = tokenizer.encode(" 123")
        self.assertEqual([tokenizer.id_to_token(i) for i in ids], ["Ġ", "1", "2", "3"])

    def test_format_instance(self):
        self.assertEqual(
            tiny.format_instance("Count.", "a b", "2"),
            ("Definition: Count.\n\nInput: a b\nOutput:", " 2"),
        )


class TinyBuildTest(tf.test.TestCase):
    def test_build_learns_and_caches(self):
        cache_dir = self.get_temp_dir()
        path = tiny.build_or_load_tiny(cache_dir=cache_dir, seed=0, config=SMALL)
        self.assertEqual(path.name, f"tiny-{tiny.config_hash(SMALL, 0)}")
        preset_io.validate_preset_dir(path)
        pretraining = preset_io.read_metadata(path)["pretraining"]
        curve = pretraining["loss_curve"]
        self.assertEqual([step for step, _ in curve], [0, 20, 40, 60])
        # Initial loss of a random init is about log(vocabulary size).
        self.assertAllClose(curve[0][1], np.log(SMALL.vocabulary_size), atol=0.5)
        self.assertLess(curve[-1][1], 0.6 * curve[0][1])
        self.assertEqual(pretraining["truncated_sequences"], 0)

        backbone, tokenizer = preset_io.load_preset(path)
        self.assertIsInstance(backbone, keras_nlp.models.GPT2Backbone)
        self.assertEqual(backbone.token_embedding.input_dim, tokenizer.vocabulary_size)
        mtime = (path / "model.weights.h5").stat().st_mtime_ns
        self.assertEqual(tiny.build_or_load_tiny(cache_dir=cache_dir, seed=0, config=SMALL), path)
        self.assertEqual((path / "model.weights.h5").stat().st_mtime_ns, mtime)

        # Deterministic: a rebuild from scratch gives bit-identical weights.
        again = tiny.build_tiny(output_dir=self.get_temp_dir() + "/again", seed=0, config=SMALL)
        rebuilt = preset_io.load_backbone(again)
        for w, w_again in zip(backbone.weights, rebuilt.weights):
            self.assertAllEqual(w.numpy(), w_again.numpy())
        self.assertEqual(preset_io.read_metadata(again)["pretraining"]["loss_curve"], curve)

    def test_different_seed_different_cache_entry(self):
        self.assertNotEqual(tiny.config_hash(SMALL, 0), tiny.config_hash(SMALL, 1))

    def test_config_validation(self):
        with self.assertRaisesRegex(ValueError, "`hidden_dim` .* divisible by `num_heads`"):
            tiny.TinyConfig(hidden_dim=30, num_heads=4)
        with self.assertRaisesRegex(ValueError, "`steps` must be >= 1, got 0"):
            tiny.TinyConfig(steps=0)
        with self.assertRaisesRegex(ValueError, "`vocabulary_size` must be >= 257"):
            tiny.TinyConfig(vocabulary_size=100)


if __name__ == "__main__":
    tf.test.main()
