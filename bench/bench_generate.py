"""Greedy generation throughput (KV cache) at batch 8: one JSON line per backbone.

    python -m bench.bench_generate [--backbones=tiny,smollm2-135m-instruct]
        [--new_tokens=16] [--input_length=32] [--repeats=5]

`PromptTunedLM.greedy_generate` in one `tf.function` (traced once), a 20-position
prompt, full rows of `--input_length` tokens and no stop token that can occur, so
every row generates exactly `--new_tokens` tokens; tokens/s counts generated tokens.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import bench_train_step as common  # noqa: E402


def bench_generate(model, *, name, batch=8, input_length=32, new_tokens=16, repeats=5):
    rng = np.random.default_rng(0)
    ids = tf.constant(rng.integers(3, model.vocabulary_size, size=[batch, input_length]), tf.int32)
    lengths = tf.fill([batch], input_length)
    prompt = tf.random.stateless_uniform([common.PROMPT_LENGTH, model.hidden_dim], [0, 1])

    @tf.function
    def generate(prompt, ids, lengths):
        return model.greedy_generate(
            prompt, ids, lengths, max_new_tokens=new_tokens, stop_token_ids=[-1]
        )

    start = time.perf_counter()
    generate(prompt, ids, lengths)[0].numpy()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens, out_lengths = generate(prompt, ids, lengths)
        tokens.numpy()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    generated = int(np.sum(out_lengths.numpy()))
    return {
        "benchmark": "generate",
        "backbone": name,
        "batch_size": batch,
        "input_length": input_length,
        "prompt_length": common.PROMPT_LENGTH,
        "new_tokens": new_tokens,
        "generated_tokens": generated,
        "generate_s_median": round(median, 4),
        "generate_s_all": [round(t, 4) for t in times],
        "first_call_s": round(first, 3),
        "generated_tokens_per_s": round(generated / median, 1),
        "peak_rss_mib": common.peak_rss_mib(),
        "repeats": repeats,
        "machine": common.machine_info(),
    }


_BACKBONES = flags.DEFINE_list("backbones", ["tiny", "smollm2-135m-instruct"], "Backbones.")
_NEW = flags.DEFINE_integer("new_tokens", 16, "Generated tokens per row.")
_INPUT = flags.DEFINE_integer("input_length", 32, "Input tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions after warm-up.")


def main(argv):
    del argv
    for name in _BACKBONES.value:
        model = common.load_model(name)
        result = bench_generate(
            model, name=name, input_length=_INPUT.value, new_tokens=_NEW.value,
            repeats=_REPEATS.value,
        )  # fmt: skip
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
