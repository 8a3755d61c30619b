"""A tensorflow-datasets builder for Super-NaturalInstructions from a local clone.

Importing this module registers the builder as `"sni"`. SNI cannot be downloaded
as one archive in a useful way (it is a 3 GB git repository), so the builder reads
a manual directory, offline::

    import tensorflow_datasets as tfds
    import tasks.tfds_sni  # registers "sni"

    builder = tfds.builder("sni", data_dir="/tmp/tfds")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/path/to/natural-instructions")
    )
    train = builder.as_dataset(split="train")

The manual directory may be the full clone (`tasks/*.json` and
`splits/default/{train,test}_tasks.txt`: splits `train` and `test`) or any
directory `tasks.sni.load_sni` reads, such as sni-mini (no split lists: every task
is in `train`). Each element is one instance with its task's name, category,
definition and languages, plus all reference outputs.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from tasks import sni

_DESCRIPTION = """Super-NaturalInstructions (Wang et al., 2022) read from a local clone of
https://github.com/allenai/natural-instructions (or a subset in the same format):
one example per task instance."""

_CITATION = """@inproceedings{wang2022super,
  title={Super-NaturalInstructions: Generalization via Declarative Instructions on 1600+ NLP Tasks},
  author={Wang, Yizhong and others},
  booktitle={EMNLP},
  year={2022}
}"""


class Sni(tfds.core.GeneratorBasedBuilder):
    """SNI instances from a manual directory (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Instances of every task in the manual directory."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """Clone https://github.com/allenai/natural-instructions
    (or use a subset with `tasks/*.json`, such as sni-mini) and pass its path as
    `tfds.download.DownloadConfig(manual_dir=...)`."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "task_name": tfds.features.Text(),
                    "category": tfds.features.Text(),
                    "definition": tfds.features.Text(),
                    "input": tfds.features.Text(),
                    "outputs": tfds.features.Sequence(tfds.features.Text()),
                    "input_language": tfds.features.Text(),
                    "output_language": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/allenai/natural-instructions",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = pathlib.Path(dl_manager.manual_dir)
        collection = sni.open_sni(root)
        split_dir = root / "splits" / "default"
        if (split_dir / "train_tasks.txt").is_file() and (split_dir / "test_tasks.txt").is_file():
            return {
                "train": self._generate_examples(collection, collection.split_task_names("train")),
                "test": self._generate_examples(collection, collection.split_task_names("test")),
            }
        return {"train": self._generate_examples(collection, collection.task_names)}

    def _generate_examples(self, collection: sni.SniCollection, task_names):
        for name in task_names:
            task = collection.load_task(name)
            for index, instance in enumerate(task.instances):
                # SNI ids are unique in the dataset; the index guards subsets that reuse them.
                yield (
                    f"{name}/{index}",
                    {
                        "id": instance.id,
                        "task_name": task.name,
                        "category": task.category,
                        "definition": task.definition,
                        "input": instance.input,
                        "outputs": list(instance.outputs),
                        "input_language": ", ".join(task.input_language),
                        "output_language": ", ".join(task.output_language),
                    },
                )
