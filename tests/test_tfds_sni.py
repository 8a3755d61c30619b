"""Tests for the tensorflow-datasets builder over a local SNI directory."""

import collections
import pathlib

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks.tfds_sni  # noqa: F401  (registers "sni")
from tasks import synthetic


def _prepare(manual_dir, data_dir):
    builder = tfds.builder("sni", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


class TfdsSniTest(tf.test.TestCase):
    def test_clone_layout_uses_split_lists(self):
        manual = pathlib.Path(self.create_tempdir("clone").full_path)
        synthetic.write_synthetic_suite(manual, seed=0, instances_per_task=4)
        names = synthetic.synthetic_task_names()
        split_dir = manual / "splits" / "default"
        split_dir.mkdir(parents=True)
        (split_dir / "train_tasks.txt").write_text("\n".join(names[:20]) + "\n")
        (split_dir / "test_tasks.txt").write_text("\n".join(names[20:]) + "\n")
        builder = _prepare(manual, self.create_tempdir("tfds").full_path)
        self.assertEqual(builder.info.splits["train"].num_examples, 80)
        self.assertEqual(builder.info.splits["test"].num_examples, 16)
        test = list(builder.as_dataset(split="test").as_numpy_iterator())
        self.assertEqual({x["task_name"].decode() for x in test}, set(names[20:]))
        by_id = {x["id"].decode(): x for x in test}
        reference = synthetic.generate_synthetic_suite(seed=0, instances_per_task=4)[21]
        row = by_id[reference.instances[1].id]
        self.assertEqual(row["input"].decode(), reference.instances[1].input)
        self.assertEqual([o.decode() for o in row["outputs"]], list(reference.instances[1].outputs))
        self.assertEqual(row["category"].decode(), "Classification")


@pytest.mark.sni_mini
def test_prepares_sni_mini_offline(sni_mini_dir, tmp_path):
    builder = _prepare(sni_mini_dir, tmp_path)
    assert builder.info.splits["train"].num_examples == 2938
    rows = list(builder.as_dataset(split="train").as_numpy_iterator())
    per_category = collections.Counter(r["category"].decode() for r in rows)
    assert len(per_category) == 8
    assert len({r["task_name"] for r in rows}) == 24
