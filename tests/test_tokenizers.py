"""Tests of fedprompt.tokenizers.BPETextTokenizer on a hand-made BPE vocabulary."""

import keras_nlp
import tensorflow as tf
from absl.testing import parameterized

from fedprompt import tokenizers

# Byte-level symbols used below ("Ġ" is the GPT-2 symbol of a space) + 3 merges.
_VOCAB = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3, "b": 4, "Ġ": 5}
for _c in "cdefghijklmnopqrstuvwxyz0123456789?.Ċ":
    _VOCAB[_c] = len(_VOCAB)
_MERGES = ["a b", "Ġ a", "1 2"]
for _m in _MERGES:
    _VOCAB[_m.replace(" ", "")] = len(_VOCAB)
V = _VOCAB


def _tokenizer(split_digits=False, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    keras_tokenizer = keras_nlp.tokenizers.BytePairTokenizer(vocabulary=V, merges=_MERGES)
    spec = tokenizers.TextTokenizerSpec(
        special_tokens=specials,
        eos_token="<|im_end|>" if "<|im_end|>" in specials else "<|endoftext|>",
        pad_token="<|endoftext|>",
        split_digits=split_digits,
    )
    return tokenizers.BPETextTokenizer(keras_tokenizer, spec=spec)


class BPETextTokenizerTest(tf.test.TestCase, parameterized.TestCase):
    def test_attributes(self):
        tok = _tokenizer()
        self.assertEqual(tok.vocabulary_size, len(V))
        self.assertEqual(tok.eos_token_id, 2)
        self.assertEqual(tok.pad_token_id, 0)
        self.assertIsNone(tok.bos_token_id)
        self.assertEqual(tok.special_token_ids, frozenset({0, 1, 2}))

    def test_special_tokens_map_to_their_ids(self):
        tok = _tokenizer()
        # "ab" merges; " a" merges to "Ġa"; "ba" does not merge.
        self.assertEqual(
            tok.encode("<|im_start|>ab a<|im_end|>ba"),
            [1, V["ab"], V["Ġa"], 2, V["b"], V["a"]],
        )

    def test_without_special_splitting_markers_are_plain_text(self):
        tok = _tokenizer(specials=("<|endoftext|>",))
        ids = tok.encode("<|im_end|>")
        self.assertNotIn(2, ids)
        self.assertGreater(len(ids), 1)

    @parameterized.named_parameters(
        # keras-nlp's BPE keeps " 12" as one word, and "1 2" merges.
        ("bpe_default", False, [V["Ġ"], V["12"]]),
        # SmolLM2 style: the space and each digit are separate pieces.
        ("split_digits", True, [V["Ġ"], V["1"], V["2"]]),
    )
    def test_digits(self, split_digits, expected):
        self.assertEqual(_tokenizer(split_digits=split_digits).encode(" 12"), expected)

    @parameterized.parameters(False, True)
    def test_round_trip_and_decode_drops_special_tokens(self, split_digits):
        tok = _tokenizer(split_digits=split_digits)
        text = "abc de 12 31?\nab"
        self.assertEqual(tok.decode(tok.encode(text)), text)
        self.assertEqual(
            tok.decode(tok.encode("<|im_start|>ab<|im_end|> 12<|endoftext|>")), "ab 12"
        )

    def test_encode_batch_matches_encode(self):
        tok = _tokenizer(split_digits=True)
        texts = ["ab 12", "", "<|im_end|>", "x<|im_start|>y 3"]
        self.assertEqual(tok.encode_batch(texts), [tok.encode(t) for t in texts])
        self.assertEqual(tok.encode(""), [])

    def test_decode_ignores_out_of_range_ids(self):
        tok = _tokenizer()
        self.assertEqual(tok.decode([V["a"], 10_000, -1, V["b"]]), "ab")
        self.assertEqual(tok.decode([0, 1, 2]), "")

    def test_unknown_special_token_is_rejected(self):
        keras_tokenizer = keras_nlp.tokenizers.BytePairTokenizer(vocabulary=V, merges=_MERGES)
        spec = tokenizers.TextTokenizerSpec(
            special_tokens=("<|nope|>",), eos_token="<|nope|>", pad_token="<|nope|>"
        )
        with self.assertRaisesRegex(ValueError, r"`special_tokens` entry '<\|nope\|>'"):
            tokenizers.BPETextTokenizer(keras_tokenizer, spec=spec)

    def test_eos_must_be_special(self):
        keras_tokenizer = keras_nlp.tokenizers.BytePairTokenizer(vocabulary=V, merges=_MERGES)
        spec = tokenizers.TextTokenizerSpec(
            special_tokens=("<|endoftext|>",), eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        with self.assertRaisesRegex(ValueError, "`spec.eos_token` must be one of"):
            tokenizers.BPETextTokenizer(keras_tokenizer, spec=spec)

    def test_spec_json_round_trip(self):
        spec = _tokenizer(split_digits=True).spec
        self.assertEqual(tokenizers.TextTokenizerSpec.from_json(spec.to_json()), spec)

    def test_default_spec_for_gpt2_tokenizer(self):
        gpt2 = keras_nlp.models.GPT2Tokenizer(vocabulary=V, merges=_MERGES)
        spec = tokenizers.default_spec_for(gpt2)
        self.assertEqual(spec.special_tokens, ("<|endoftext|>",))
        self.assertEqual(spec.eos_token, "<|endoftext|>")
        self.assertIsNone(spec.bos_token)
        tok = tokenizers.BPETextTokenizer(gpt2, spec=spec)
        self.assertEqual(tok.encode("ab<|endoftext|>"), [V["ab"], 0])


if __name__ == "__main__":
    tf.test.main()
