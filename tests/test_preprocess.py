"""Tests for prompt formatting, tokenization, truncation and tf.data batching."""

import re

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from fedprompt.data_types import BATCH_KEYS, PromptTemplate, batch_spec
from tasks import partition, preprocess, sni, synthetic

SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<pad>": 259}


class ByteTokenizer:
    """Bytes are ids 0-255; special tokens written in the text map to 256-259."""

    vocabulary_size = 260
    eos_token_id = 256
    pad_token_id = 259

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        ids = []
        for piece in re.split("(" + "|".join(re.escape(s) for s in SPECIALS) + ")", text):
            ids.extend([SPECIALS[piece]] if piece in SPECIALS else list(piece.encode("utf-8")))
        return ids

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _example(input_text="c a b", output="a b c", positives=(("b a", "a b"), ("d c", "c d"))):
    return partition.Example(
        example_id="t-1",
        task_name="t",
        category="Sorting",
        definition="Sort.",
        positive_examples=tuple(sni.SniPositiveExample(i, o) for i, o in positives),
        input=input_text,
        outputs=(output, "alt"),
    )


def _bytes(text):
    return list(text.encode())


class FormatTest(tf.test.TestCase):
    def test_sni_without_examples(self):
        prompt, target = preprocess.format_example(_example(), template=PromptTemplate.SNI)
        self.assertEqual(prompt, "Definition: Sort.\n\nInput: c a b\nOutput:")
        self.assertEqual(target, " a b c")

    def test_sni_with_one_example(self):
        prompt, _ = preprocess.format_example(
            _example(), template=PromptTemplate.SNI, num_positive_examples=1
        )
        self.assertEqual(
            prompt,
            "Definition: Sort.\n\nPositive Example 1-\nInput: b a\nOutput: a b\n\n"
            "Now complete the following example-\nInput: c a b\nOutput:",
        )

    def test_chatml(self):
        prompt, target = preprocess.format_example(_example(), template=PromptTemplate.CHATML)
        self.assertEqual(
            prompt, "<|im_start|>user\nSort.\n\nInput: c a b<|im_end|>\n<|im_start|>assistant\n"
        )
        self.assertEqual(target, "a b c<|im_end|>")

    def test_bad_template_and_k(self):
        with self.assertRaisesRegex(ValueError, "`template` must be one of"):
            preprocess.format_example(_example(), template="alpaca")
        with self.assertRaisesRegex(ValueError, "`num_positive_examples` must be"):
            preprocess.format_example(
                _example(), template=PromptTemplate.SNI, num_positive_examples=-1
            )


class EncodeTest(tf.test.TestCase, parameterized.TestCase):
    def test_sni_row_hand_checked(self):
        row = preprocess.encode_example(
            _example(), tokenizer=ByteTokenizer(), template=PromptTemplate.SNI, sequence_length=64
        )
        prompt = _bytes("Definition: Sort.\n\nInput: c a b\nOutput:")
        target = _bytes(" a b c") + [256]
        n = len(prompt) + len(target)
        self.assertEqual(list(row["token_ids"][:n]), prompt + target)
        self.assertTrue(np.all(row["token_ids"][n:] == 259))
        self.assertEqual(list(row["padding_mask"]), [True] * n + [False] * (64 - n))
        self.assertEqual(
            list(row["target_mask"]),
            [False] * len(prompt) + [True] * len(target) + [False] * (64 - n),
        )
        self.assertEqual(row["token_ids"].dtype, np.int32)
        self.assertEqual(row["target_mask"].dtype, np.bool_)

    def test_chatml_target_ends_with_im_end_and_no_eos(self):
        row = preprocess.encode_example(
            _example(),
            tokenizer=ByteTokenizer(),
            template=PromptTemplate.CHATML,
            sequence_length=80,
        )
        target = row["token_ids"][row["target_mask"]]
        self.assertEqual(list(target), _bytes("a b c") + [258])
        self.assertEqual(row["token_ids"][0], 257)

    def test_drops_positive_examples_first(self):
        tok = ByteTokenizer()
        with_one = preprocess.encode_example(
            _example(), tokenizer=tok, template=PromptTemplate.SNI, sequence_length=200,
            num_positive_examples=1,
        )  # fmt: skip
        length_one = int(with_one["padding_mask"].sum())
        # Room for one example, not two: the second is dropped, the rest is intact.
        row = preprocess.encode_example(
            _example(), tokenizer=tok, template=PromptTemplate.SNI, sequence_length=length_one,
            num_positive_examples=2,
        )  # fmt: skip
        self.assertAllEqual(row["token_ids"], with_one["token_ids"][:length_one])

    def test_truncates_input_from_the_left(self):
        example = _example(input_text="j i h g f e d c b a", positives=())
        full = len(_bytes("Definition: Sort.\n\nInput: j i h g f e d c b a\nOutput: a b c")) + 1
        row = preprocess.encode_example(
            example, tokenizer=ByteTokenizer(), template=PromptTemplate.SNI,
            sequence_length=full - 6,
        )  # fmt: skip
        text = ByteTokenizer().decode(row["token_ids"][row["padding_mask"]])
        # " j i h" (6 bytes) cut from the left; the end of the input and the target stay.
        self.assertEqual(text, "Definition: Sort.\n\nInput: g f e d c b a\nOutput: a b c")
        self.assertEqual(int(row["padding_mask"].sum()), full - 6)

    def test_too_short_names_sequence_length_and_minimum(self):
        fixed = len(_bytes("Definition: Sort.\n\nInput:\nOutput: a b c")) + 1
        with self.assertRaisesRegex(
            preprocess.SequenceTooLongError, rf"`sequence_length`=20 .* minimum is {fixed + 1}"
        ):
            preprocess.encode_example(
                _example(), tokenizer=ByteTokenizer(), template=PromptTemplate.SNI,
                sequence_length=20,
            )  # fmt: skip
        # Exactly the minimum fits (one input token kept).
        row = preprocess.encode_example(
            _example(), tokenizer=ByteTokenizer(), template=PromptTemplate.SNI,
            sequence_length=fixed + 1,
        )  # fmt: skip
        self.assertTrue(row["padding_mask"].all())

    def test_error_and_skip_policies(self):
        long = _example(input_text="a " * 40, positives=())
        short = _example(positives=())
        tok = ByteTokenizer()
        with self.assertRaisesRegex(preprocess.SequenceTooLongError, "truncation='error'"):
            preprocess.encode_examples(
                [short, long], tokenizer=tok, template=PromptTemplate.SNI, sequence_length=60,
                truncation=preprocess.Truncation.ERROR,
            )  # fmt: skip
        arrays, skipped = preprocess.encode_examples(
            [short, long, short], tokenizer=tok, template=PromptTemplate.SNI, sequence_length=60,
            truncation=preprocess.Truncation.SKIP,
        )  # fmt: skip
        self.assertEqual(skipped, 1)
        self.assertEqual(arrays["token_ids"].shape, (2, 60))


class DatasetTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        tasks = synthetic.generate_synthetic_suite(seed=0, instances_per_task=3)
        self.examples = partition.examples_from_tasks(tasks)  # 72 examples.

    def _ds(self, **kwargs):
        args = dict(tokenizer=ByteTokenizer(), template=PromptTemplate.SNI, sequence_length=128,
                    batch_size=8)  # fmt: skip
        args.update(kwargs)
        return preprocess.build_dataset(self.examples, **args)

    def test_element_spec_and_batches(self):
        ds = self._ds(batch_size=10)
        self.assertEqual(ds.element_spec, batch_spec(128))
        batches = list(ds.as_numpy_iterator())
        self.assertEqual([b["token_ids"].shape[0] for b in batches], [10] * 7 + [2])
        self.assertEqual(list(batches[0]), list(BATCH_KEYS))
        # Each row: real tokens form a prefix and the target ends on the EOS id.
        for row_ids, pad, tgt in zip(*(batches[0][k] for k in BATCH_KEYS)):
            n = int(pad.sum())
            self.assertTrue(pad[:n].all())
            self.assertTrue(tgt[n - 1] and not tgt[n:].any())
            self.assertEqual(row_ids[n - 1], 256)
            self.assertTrue((tgt <= pad).all())

    def test_drop_remainder_keeps_dynamic_batch(self):
        ds = self._ds(batch_size=10, drop_remainder=True)
        self.assertEqual(ds.element_spec, batch_spec(128))
        self.assertLen(list(ds), 7)

    def test_seeded_shuffle(self):
        def first_ids(**kwargs):
            return np.concatenate([b["token_ids"] for b in self._ds(**kwargs).as_numpy_iterator()])

        unshuffled = first_ids()
        a, b, c = first_ids(shuffle_seed=1), first_ids(shuffle_seed=1), first_ids(shuffle_seed=2)
        self.assertAllEqual(a, b)
        self.assertNotAllEqual(a, c)
        self.assertNotAllEqual(a, unshuffled)
        # A permutation of the same rows.
        self.assertAllEqual(np.sort(a, axis=0), np.sort(unshuffled, axis=0))

    def test_sort_by_length_is_a_stable_shortest_first_permutation(self):
        def rows(**kwargs):
            batches = list(self._ds(**kwargs).as_numpy_iterator())
            return {
                k: np.concatenate([b[k] for b in batches]) for k in ("token_ids", "padding_mask")
            }

        given, ordered = rows(), rows(sort_by_length=True)
        lengths = given["padding_mask"].sum(axis=1)
        expected = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))  # stable by hand
        self.assertAllEqual(ordered["token_ids"], given["token_ids"][expected])
        self.assertTrue((np.diff(ordered["padding_mask"].sum(axis=1)) >= 0).all())
        with self.assertRaisesRegex(ValueError, "exclusive"):
            self._ds(shuffle_seed=1, sort_by_length=True)

    def test_generation_inputs_match_training_prompts(self):
        tok = ByteTokenizer()
        arrays, _ = preprocess.encode_examples(
            self.examples, tokenizer=tok, template=PromptTemplate.SNI, sequence_length=128
        )
        gen = preprocess.build_generation_inputs(
            self.examples, tokenizer=tok, template=PromptTemplate.SNI, max_prompt_length=100
        )
        self.assertEqual(gen.input_ids.shape, (72, 100))
        for i in range(72):
            prompt = arrays["token_ids"][i][arrays["padding_mask"][i] & ~arrays["target_mask"][i]]
            n = gen.input_lengths[i]
            self.assertAllEqual(gen.input_ids[i, 100 - n :], prompt)
            self.assertTrue((gen.input_ids[i, : 100 - n] == 259).all())
        self.assertEqual(gen.references[0], self.examples[0].outputs)
        self.assertEqual(gen.example_ids[5], self.examples[5].example_id)
        xlingual = {e.task_name for e, x in zip(self.examples, gen.xlingual) if x}
        self.assertLen(xlingual, 3)
        self.assertTrue(all("translate" in name for name in xlingual))

    def test_generation_keeps_all_references(self):
        gen = preprocess.build_generation_inputs(
            [_example()], tokenizer=ByteTokenizer(), template=PromptTemplate.CHATML,
            max_prompt_length=64,
        )  # fmt: skip
        self.assertEqual(gen.references, (("a b c", "alt"),))

    def test_bad_batch_size(self):
        with self.assertRaisesRegex(ValueError, "`batch_size` must be an int >= 1"):
            self._ds(batch_size=0)


if __name__ == "__main__":
    tf.test.main()
