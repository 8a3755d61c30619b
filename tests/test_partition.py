"""Tests for federated client partitions."""

import collections
import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from tasks import partition, sni, synthetic

P = partition.PartitionScheme
SCHEMES = (
    ("natural", dict(scheme=P.NATURAL)),
    ("iid", dict(scheme=P.DIRICHLET, alpha=math.inf)),
    ("dirichlet", dict(scheme=P.DIRICHLET, alpha=0.3)),
    ("home_fraction", dict(scheme=P.HOME_FRACTION, home_fraction=0.7)),
)


def _suite(n=60):
    return synthetic.generate_synthetic_suite(seed=0, instances_per_task=n)


def _split(tasks=None, **kwargs):
    args = dict(num_clients=8, num_validation_clients=4, num_test_clients=4, seed=0)
    args.update(kwargs)
    return partition.build_federated_split(tasks or _suite(), **args)


def _all_clients(split):
    return split.train_clients + split.validation_clients + split.test_clients


def _mix(examples, categories):
    counts = collections.Counter(e.category for e in examples)
    return np.array([counts[c] for c in categories], np.float64) / len(examples)


class PartitionTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(*SCHEMES)
    def test_no_example_in_two_places(self, kwargs):
        split = _split(**kwargs)
        places = [c.examples for c in split.train_clients]
        for c in split.validation_clients + split.test_clients:
            places += [c.personalization_train, c.local_test]
        places.append(split.global_test)
        ids = [e.example_id for place in places for e in place]
        self.assertLen(set(ids), len(ids))
        total = sum(len(t.instances) for t in _suite())
        self.assertEqual(len(ids) + split.num_unused, total)

    @parameterized.named_parameters(*SCHEMES)
    def test_training_splits_do_not_overlap_test_splits(self, kwargs):
        split = _split(**kwargs)
        train_ids = {e.example_id for c in split.train_clients for e in c.examples}
        train_ids |= {
            e.example_id
            for c in split.validation_clients + split.test_clients
            for e in c.personalization_train
        }
        test_ids = {e.example_id for e in split.global_test}
        test_ids |= {
            e.example_id
            for c in split.validation_clients + split.test_clients
            for e in c.local_test
        }
        self.assertEmpty(train_ids & test_ids)
        for c in split.validation_clients + split.test_clients:
            self.assertNotEmpty(c.personalization_train)
            self.assertNotEmpty(c.local_test)

    @parameterized.named_parameters(*SCHEMES)
    def test_same_seed_same_partition_other_seed_other(self, kwargs):
        a, b, c = _split(**kwargs), _split(**kwargs), _split(seed=1, **kwargs)
        self.assertEqual(a, b)
        self.assertNotEqual(
            [[e.example_id for e in x.examples] for x in _all_clients(a)],
            [[e.example_id for e in x.examples] for x in _all_clients(c)],
        )
        self.assertNotEqual(a.global_test, c.global_test)

    def test_global_test_is_category_balanced(self):
        split = _split(scheme=P.NATURAL, global_test_per_category=7)
        counts = collections.Counter(e.category for e in split.global_test)
        self.assertEqual(dict(counts), {c: 7 for c in synthetic.CATEGORIES})

    def test_natural_clients_hold_one_category_and_cover_categories(self):
        split = _split(scheme=P.NATURAL, num_clients=16, num_validation_clients=8,
                       num_test_clients=8)  # fmt: skip
        for client in _all_clients(split):
            self.assertEqual({e.category for e in client.examples}, {client.home_category})
        self.assertEqual(
            collections.Counter(c.home_category for c in split.train_clients),
            {c: 2 for c in synthetic.CATEGORIES},
        )
        # 4 clients per category share its 3 * 60 - 10 = 170 examples: 42 or 43 each.
        self.assertEqual(split.num_unused, 0)
        self.assertEqual(sorted({len(c.examples) for c in _all_clients(split)}), [42, 43])

    @parameterized.parameters((8, 4, 4), (20, 2, 2), (40, 10, 10))
    def test_alpha_inf_matches_global_mix(self, n_train, n_val, n_test):
        split = _split(
            scheme=P.DIRICHLET,
            alpha=math.inf,
            num_clients=n_train,
            num_validation_clients=n_val,
            num_test_clients=n_test,
        )
        clients = _all_clients(split)
        categories = split.categories
        global_mix = _mix([e for c in clients for e in c.examples], categories)
        for client in clients:
            size = len(client.examples)
            # Stated tolerance: each category within one example of its share,
            # i.e. total variation <= C / (2 n).
            tv = 0.5 * np.abs(_mix(client.examples, categories) - global_mix).sum()
            self.assertLessEqual(tv, len(categories) / (2 * size) + 1e-9, msg=client.client_id)
        self.assertLess(partition.partition_statistics(split)["heterogeneity"], 0.1)

    @parameterized.parameters(0, 1, 2)
    def test_alpha_small_mostly_one_category(self, seed):
        split = _split(scheme=P.DIRICHLET, alpha=0.1, num_clients=16, seed=seed)
        stats = partition.partition_statistics(split)
        dominated = [r["home_fraction"] >= 0.5 for r in stats["clients"]]
        self.assertGreater(np.mean(dominated), 0.5)
        for row in stats["clients"]:
            self.assertEqual(
                row["home_category"],
                max(row["category_histogram"], key=row["category_histogram"].get),
            )
        iid = partition.partition_statistics(_split(scheme=P.DIRICHLET, alpha=math.inf, seed=seed))
        self.assertGreater(stats["heterogeneity"], iid["heterogeneity"] + 0.4)

    def test_home_fraction_mixes(self):
        split = _split(scheme=P.HOME_FRACTION, home_fraction=0.75, examples_per_client=40)
        categories = split.categories
        for client in _all_clients(split):
            self.assertLen(client.examples, 40)
            mix = _mix(client.examples, categories)
            # 0.75 from home + 0.25 * (1/8) of the global (balanced) mix.
            self.assertAllClose(mix[categories.index(client.home_category)], 0.78125, atol=1 / 40)
        zero = _split(scheme=P.HOME_FRACTION, home_fraction=0.0)
        # 8 + 8 + 8 clients: 3 per category x 56 examples fit the 170 of each category.
        one = _split(scheme=P.HOME_FRACTION, home_fraction=1.0, num_validation_clients=8,
                     num_test_clients=8)  # fmt: skip
        self.assertLess(partition.partition_statistics(zero)["heterogeneity"], 0.05)
        self.assertAllClose(partition.partition_statistics(one)["heterogeneity"], 1 - 1 / 8)

    def test_statistics_hand_checked(self):
        split = _split(scheme=P.NATURAL, num_clients=8, num_validation_clients=0,
                       num_test_clients=0)  # fmt: skip
        stats = partition.partition_statistics(split)
        json.dumps(stats)
        self.assertLen(stats["clients"], 8)
        # Eight one-category clients, balanced global mix: TV = 1 - 1/8 for each.
        self.assertAllClose(stats["heterogeneity"], 0.875)
        row = stats["clients"][0]
        self.assertEqual(row["size"], 170)
        self.assertEqual(row["category_histogram"][row["home_category"]], 170)
        self.assertEqual(stats["global_test"]["size"], 80)
        self.assertEqual(stats["config"]["scheme"], "natural")

    def test_evaluation_split_fraction(self):
        split = _split(scheme=P.DIRICHLET, alpha=math.inf, examples_per_client=20,
                       personalization_test_fraction=0.25)  # fmt: skip
        for client in split.test_clients:
            self.assertLen(client.local_test, 5)
            self.assertLen(client.personalization_train, 15)

    @parameterized.named_parameters(
        ("alpha_zero", dict(scheme=P.DIRICHLET, alpha=0.0), "`alpha` must be > 0"),
        ("alpha_negative", dict(scheme=P.DIRICHLET, alpha=-1.0), "`alpha` must be > 0"),
        ("alpha_missing", dict(scheme=P.DIRICHLET), "`alpha` must be > 0"),
        ("alpha_unused", dict(scheme=P.NATURAL, alpha=1.0), "only used by scheme 'dirichlet'"),
        ("home_range", dict(scheme=P.HOME_FRACTION, home_fraction=1.5), "`home_fraction` must be"),
        ("unknown_scheme", dict(scheme="pathological"), "`scheme` must be one of"),
        ("too_many_clients", dict(scheme=P.DIRICHLET, alpha=1.0, num_clients=2000),
         "need at least .* examples"),
        ("natural_too_many", dict(scheme=P.NATURAL, num_clients=24, examples_per_client=50), "natural clients"),
        ("zero_clients", dict(scheme=P.NATURAL, num_clients=0), "`num_clients` must be an int >= 1"),
        ("fraction", dict(scheme=P.NATURAL, personalization_test_fraction=1.0),
         "`personalization_test_fraction`"),
        ("global_test", dict(scheme=P.NATURAL, global_test_per_category=500),
         "`global_test_per_category`"),
    )  # fmt: skip
    def test_bad_arguments(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            _split(**kwargs)

    def test_duplicate_example_ids(self):
        task = _suite(5)[0]
        with self.assertRaisesRegex(ValueError, "unique.*same task twice"):
            _split(tasks=[task, task], scheme=P.NATURAL, num_clients=1, num_validation_clients=0,
                   num_test_clients=0, global_test_per_category=0)  # fmt: skip

    def test_natural_evaluation_client_needs_two_examples(self):
        # Sorting keeps one task with 3 instances: 2 after the global test set, for
        # one train and one validation client, which would get a single example.
        tasks = [t for t in _suite(30) if t.category != "Sorting"]
        first = _suite(30)[0]
        tasks.append(dataclasses.replace(first, instances=first.instances[:3]))
        with self.assertRaisesRegex(ValueError, "'Sorting' has 2 examples.*>= 2 per evaluation"):
            _split(tasks=tasks, scheme=P.NATURAL, num_clients=8, num_validation_clients=8,
                   num_test_clients=0, global_test_per_category=1)  # fmt: skip

    def test_string_scheme(self):
        self.assertEqual(_split(scheme="natural"), _split(scheme=P.NATURAL))


@pytest.mark.sni_mini
def test_sni_mini_partition(sni_mini_dir):
    tasks = sni.load_sni(sni_mini_dir)
    split = partition.build_federated_split(
        tasks, scheme=P.DIRICHLET, alpha=0.5, num_clients=16, num_validation_clients=4,
        num_test_clients=8, seed=0, global_test_per_category=10,
    )  # fmt: skip
    ids = [e.example_id for c in _all_clients(split) for e in c.examples]
    ids += [e.example_id for e in split.global_test]
    assert len(ids) == len(set(ids))
    assert len(ids) + split.num_unused == 2938
    stats = partition.partition_statistics(split)
    assert len(stats["categories"]) == 8 and 0.0 < stats["heterogeneity"] < 0.875


if __name__ == "__main__":
    tf.test.main()
