"""Time to build every client of sni-mini: load, partition, statistics, tf.data.

Prints one JSON line. The target (issue 4) is under 10 s for all clients; it is
measured here, not asserted in a test.

    python -m bench.bench_partition [--sni_dir=../shared/data/sni-mini]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from fedprompt import execution  # noqa: E402
from fedprompt.data_types import PromptTemplate  # noqa: E402
from tasks import partition, preprocess, sni  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parent.parent
_SNI_DIR = flags.DEFINE_string(
    "sni_dir", str(_REPO.parent / "shared" / "data" / "sni-mini"), "SNI directory to partition."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).")


class _ByteTokenizer:
    """A byte-level `TextTokenizer`, so the timing does not depend on a vocabulary."""

    vocabulary_size = 258
    eos_token_id = 256
    pad_token_id = 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _build_all(directory):
    timings = {}
    start = time.perf_counter()
    tasks = sni.load_sni(directory)
    timings["load_s"] = time.perf_counter() - start
    splits = {}
    start = time.perf_counter()
    for name, kwargs in (
        ("natural", dict(scheme=partition.PartitionScheme.NATURAL)),
        ("iid", dict(scheme=partition.PartitionScheme.DIRICHLET, alpha=math.inf)),
        ("dirichlet_0.1", dict(scheme=partition.PartitionScheme.DIRICHLET, alpha=0.1)),
        ("home_0.8", dict(scheme=partition.PartitionScheme.HOME_FRACTION, home_fraction=0.8)),
    ):
        split = partition.build_federated_split(
            tasks, num_clients=16, num_validation_clients=4, num_test_clients=8, seed=0, **kwargs
        )
        splits[name] = (split, partition.partition_statistics(split))
    timings["partition_4_schemes_s"] = time.perf_counter() - start
    start = time.perf_counter()
    split = splits["dirichlet_0.1"][0]
    tokenizer = _ByteTokenizer()
    num_batches = 0
    for client in split.train_clients:
        ds = preprocess.build_dataset(
            client.examples, tokenizer=tokenizer, template=PromptTemplate.SNI,
            sequence_length=2048, batch_size=8, shuffle_seed=0,
        )  # fmt: skip
        num_batches += int(ds.cardinality())
    for client in split.validation_clients + split.test_clients:
        for examples in (client.personalization_train, client.local_test):
            preprocess.build_dataset(
                examples, tokenizer=tokenizer, template=PromptTemplate.SNI,
                sequence_length=2048, batch_size=8,
            )  # fmt: skip
    timings["tf_data_one_split_s"] = time.perf_counter() - start
    heterogeneity = {name: round(stats["heterogeneity"], 4) for name, (_, stats) in splits.items()}
    return timings, heterogeneity, len(tasks), num_batches


def main(argv):
    del argv
    directory = pathlib.Path(_SNI_DIR.value)
    if not directory.is_dir():
        raise SystemExit(f"--sni_dir={directory} is not a directory (sni-mini is needed).")
    # No TFF computation runs here, but importing TFF installs a context; own and
    # clean it up so no worker_binary outlives the script (DESIGN.md trap 1).
    with execution.local_context():
        _build_all(directory)  # Warm-up: imports, tf.data graph construction.
        runs = [_build_all(directory) for _ in range(_REPEATS.value)]
    keys = runs[0][0]
    medians = {k: round(statistics.median(r[0][k] for r in runs), 4) for k in keys}
    total = round(statistics.median(sum(r[0].values()) for r in runs), 4)
    print(
        json.dumps(
            {
                "benchmark": "partition_sni_mini",
                "total_s_median": total,
                "target_s": 10.0,
                **{f"{k}_median": v for k, v in medians.items()},
                "num_tasks": runs[0][2],
                "clients_per_split": 28,
                "train_batches_dirichlet_0.1": runs[0][3],
                "heterogeneity": runs[0][1],
                "repeats": _REPEATS.value,
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "tensorflow": tf.__version__,
                },  # fmt: skip
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
