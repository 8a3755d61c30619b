"""A client's local loop inside a `tf.function`: dataset loop vs iterator loop.

    python -m bench.bench_client_loop [--backbone=tiny] [--clients=4] [--local_steps=4]
        [--batch_size=4] [--sequence_length=64] [--repeats=5]

Times the same `clients x local_steps` SGD steps (`client_update.client_train_step`)
four ways, one JSON line: separate `tf.function` calls from Python; one
`tf.function` with the steps unrolled; one `tf.function` looping `for batch in
dataset` (autograph makes it `dataset.reduce`); and one looping over
`client_update.iterate_batches(dataset)` (a `tf.while_loop`), as `client_update` does.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import statistics  # noqa: E402

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import bench_train_step as common  # noqa: E402
from bench.plain_round import client_datasets  # noqa: E402
from fedprompt import client_update  # noqa: E402

_BACKBONE = flags.DEFINE_string("backbone", "tiny", "Backbone name.")
_CLIENTS = flags.DEFINE_integer("clients", 4, "Clients (datasets).")
_STEPS = flags.DEFINE_integer("local_steps", 4, "Batches per client.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size.")
_SEQ = flags.DEFINE_integer("sequence_length", 64, "Sequence length.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions after warm-up.")


def _median_s(fn, repeats):
    return round(statistics.median(common.timed(fn, repeats)[1]), 4)


def main(argv):
    del argv
    model = common.load_model(_BACKBONE.value)
    datasets = client_datasets(
        model.vocabulary_size, clients=_CLIENTS.value, steps=_STEPS.value,
        batch=_BATCH.value, seq=_SEQ.value,
    )  # fmt: skip
    batches = [batch for dataset in datasets for batch in dataset]
    prompt = tf.Variable(tf.zeros([common.PROMPT_LENGTH, model.hidden_dim]))
    optimizer = tf.keras.optimizers.SGD(0.01)
    optimizer.build([prompt])

    def train_step(batch):
        return client_update.client_train_step(
            loss_fn=model.loss, prompt_variable=prompt, batch=batch, optimizer=optimizer
        )[0]

    step = tf.function(train_step)

    @tf.function
    def unrolled():
        return tf.add_n([train_step(batch) for batch in batches])

    @tf.function
    def dataset_loop():
        total = 0.0
        for dataset in datasets:
            for batch in dataset:  # autograph: dataset.reduce
                total += train_step(batch)
        return total

    @tf.function
    def iterator_loop():
        total = 0.0
        for dataset in datasets:
            for batch in client_update.iterate_batches(dataset):  # tf.while_loop
                total += train_step(batch)
        return total

    repeats = _REPEATS.value
    print(json.dumps({
        "benchmark": "client_loop",
        "backbone": _BACKBONE.value,
        "steps": len(batches),
        "batch_size": _BATCH.value,
        "sequence_length": _SEQ.value,
        "separate_calls_s": _median_s(lambda: [step(b).numpy() for b in batches], repeats),
        "unrolled_s": _median_s(lambda: unrolled().numpy(), repeats),
        "dataset_loop_s": _median_s(lambda: dataset_loop().numpy(), repeats),
        "iterator_loop_s": _median_s(lambda: iterator_loop().numpy(), repeats),
        "repeats": repeats,
        "machine": common.machine_info(),
    }))  # fmt: skip


if __name__ == "__main__":
    app.run(main)
