"""Tests for the SNI task loader."""

import dataclasses
import json
import pathlib

import pytest
import tensorflow as tf
from absl.testing import parameterized

from tasks import sni, synthetic


def _task_json(category="Mathematics", n=3, definition="Add."):
    return {
        "Categories": [category],
        "Definition": [definition],
        "Positive Examples": [{"input": "1 2", "output": "3", "explanation": "sum"}],
        "Instances": [
            {"id": f"t-{i}", "input": f"{i} 1", "output": [str(i + 1)]} for i in range(n)
        ],
    }


class SniLoaderTest(tf.test.TestCase, parameterized.TestCase):
    def _write(self, root, name, data):
        path = pathlib.Path(root) / "tasks" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
        return path

    def test_parses_fields(self):
        root = self.create_tempdir().full_path
        self._write(root, "task1_add", _task_json(n=4))
        (task,) = sni.load_sni(root)
        self.assertEqual(task.name, "task1_add")
        self.assertEqual(task.definition, "Add.")
        self.assertEqual(task.category, "Mathematics")
        self.assertLen(task.instances, 4)
        self.assertEqual(task.instances[2], sni.SniInstance(id="t-2", input="2 1", outputs=("3",)))
        self.assertEqual(task.positive_examples[0].output, "3")
        self.assertTrue(task.source_path.endswith("task1_add.json"))

    def test_only_selected_tasks_are_parsed(self):
        root = self.create_tempdir().full_path
        self._write(root, "good", _task_json())
        self._write(root, "broken", "{ not json")
        (task,) = sni.load_sni(root, task_names=["good"])
        self.assertEqual(task.name, "good")
        with self.assertRaisesRegex(sni.SniFormatError, r"broken\.json.*malformed JSON.*line 1"):
            sni.load_sni(root)

    def test_categories_read_from_file_heads(self):
        root = self.create_tempdir().full_path
        self._write(root, "a", _task_json(category="Translation"))
        # Instances are broken, but the category is readable from the file head.
        bad = json.dumps(_task_json(category="Sorting"))[:-3]
        self._write(root, "b", bad)
        collection = sni.open_sni(root)
        self.assertEqual(collection.categories(), {"Translation": ["a"], "Sorting": ["b"]})
        (task,) = sni.load_sni(root, categories=["Translation"])
        self.assertEqual(task.name, "a")

    def test_category_index_file(self):
        root = self.create_tempdir().full_path
        self._write(root, "a", _task_json(category="X"))
        path = sni.write_category_index(root)
        self.assertEqual(json.loads(path.read_text())["categories"], {"X": ["a"]})
        self.assertEqual(sni.open_sni(root).task_names, ("a",))  # The index is not a task.

    def test_max_instances_and_split_lists(self):
        root = self.create_tempdir().full_path
        for name in ("t1", "t2", "t3"):
            self._write(root, name, _task_json(n=5))
        splits = pathlib.Path(root) / "splits" / "default"
        splits.mkdir(parents=True)
        (splits / "train_tasks.txt").write_text("t1\nt3\nmissing_elsewhere\n")
        (splits / "test_tasks.txt").write_text("t2\n")
        train = sni.load_sni(root, split="train", max_instances_per_task=2)
        self.assertEqual([t.name for t in train], ["t1", "t3"])
        self.assertEqual([len(t.instances) for t in train], [2, 2])
        self.assertEqual([t.name for t in sni.load_sni(root, split="test")], ["t2"])
        with self.assertRaisesRegex(FileNotFoundError, "valid_tasks.txt"):
            sni.load_sni(root, split="valid")

    def test_flat_directory(self):
        root = pathlib.Path(self.create_tempdir().full_path)
        (root / "x.json").write_text(json.dumps(_task_json()))
        self.assertEqual([t.name for t in sni.load_sni(root)], ["x"])

    @parameterized.named_parameters(
        ("no_instances", {"Categories": ["A"], "Definition": ["d"]}, r"missing required key `Instances`"),
        ("empty", {**_task_json(), "Instances": []}, r"`Instances` is empty"),
        ("no_definition", {"Categories": ["A"], "Instances": []}, r"`Definition`"),
        ("bad_output", {**_task_json(), "Instances": [{"id": "1", "input": "x", "output": 3}]},
         r"Instances\[0\]\.output"),
        ("not_object", [1, 2], "top level must be a JSON object"),
    )  # fmt: skip
    def test_schema_errors_name_file_and_key(self, data, pattern):
        root = self.create_tempdir().full_path
        self._write(root, "task9_bad", data)
        with self.assertRaisesRegex(sni.SniFormatError, r"task9_bad\.json.*" + pattern):
            sni.load_sni(root)

    def test_unknown_task_and_category(self):
        root = self.create_tempdir().full_path
        self._write(root, "task1_add", _task_json())
        with self.assertRaisesRegex(KeyError, r"unknown task.*task1_ad.*close matches.*task1_add"):
            sni.load_sni(root, task_names=["task1_ad"])
        with self.assertRaisesRegex(KeyError, r"unknown categor.*Poetry.*Mathematics"):
            sni.load_sni(root, categories=["Poetry"])
        with self.assertRaisesRegex(TypeError, "not str"):
            sni.load_sni(root, task_names="task1_add")

    def test_missing_directory(self):
        with self.assertRaisesRegex(FileNotFoundError, "`directory`.*natural-instructions"):
            sni.load_sni("/nonexistent/sni")

    def test_reads_the_synthetic_suite(self):
        root = self.create_tempdir().full_path
        synthetic.write_synthetic_suite(root, seed=5, instances_per_task=9)
        loaded = [dataclasses.replace(t, source_path=None) for t in sni.load_sni(root)]
        self.assertEqual(loaded, synthetic.generate_synthetic_suite(seed=5, instances_per_task=9))
        collection = sni.open_sni(root)
        self.assertEqual(sorted(collection.categories()), sorted(synthetic.CATEGORIES))


@pytest.mark.sni_mini
def test_sni_mini_loads_all_24_tasks(sni_mini_dir):
    splits = json.loads((sni_mini_dir / "splits.json").read_text(encoding="utf-8"))
    tasks = sni.load_sni(sni_mini_dir)
    assert [t.name for t in tasks] == splits["tasks"]
    assert sum(len(t.instances) for t in tasks) == 2938
    by_category = {}
    for t in tasks:
        by_category.setdefault(t.category, []).append(t.name)
    assert by_category == splits["categories"]
    assert all(t.definition and t.positive_examples for t in tasks)
    translation = sni.load_sni(sni_mini_dir, categories=["Translation"], max_instances_per_task=10)
    assert [len(t.instances) for t in translation] == [10, 10, 10]
    assert translation[1].output_language == ("Japanese",)


if __name__ == "__main__":
    tf.test.main()
