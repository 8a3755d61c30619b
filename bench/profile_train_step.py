"""Where a prompt-tuning train step spends its time: TF profiler op times, summed.

    python -m bench.profile_train_step [--backbone=smollm2-135m-instruct]
        [--batch_size=4] [--sequence_length=64] [--steps=3] [--logdir=DIR]

Traces `--steps` tf.function steps (after two warm-up calls) with
`tf.profiler.experimental`, reads the host plane of the XSpace it writes, and
prints one JSON line: op time by op type and by part of the model (MLP,
attention, LM head, norms; forward or gradient), summed over threads and steps,
in ms and as shares. Op time is not wall time (threads overlap); use
`bench.bench_train_step` for step times.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import collections  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from tensorflow.core.profiler.protobuf import xplane_pb2  # noqa: E402

from bench import bench_train_step as common  # noqa: E402


def define_flags():
    """Only when run as a script: importing this module (tests) defines no flags,
    so it cannot clash with run_experiment's `--batch_size` in one process."""
    flags.DEFINE_string("backbone", "smollm2-135m-instruct", "Backbone name.")
    flags.DEFINE_integer("batch_size", 4, "Batch size.")
    flags.DEFINE_integer("sequence_length", 64, "Sequence length.")
    flags.DEFINE_integer("steps", 3, "Profiled steps.")
    flags.DEFINE_string("logdir", None, "Profiler log directory (temporary if unset).")


def model_part(op_name: str) -> str:
    """Which part of the model a TF op belongs to, from its name scope."""
    side = "gradient" if op_name.startswith("gradient_tape") else "forward"
    if "token_embedding" in op_name:
        part = "lm_head_or_embedding"
    elif "attention" in op_name:
        part = "attention"
    elif "feedforward" in op_name and "norm" not in op_name:
        part = "mlp"
    elif "norm" in op_name:
        part = "norm"
    else:
        part = "other"
    return f"{side} {part}"


def op_times(xplane_path: str) -> tuple[collections.Counter, collections.Counter]:
    """(ps by op type, ps by model part) over the host plane's TF op events."""
    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    by_type, by_part = collections.Counter(), collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or "/" not in name:  # TF ops are "scope/name:Type".
                    continue
                op_name, op_type = name.rsplit(":", 1)
                by_type[op_type] += event.duration_ps
                by_part[model_part(op_name)] += event.duration_ps
    return by_type, by_part


def main(argv):
    del argv
    f = flags.FLAGS
    model = common.load_model(f.backbone)
    data = common.synthetic_batch(model.vocabulary_size, f.batch_size, f.sequence_length)
    prompt = tf.Variable(
        tf.random.stateless_uniform([common.PROMPT_LENGTH, model.hidden_dim], [0, 1])
    )
    step = common.make_step(model, prompt, tf.keras.optimizers.SGD(0.01), "function")
    step(data).numpy()
    step(data).numpy()
    logdir = f.logdir or tempfile.mkdtemp(prefix="fedprompt-profile-")
    tf.profiler.experimental.start(logdir)
    for _ in range(f.steps):
        step(data).numpy()
    tf.profiler.experimental.stop()
    path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))[-1]
    by_type, by_part = op_times(path)
    total = sum(by_type.values())

    def table(counter, top):
        return {k: [round(v / 1e9, 1), round(v / total, 3)] for k, v in counter.most_common(top)}

    print(json.dumps({
        "benchmark": "train_step_profile",
        "backbone": f.backbone,
        "batch_size": f.batch_size,
        "sequence_length": f.sequence_length,
        "steps": f.steps,
        "op_time_ms_total": round(total / 1e9, 1),
        "by_op_type_ms_share": table(by_type, 12),
        "by_part_ms_share": table(by_part, 12),
        "xplane": path,
        "machine": common.machine_info(),
    }))  # fmt: skip


if __name__ == "__main__":
    define_flags()
    app.run(main)
