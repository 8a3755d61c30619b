"""Tests for the synthetic SNI-format instruction suite."""

import collections
import json

import tensorflow as tf
from absl.testing import parameterized

from tasks import sni, synthetic


class SyntheticSuiteTest(tf.test.TestCase, parameterized.TestCase):
    def test_eight_categories_of_three_tasks(self):
        tasks = synthetic.generate_synthetic_suite(seed=0, instances_per_task=10)
        self.assertLen(tasks, 24)
        per_category = collections.Counter(t.category for t in tasks)
        self.assertEqual(dict(per_category), {c: 3 for c in synthetic.CATEGORIES})
        self.assertEqual([t.name for t in tasks], list(synthetic.synthetic_task_names()))
        self.assertIn("Translation", per_category)

    def test_same_seed_same_suite_other_seed_other_instances(self):
        a = synthetic.generate_synthetic_suite(seed=3, instances_per_task=20)
        b = synthetic.generate_synthetic_suite(seed=3, instances_per_task=20)
        c = synthetic.generate_synthetic_suite(seed=4, instances_per_task=20)
        self.assertEqual(a, b)
        self.assertNotEqual([t.instances for t in a], [t.instances for t in c])
        # The rules do not depend on the seed.
        self.assertEqual([t.definition for t in a], [t.definition for t in c])

    def test_prefix_stable_when_more_instances_requested(self):
        small = synthetic.generate_synthetic_suite(seed=0, instances_per_task=5)
        large = synthetic.generate_synthetic_suite(seed=0, instances_per_task=50)
        for s, g in zip(small, large):
            self.assertEqual(s.instances, g.instances[:5])

    def test_ascii_short_unique_inputs_single_reference(self):
        tasks = synthetic.generate_synthetic_suite(seed=0, instances_per_task=120)
        for task in tasks:
            inputs = [i.input for i in task.instances]
            self.assertLen(set(inputs), 120, msg=task.name)
            positive_inputs = {p.input for p in task.positive_examples}
            self.assertLen(positive_inputs, 2)
            self.assertEmpty(positive_inputs & set(inputs), msg=task.name)
            self.assertEqual(task.definition.count("."), 1, msg=task.definition)
            for inst in task.instances:
                self.assertLen(inst.outputs, 1)
                text = task.definition + inst.input + inst.outputs[0]
                self.assertTrue(text.isascii(), msg=text)
                self.assertLessEqual(len(inst.input), 24, msg=inst.input)
                self.assertLessEqual(len(inst.outputs[0]), 24, msg=inst.outputs[0])

    @parameterized.named_parameters(
        ("sort", "synth01_sort_letters_ascending", "h c a", "a c h"),
        ("sort_desc", "synth02_sort_letters_descending", "h c a", "h c a"),
        ("sort_digits_repeats", "synth03_sort_digits_ascending", "7 0 7 2", "0 2 7 7"),
        ("reverse", "synth04_reverse_letters", "b a c", "c a b"),
        ("first_two", "synth07_first_two_letters", "d a e b", "d a"),
        ("last_two", "synth08_last_two_digits", "3 5 5 8 1", "8 1"),
        ("first_last", "synth09_first_and_last_word", "pig green owl", "pig owl"),
        ("count", "synth12_count_words", "pink hat", "2"),
        ("upper", "synth14_uppercase_words", "pen green", "PEN GREEN"),
        ("capitalize", "synth15_capitalize_words", "hat pen", "Hat Pen"),
        ("sum", "synth16_sum_digits", "5 9 3 3", "20"),
        ("max", "synth17_max_digit", "6 1 6 2 8", "8"),
        ("min", "synth18_min_digit", "4 2 7", "2"),
        ("zorbic", "synth19_translate_english_zorbic", "cat red map", "kazo tuko zoro"),
        ("kalani", "synth20_translate_english_kalani", "dog cup", "kani haka"),
        ("vexi", "synth21_translate_english_vexi", "owl key", "vis pyx"),
        ("has_a", "synth22_contains_letter_a", "d f a", "yes"),
        ("no_a", "synth22_contains_letter_a", "d f b", "no"),
        ("parity_even", "synth23_digit_sum_parity", "1 5 0", "even"),
        ("parity_odd", "synth23_digit_sum_parity", "1 5 1", "odd"),
        ("animal", "synth24_contains_animal", "green dog", "yes"),
        ("no_animal", "synth24_contains_animal", "green box", "no"),
    )
    def test_rules_on_hand_written_inputs(self, task_name, text, expected):
        spec = dict(zip(synthetic.synthetic_task_names(), synthetic._SPECS))[task_name]
        self.assertEqual(spec.rule(text.split()), expected)

    def test_generated_outputs_match_an_independent_reference(self):
        tasks = {t.name: t for t in synthetic.generate_synthetic_suite(seed=1)}
        references = {
            "synth01_sort_letters_ascending": lambda s: " ".join(sorted(s.split())),
            "synth05_reverse_digits": lambda s: s[::-1],  # Single-char items: string reverse.
            "synth10_count_letters": lambda s: str(len(s.replace(" ", ""))),
            "synth13_uppercase_letters": str.upper,
            "synth16_sum_digits": lambda s: str(eval(s.replace(" ", "+"))),  # noqa: S307
        }
        for name, reference in references.items():
            for inst in tasks[name].instances:
                self.assertEqual(inst.outputs[0], reference(inst.input), msg=inst.id)

    def test_shared_input_formats_across_categories(self):
        # The trade-off design: most categories read the same letter-list format.
        tasks = synthetic.generate_synthetic_suite(seed=0, instances_per_task=5)
        letter_categories = {
            t.category
            for t in tasks
            if all(set(i.input.split()) <= set(synthetic.LETTERS) for i in t.instances)
        }
        self.assertGreaterEqual(len(letter_categories), 6)

    def test_classification_labels_balanced(self):
        tasks = synthetic.generate_synthetic_suite(seed=0, instances_per_task=40)
        for task in tasks:
            if task.category == "Classification":
                counts = collections.Counter(i.outputs[0] for i in task.instances)
                self.assertEqual(sorted(counts.values()), [20, 20], msg=task.name)

    def test_dictionaries_are_bijective_and_disjoint_from_english(self):
        seen = set()
        for table in synthetic.DICTIONARIES.values():
            self.assertEqual(set(table), set(synthetic.WORDS))
            self.assertLen(set(table.values()), len(synthetic.WORDS))
            seen |= set(table.values())
        self.assertLen(seen, 3 * len(synthetic.WORDS))
        self.assertEmpty(seen & set(synthetic.WORDS))

    def test_write_produces_sni_json(self):
        root = self.create_tempdir().full_path
        paths = synthetic.write_synthetic_suite(root, seed=0, instances_per_task=7)
        self.assertLen(paths, 24)
        data = json.loads(paths[0].read_text(encoding="ascii"))
        for key in ("Definition", "Categories", "Positive Examples", "Negative Examples",
                    "Instances", "Input_language", "Output_language", "Instruction_language",
                    "Source"):  # fmt: skip
            self.assertIn(key, data)
        self.assertIsInstance(data["Definition"], list)
        self.assertEqual(set(data["Instances"][0]), {"id", "input", "output"})
        parsed = sni.parse_task_dict(data, name=paths[0].stem)
        original = synthetic.generate_synthetic_suite(seed=0, instances_per_task=7)[0]
        self.assertEqual(parsed.instances, original.instances)
        self.assertEqual(parsed.positive_examples, original.positive_examples)

    @parameterized.parameters(0, -1, 2001)
    def test_bad_instances_per_task(self, n):
        with self.assertRaisesRegex(ValueError, "instances_per_task"):
            synthetic.generate_synthetic_suite(instances_per_task=n)


if __name__ == "__main__":
    tf.test.main()
