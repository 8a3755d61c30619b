"""Prompt-tuning train-step throughput: eager, tf.function, XLA; FLOPs; matmul rate.

One JSON line per (backbone, batch, sequence, mode):

    python -m bench.bench_train_step [--backbones=tiny,smollm2-135m-instruct]
        [--batch_sizes=4,8] [--sequence_lengths=64,128] [--modes=eager,function,xla]
        [--repeats=5]

FLOPs are counted analytically from the backbone config (`step_flops`): every matmul
of the forward pass (2 FLOPs per multiply-add; attention over all P + T positions,
the causal mask not exploited; the LM head only at target positions, as
`PromptTunedLM.loss` does), plus the backward pass through activations only (the
backbone is frozen, so no weight gradients): 1x the forward FLOPs for each weight
matmul and LM head, 2x for the two activation-activation attention matmuls.
Element-wise ops, softmax and norms are not counted. The achieved rate is compared
with this machine's dense float32 matmul rate (`tf.matmul` of 2048 x 2048, median),
measured in the same process.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from fedprompt import backbones, client_update, prompt_model  # noqa: E402

PROMPT_LENGTH = 20


def machine_info() -> dict:
    """Load and competing processes: timings on a shared 2-core machine need both."""
    others = 0
    me = os.getpid()
    for proc in psutil.process_iter(["name", "pid"]):
        try:
            if proc.info["pid"] != me and "python" in (proc.info["name"] or ""):
                others += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    import keras_nlp

    return {
        "cpu_count": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "other_python_processes": others,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras_nlp": keras_nlp.__version__,
    }


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """`(first call s, [s of each of `repeats` later calls])` of `fn()`."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Median dense float32 matmul rate of this machine, GFLOP/s."""
    a = tf.random.stateless_normal([n, n], seed=[1, 2])
    b = tf.random.stateless_normal([n, n], seed=[3, 4])
    fn = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    fn(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(a, b).numpy()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def backbone_dims(backbone) -> dict:
    """The config numbers `step_flops` needs, for GPT-2 and Llama keras-nlp backbones."""
    hidden = int(backbone.hidden_dim)
    if isinstance(backbone, tf.keras.Model) and hasattr(backbone, "num_query_heads"):
        heads, kv_heads = int(backbone.num_query_heads), int(backbone.num_key_value_heads)
        gated = True
    else:
        heads = kv_heads = int(backbone.num_heads)
        gated = False
    return {
        "num_layers": int(backbone.num_layers),
        "hidden_dim": hidden,
        "intermediate_dim": int(backbone.intermediate_dim),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "vocabulary_size": int(backbone.vocabulary_size),
        "gated_mlp": gated,
    }


def step_flops(dims: dict, *, batch: int, positions: int, targets: int) -> dict:
    """Analytic FLOPs of one prompt-tuning step (forward + activation gradients).

    Args:
      dims: `backbone_dims` output.
      batch: batch size.
      positions: prompt + token positions per row (P + T).
      targets: target tokens in the batch (rows of the LM head).
    """
    h, f, L = dims["hidden_dim"], dims["intermediate_dim"], dims["num_layers"]
    kv = h * dims["num_kv_heads"] // dims["num_heads"]
    tokens = batch * positions
    weights_per_layer = h * h + 2 * h * kv + h * h + (3 if dims["gated_mlp"] else 2) * h * f
    linear = 2 * tokens * weights_per_layer * L
    attention = 2 * 2 * batch * positions * positions * h * L  # QK^T and AV
    head = 2 * targets * h * dims["vocabulary_size"]
    forward = linear + attention + head
    backward = linear + 2 * attention + head
    return {"forward": forward, "backward": backward, "total": forward + backward}


def synthetic_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    """Full rows (no padding); the second half of each row is the target."""
    rng = np.random.default_rng(seed)
    target = np.zeros([batch, seq], np.int32)
    target[:, seq // 2 :] = 1
    return {
        "token_ids": tf.constant(rng.integers(3, vocab, size=[batch, seq]), tf.int32),
        "padding_mask": tf.ones([batch, seq], tf.int32),
        "target_mask": tf.constant(target),
    }


def static_shape_loss(model):
    """`PromptTunedLM.static_shape_loss`: the loss without `tf.boolean_mask`, for XLA.

    XLA rejects the dynamic-shape boolean mask ("Fail to proof the equality of two
    dimensions at compile time"), so it applies the LM head at every token
    position and masks the per-token losses: more FLOPs (counted as such).
    """
    return model.static_shape_loss


def make_step(model, prompt_var, optimizer, mode: str):
    loss_fn = static_shape_loss(model) if mode == "xla" else model.loss

    def step(batch):
        loss, tokens, _ = client_update.client_train_step(
            loss_fn=loss_fn, prompt_variable=prompt_var, batch=batch, optimizer=optimizer
        )
        return loss

    if mode == "eager":
        return step
    if mode == "function":
        return tf.function(step, reduce_retracing=True)
    if mode == "xla":
        return tf.function(step, jit_compile=True)
    raise ValueError(f"unknown mode {mode!r}; use eager, function or xla")


def bench_config(model, *, name, batch, seq, mode, repeats, matmul_rate, warmup=1):
    vocab = model.vocabulary_size
    data = synthetic_batch(vocab, batch, seq)
    prompt = tf.Variable(tf.random.stateless_uniform([PROMPT_LENGTH, model.hidden_dim], [0, 1]))
    optimizer = tf.keras.optimizers.SGD(0.01)
    step = make_step(model, prompt, optimizer, mode)
    start = time.perf_counter()
    step(data).numpy()
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step(data).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(data).numpy()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    # The LM head runs on target positions, except under XLA (every position).
    targets = batch * seq if mode == "xla" else int(np.sum(data["target_mask"].numpy()))
    flops = step_flops(
        backbone_dims(model.backbone), batch=batch, positions=PROMPT_LENGTH + seq, targets=targets
    )
    achieved = flops["total"] / median / 1e9
    return {
        "benchmark": "train_step",
        "backbone": name,
        "mode": mode,
        "batch_size": batch,
        "sequence_length": seq,
        "prompt_length": PROMPT_LENGTH,
        "step_s_median": round(median, 5),
        "step_s_all": [round(t, 5) for t in times],
        "first_call_s": round(first_s, 3),
        "tokens_per_s": round(batch * seq / median, 1),
        "flops_per_step": flops["total"],
        "lm_head_rows": targets,
        "flops_method": "analytic (forward + activation gradients, matmuls only)",
        "achieved_gflops": round(achieved, 2),
        "matmul_gflops": round(matmul_rate, 2),
        "fraction_of_matmul_rate": round(achieved / matmul_rate, 3),
        "peak_rss_mib": peak_rss_mib(),
        "repeats": repeats,
        "machine": machine_info(),
    }


def load_model(name: str):
    resolved = backbones.resolve_backbone(name)
    return prompt_model.PromptTunedLM(resolved.load_keras_backbone())


def define_flags():
    """Only when run as a script: bench_round and bench_generate import this module."""
    flags.DEFINE_list("backbones", ["tiny", "smollm2-135m-instruct"], "Backbones.")
    flags.DEFINE_list("batch_sizes", ["4", "8"], "Batch sizes.")
    flags.DEFINE_list("sequence_lengths", ["64", "128"], "Sequence lengths.")
    flags.DEFINE_list("modes", ["eager", "function", "xla"], "Execution modes.")
    flags.DEFINE_integer("repeats", 5, "Timed repetitions after warm-up.")


def main(argv):
    del argv
    f = flags.FLAGS
    rate = matmul_gflops()
    for name in f.backbones:
        model = load_model(name)
        for batch in map(int, f.batch_sizes):
            for seq in map(int, f.sequence_lengths):
                for mode in f.modes:
                    result = bench_config(
                        model, name=name, batch=batch, seq=seq, mode=mode,
                        repeats=f.repeats, matmul_rate=rate,
                    )  # fmt: skip
                    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
