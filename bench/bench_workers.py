"""FedAvg round time on TFF's local context against the same round over local TFF workers.

One JSON line per backbone:

    python -m bench.bench_workers [--backbones=tiny] [--workers=1,2]
        [--clients=4] [--local_steps=4] [--batch_size=4] [--sequence_length=64] [--repeats=5]

Each client holds `local_steps` synthetic batches and trains one epoch with SGD.
`local_round_s`: `next` of `fedprompt.build_fed_avg` under
`execution.local_context()` (one worker_binary that TFF starts and runs all clients
in). `workers_<n>_round_s`: the same process, same initial state and data, under
`execution.remote_context` over n worker_binary processes on 127.0.0.1 started by
`execution.local_workers(n)` (the clients split into n contiguous slices, one per
worker, merged in worker order). Medians over `repeats` rounds after a first,
untimed one (which pays the workers' computation set-up and backbone restore).
`workers_<n>_max_abs_vs_local` is the largest prompt difference from the local
context after all 1 + repeats rounds. Every worker process shares this machine's
cores with the driver.
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
from bench.plain_round import client_datasets  # noqa: E402
from fedprompt import (  # noqa: E402
    backbones,
    data_types,
    execution,
    fed_avg,
    frozen_backbone,
    prompt_model,
)


def _rounds(process, datasets, repeats):
    """(first-call seconds, timed seconds, final prompt) of 1 + repeats rounds."""
    state = process.initialize()
    start = time.perf_counter()
    state, _ = process.next(state, datasets)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, _ = process.next(state, datasets)
        times.append(time.perf_counter() - start)
    return first, times, np.asarray(state.prompt)


def bench_workers(name, *, workers=(1, 2), clients=4, steps=4, batch=4, seq=64, repeats=5):
    resolved = backbones.resolve_backbone(name)
    keras_backbone = resolved.load_keras_backbone()
    hidden, vocab = int(keras_backbone.hidden_dim), int(keras_backbone.vocabulary_size)
    shape = (common.PROMPT_LENGTH, hidden)
    initial = np.asarray(tf.random.stateless_uniform(shape, [0, 1], -0.5, 0.5))
    datasets = client_datasets(vocab, clients=clients, steps=steps, batch=batch, seq=seq)
    result = {
        "benchmark": "fed_avg_round_workers",
        "backbone": name,
        "clients": clients,
        "local_steps": steps,
        "batch_size": batch,
        "sequence_length": seq,
        "prompt_length": common.PROMPT_LENGTH,
    }
    with tempfile.TemporaryDirectory() as tmp:
        frozen = frozen_backbone.save_frozen_backbone(keras_backbone, os.path.join(tmp, "frozen"))
        del keras_backbone
        # Traced once; the computation is the same under every context.
        process = fed_avg.build_fed_avg(
            model_fn=lambda: prompt_model.PromptTunedLM(
                frozen_backbone.restore_backbone(frozen)
            ).loss,
            prompt_shape=shape, batch_spec=data_types.batch_spec(seq), initial_prompt=initial,
            client_optimizer=fed_avg.ClientOptimizer.SGD, client_learning_rate=0.01,
            local_epochs=1,
        )  # fmt: skip
        with execution.local_context():
            first, times, local_prompt = _rounds(process, datasets, repeats)
        result |= {
            "local_round_s_median": round(statistics.median(times), 4),
            "local_round_s_all": [round(t, 4) for t in times],
            "local_round_first_call_s": round(first, 3),
        }
        for n in workers:
            start = time.perf_counter()
            with execution.local_workers(n) as addresses:
                started = time.perf_counter() - start
                with execution.remote_context(addresses):
                    first, times, prompt = _rounds(process, datasets, repeats)
            key = f"workers_{n}"
            result |= {
                f"{key}_round_s_median": round(statistics.median(times), 4),
                f"{key}_round_s_all": [round(t, 4) for t in times],
                f"{key}_round_first_call_s": round(first, 3),
                f"{key}_start_s": round(started, 3),
                f"{key}_vs_local": round(
                    statistics.median(times) / result["local_round_s_median"], 3
                ),
                f"{key}_max_abs_vs_local": float(np.max(np.abs(prompt - local_prompt))),
            }
    return result | {
        "repeats": repeats,
        "peak_rss_mib": common.peak_rss_mib(),
        "peak_rss_note": "this process only; worker_binary processes not included",
        "machine": common.machine_info(),
    }


_BACKBONES = flags.DEFINE_list("backbones", ["tiny"], "Backbones.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Local worker counts to time.")
_CLIENTS = flags.DEFINE_integer("clients", 4, "Clients per round.")
_STEPS = flags.DEFINE_integer("local_steps", 4, "Batches (= local steps) per client.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size.")
_SEQ = flags.DEFINE_integer("sequence_length", 64, "Sequence length.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds after the first.")


def main(argv):
    del argv
    for name in _BACKBONES.value:
        result = bench_workers(
            name, workers=tuple(int(n) for n in _WORKERS.value), clients=_CLIENTS.value,
            steps=_STEPS.value, batch=_BATCH.value, seq=_SEQ.value, repeats=_REPEATS.value,
        )  # fmt: skip
        print(json.dumps(result), flush=True)


def _main_then_release_tff(argv):
    try:
        main(argv)
    finally:
        execution.reset_context()


if __name__ == "__main__":
    app.run(_main_then_release_tff)
