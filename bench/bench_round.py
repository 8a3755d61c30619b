"""Federated round time through TFF against the same client updates in a plain TF loop.

One JSON line per backbone:

    python -m bench.bench_round [--backbones=tiny,smollm2-135m-instruct]
        [--clients=4] [--local_steps=4] [--batch_size=4] [--sequence_length=64] [--repeats=5]

Each client holds `local_steps` synthetic batches and trains one epoch with SGD.
`plain_loop_s`: `client_update.client_update` for every client in one traced
`tf.function` on the eagerly loaded backbone, then the example-weighted mean of
the deltas: the same computation without TFF, clients one after another (one
shared prompt variable). `plain_parallel_s`: the same with one variable and
optimizer per client, so TF may run the clients at once, as TFF does
(`build_plain_round`). `round_s`: `next` of `fedprompt.build_fed_avg` (backbone
restored from a frozen checkpoint inside the client computation). `overhead` =
round_s / (the faster plain loop) - 1; `overhead_vs_sequential_loop` uses the
sequential one.
`xla_round_s` (with `--xla`, the default): `next` of
`xla_runtime.build_xla_fed_avg` on the default strategy (one CPU replica, clients
in turn; XLA-compiled gradient on `static_shape_loss`, which runs the LM head at
every position), from the same initial prompt; `xla_vs_tff_first_round_max_abs`
is the largest prompt difference between the two runtimes after their first
round.
`share_outside_training_steps` = 1 - clients x steps x (median tf.function step
time, measured in the same process) / round_s.
The plain loop runs first: a Keras model built eagerly must not be used after
layers were built inside a TFF computation (DESIGN.md trap 2).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import bench_train_step as common  # noqa: E402
from bench.plain_round import build_plain_round, client_datasets  # noqa: E402
from fedprompt import (  # noqa: E402
    backbones,
    data_types,
    execution,
    fed_avg,
    frozen_backbone,
    prompt_model,
    xla_runtime,
)


def _xla_round(frozen, shape, initial, datasets, repeats):
    """Times `xla_runtime.build_xla_fed_avg`'s `next`; returns (fields, first-round prompt)."""
    start = time.perf_counter()
    process = xla_runtime.build_xla_fed_avg(
        model_fn=lambda: prompt_model.PromptTunedLM(
            frozen_backbone.restore_backbone(frozen)
        ).static_shape_loss,
        prompt_shape=shape, initial_prompt=initial,
        client_optimizer=fed_avg.ClientOptimizer.SGD, client_learning_rate=0.01,
        local_epochs=1,
    )  # fmt: skip
    build_s = time.perf_counter() - start
    holder = {"state": process.initialize()}

    def one_round():
        holder["state"], _ = process.next(holder["state"], datasets)
        holder.setdefault("first", holder["state"].prompt)

    first, times = common.timed(one_round, repeats)
    return {
        "xla_round_s_median": round(statistics.median(times), 4),
        "xla_round_s_all": [round(t, 4) for t in times],
        "xla_round_first_call_s": round(first, 3),
        "build_xla_fed_avg_s": round(build_s, 3),
        "xla_strategy": type(process.strategy).__name__,
        "xla_num_replicas": process.strategy.num_replicas_in_sync,
    }, holder["first"]


def bench_xla_round_only(name, *, clients=4, steps=4, batch=4, seq=64, repeats=5):
    """The XLA round alone (`--xla_only`): for backbones whose TFF round is too slow here."""
    resolved = backbones.resolve_backbone(name)
    keras_backbone = resolved.load_keras_backbone()
    hidden, vocab = int(keras_backbone.hidden_dim), int(keras_backbone.vocabulary_size)
    shape = (common.PROMPT_LENGTH, hidden)
    initial = np.asarray(tf.random.stateless_uniform(shape, [0, 1], -0.5, 0.5))
    datasets = client_datasets(vocab, clients=clients, steps=steps, batch=batch, seq=seq)
    with tempfile.TemporaryDirectory() as tmp:
        frozen = frozen_backbone.save_frozen_backbone(keras_backbone, os.path.join(tmp, "frozen"))
        del keras_backbone
        fields, _ = _xla_round(frozen, shape, initial, datasets, repeats)
    return {
        "benchmark": "xla_round",
        "backbone": name,
        "clients": clients,
        "local_steps": steps,
        "batch_size": batch,
        "sequence_length": seq,
        "prompt_length": common.PROMPT_LENGTH,
        **fields,
        "peak_rss_mib": common.peak_rss_mib(),
        "repeats": repeats,
        "machine": common.machine_info(),
    }


def bench_round(name, *, clients=4, steps=4, batch=4, seq=64, repeats=5, step_repeats=5, xla=True):
    resolved = backbones.resolve_backbone(name)
    keras_backbone = resolved.load_keras_backbone()
    model = prompt_model.PromptTunedLM(keras_backbone)
    shape = (common.PROMPT_LENGTH, model.hidden_dim)
    initial = np.asarray(tf.random.stateless_uniform(shape, [0, 1], -0.5, 0.5))
    datasets = client_datasets(
        model.vocabulary_size, clients=clients, steps=steps, batch=batch, seq=seq
    )

    # Plain TF loops: the same client updates, then the weighted mean.
    plain_round = build_plain_round(model.loss, datasets, shape)
    plain_first, plain_times = common.timed(
        lambda: plain_round(tf.constant(initial)).numpy(), repeats
    )
    parallel_round = build_plain_round(model.loss, datasets, shape, parallel=True)
    parallel_first, parallel_times = common.timed(
        lambda: parallel_round(tf.constant(initial)).numpy(), repeats
    )

    # One tf.function train step on the same shape: the clients' training-step time.
    step_result = common.bench_config(
        model, name=name, batch=batch, seq=seq, mode="function", repeats=step_repeats,
        matmul_rate=1.0,
    )  # fmt: skip
    step_s = step_result["step_s_median"]

    with tempfile.TemporaryDirectory() as tmp:
        frozen = frozen_backbone.save_frozen_backbone(keras_backbone, os.path.join(tmp, "frozen"))

        def model_fn():
            return prompt_model.PromptTunedLM(frozen_backbone.restore_backbone(frozen)).loss

        xla_result, xla_first_prompt = {}, None
        if xla:
            # Before any TFF tracing (DESIGN.md trap 2): it builds its own backbone.
            xla_result, xla_first_prompt = _xla_round(frozen, shape, initial, datasets, repeats)

        with execution.local_context():
            start = time.perf_counter()
            process = fed_avg.build_fed_avg(
                model_fn=model_fn, prompt_shape=shape, batch_spec=data_types.batch_spec(seq),
                initial_prompt=initial, client_optimizer=fed_avg.ClientOptimizer.SGD,
                client_learning_rate=0.01, local_epochs=1,
            )  # fmt: skip
            build_s = time.perf_counter() - start
            state = process.initialize()
            holder = {"state": state}

            def one_round():
                holder["state"], _ = process.next(holder["state"], datasets)
                holder.setdefault("first", holder["state"].prompt)

            round_first, round_times = common.timed(one_round, repeats)
    round_s = statistics.median(round_times)
    plain_s = statistics.median(plain_times)
    parallel_s = statistics.median(parallel_times)
    if xla_result:
        xla_result["xla_speedup_vs_tff_round"] = round(
            round_s / xla_result["xla_round_s_median"], 3
        )
        xla_result["xla_vs_tff_first_round_max_abs"] = float(
            np.max(np.abs(np.asarray(xla_first_prompt) - np.asarray(holder["first"])))
        )
    return {
        "benchmark": "fed_avg_round",
        "backbone": name,
        "clients": clients,
        "local_steps": steps,
        "batch_size": batch,
        "sequence_length": seq,
        "prompt_length": common.PROMPT_LENGTH,
        "round_s_median": round(round_s, 4),
        "round_s_all": [round(t, 4) for t in round_times],
        "round_first_call_s": round(round_first, 3),
        "build_fed_avg_s": round(build_s, 3),
        "plain_loop_s_median": round(plain_s, 4),
        "plain_loop_s_all": [round(t, 4) for t in plain_times],
        "plain_loop_first_call_s": round(plain_first, 3),
        "plain_parallel_s_median": round(parallel_s, 4),
        "plain_parallel_s_all": [round(t, 4) for t in parallel_times],
        "plain_parallel_first_call_s": round(parallel_first, 3),
        "overhead_vs_sequential_loop": round(round_s / plain_s - 1.0, 4),
        "overhead": round(round_s / min(plain_s, parallel_s) - 1.0, 4),
        "train_step_s_median": step_s,
        "share_outside_training_steps": round(1.0 - clients * steps * step_s / round_s, 4),
        **xla_result,
        "peak_rss_mib": common.peak_rss_mib(),
        "peak_rss_note": "this process only; TFF's worker_binary children not included",
        "repeats": repeats,
        "machine": common.machine_info(),
    }


_BACKBONES = flags.DEFINE_list("backbones", ["tiny", "smollm2-135m-instruct"], "Backbones.")
_CLIENTS = flags.DEFINE_integer("clients", 4, "Clients per round.")
_STEPS = flags.DEFINE_integer("local_steps", 4, "Batches (= local steps) per client.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size.")
_SEQ = flags.DEFINE_integer("sequence_length", 64, "Sequence length.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds after the first.")
_XLA = flags.DEFINE_bool("xla", True, "Also time the XLA runtime's round (fedprompt.xla_runtime).")
_XLA_ONLY = flags.DEFINE_bool("xla_only", False, "Time only the XLA runtime's round.")


def main(argv):
    del argv
    for name in _BACKBONES.value:
        if _XLA_ONLY.value:
            result = bench_xla_round_only(
                name, clients=_CLIENTS.value, steps=_STEPS.value, batch=_BATCH.value,
                seq=_SEQ.value, repeats=_REPEATS.value,
            )  # fmt: skip
            print(json.dumps(result), flush=True)
            continue
        result = bench_round(
            name, clients=_CLIENTS.value, steps=_STEPS.value, batch=_BATCH.value,
            seq=_SEQ.value, repeats=_REPEATS.value, xla=_XLA.value,
        )  # fmt: skip
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
