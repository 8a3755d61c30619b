"""ROUGE-L and exact match against hand computations."""

import tensorflow as tf
from absl.testing import parameterized

from fedprompt import metrics


class MetricsTest(tf.test.TestCase, parameterized.TestCase):
    def test_rouge_l_hand_computed(self):
        # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4
        # P = 4/5 (prediction has 5 tokens), R = 4/6, F = 2PR/(P+R) = 8/11.
        score = metrics.rouge_l("the cat on a mat", "the cat sat on the mat")
        self.assertAllClose(score, 8 / 11)

    def test_rouge_l_stems_and_lowercases(self):
        self.assertAllClose(metrics.rouge_l("Running DOGS", "run dog"), 1.0)

    def test_max_over_references(self):
        scores = metrics.score_predictions(["red apple"], [["green pear", "red apple", "red"]])
        self.assertAllClose(scores["rougeL"], [1.0])
        self.assertAllClose(scores["exact_match"], [1.0])

    @parameterized.parameters(
        ("Yes.", "yes", 1.0),
        ("The answer", "answer", 0.0),  # SNI keeps articles
        ("  a  b ", "a b", 1.0),
        ("no", "yes", 0.0),
    )
    def test_exact_match_uses_sni_normalisation(self, prediction, reference, expected):
        self.assertEqual(metrics.exact_match(prediction, reference), expected)

    def test_xlingual_scores_non_latin_text(self):
        self.assertEqual(metrics.rouge_l("привет мир", "привет мир"), 0.0)  # default drops it
        self.assertAllClose(metrics.rouge_l("привет мир", "привет мир", xlingual=True), 1.0)
        # One of two CJK characters matches: P = R = F = 1/2.
        self.assertAllClose(metrics.rouge_l("你好", "你们", xlingual=True), 0.5)

    def test_missing_references_rejected(self):
        with self.assertRaisesRegex(ValueError, "at least one reference"):
            metrics.score_predictions(["x"], [[]])
