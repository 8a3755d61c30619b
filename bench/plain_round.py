"""Federated rounds without TFF: the baselines of `bench.bench_round` (no flags here).

`client_datasets` makes each client's synthetic batches; `build_plain_round`
runs one FedAvg round of SGD clients in one `tf.function`.
"""

import collections

import numpy as np
import tensorflow as tf

from bench import bench_train_step as common
from fedprompt import client_update


def client_datasets(vocab, *, clients, steps, batch, seq):
    datasets = []
    for c in range(clients):
        rows = [common.synthetic_batch(vocab, batch, seq, seed=100 * c + s) for s in range(steps)]
        stacked = {
            "token_ids": np.concatenate([r["token_ids"].numpy() for r in rows]),
            "padding_mask": np.concatenate([r["padding_mask"].numpy() for r in rows]).astype(bool),
            "target_mask": np.concatenate([r["target_mask"].numpy() for r in rows]).astype(bool),
        }
        ds = tf.data.Dataset.from_tensor_slices(stacked).batch(batch)
        datasets.append(
            ds.map(
                lambda b: collections.OrderedDict(
                    (k, b[k]) for k in ("token_ids", "padding_mask", "target_mask")
                )
            )
        )
    return datasets


def build_plain_round(loss_fn, datasets, shape, *, learning_rate=0.01, parallel=False):
    """One FedAvg round (SGD clients, example-weighted mean) in one `tf.function`, no TFF.

    Sequential (`parallel=False`): every client updates one shared prompt
    variable and optimizer, so the clients run one after another. Parallel: each
    client has its own variable and optimizer, so nothing orders the clients and
    TF's executor may run their loops at the same time, as TFF runs clients on
    parallel threads; this is the baseline the federated overhead is measured
    against. Both give the same prompt.
    """
    count = len(datasets) if parallel else 1
    variables = [tf.Variable(tf.zeros(shape)) for _ in range(count)]
    optimizers = [tf.keras.optimizers.SGD(learning_rate) for _ in range(count)]
    for variable, optimizer in zip(variables, optimizers):
        optimizer.build([variable])

    @tf.function
    def plain_round(prompt):
        deltas, weights = [], []
        for i, ds in enumerate(datasets):
            out = client_update.client_update(
                loss_fn=loss_fn, prompt_variable=variables[i % count], initial_prompt=prompt,
                dataset=ds, optimizer=optimizers[i % count], num_epochs=1, max_steps=None,
            )  # fmt: skip
            deltas.append(out.prompt_delta * tf.cast(out.num_examples, tf.float32))
            weights.append(tf.cast(out.num_examples, tf.float32))
        return prompt + tf.add_n(deltas) / tf.add_n(weights)

    return plain_round
