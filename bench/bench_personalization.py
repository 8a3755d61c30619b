"""Times the personalization computations (evaluation and fine-tuning) through TFF.

    python -m bench.bench_personalization
    python -m bench.bench_personalization --run_dir=runs/sweep-sni/fedavg_adam__natural \
        [--clients=0,1,2,3] [--num_prompts=3] [--repeats=1]

Without `--run_dir`: the default experiment's data and grid; prints the wall time
of the evaluation computation (1 prompt x 1 and 8 clients, 10 prompts x 1
client) and of the fine-tuning computation (4 epochs, 1 and 8 clients); the
first call of each includes TFF tracing and graph set-up.

With `--run_dir`: the run's own `config.json` (backbone, data, partition,
sequence length, grid, local workers settings) and its `final_prompt.npy`, so
the figures are those of that run's personalization step. For each of
`--clients` (indices into the run's validation + test clients) it times
evaluating `--num_prompts` prompts and one fine-tuning computation (the grid's
first learning rate, every scheduled epoch), after a first call that pays the
tracing. Ends with one JSON line.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402,F401
from absl import app, flags  # noqa: E402

from bench import bench_train_step as common  # noqa: E402
from fedprompt import (  # noqa: E402
    backbones,
    execution,
    frozen_backbone,
    personalization,
    program,
    prompt_model,
)

_RUN_DIR = flags.DEFINE_string(
    "run_dir", None, "A run directory (config.json, final_prompt.npy) to time; default: none."
)
_CLIENTS = flags.DEFINE_list(
    "clients", None, "With --run_dir: indices of the evaluation clients to time (default all)."
)
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 3, "With --run_dir: prompts per evaluation.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "With --run_dir: timed calls per client.")


def load_run_config(run_dir: pathlib.Path, output_dir: str) -> program.ExperimentConfig:
    """The run's `ExperimentConfig`, writing to `output_dir` instead of the run."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise app.UsageError(f"--run_dir={run_dir}: no config.json; pass a run directory.")
    recorded = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(program.ExperimentConfig)}
    values = {k: v for k, v in recorded.items() if k in fields}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    data = pathlib.Path(values["data"]) if values.get("data") else None
    if data is not None and not data.is_absolute() and not data.exists():
        # Relative to where the run was launched (a checkout beside ../shared).
        values["data"] = str(run_dir.resolve().parents[2] / data)
    values["output_dir"] = output_dir
    return program.ExperimentConfig(**values)


def _setup(config):
    resolved = backbones.resolve_backbone(config.backbone)
    keras_backbone = resolved.load_keras_backbone()
    prompt = program._initial_prompt(config, keras_backbone, resolved.tokenizer)
    frozen = frozen_backbone.save_frozen_backbone(keras_backbone, config.output_dir + "/frozen")
    data = program.build_data(config, resolved)

    def model_fn():
        return prompt_model.PromptTunedLM(frozen_backbone.restore_backbone(frozen))

    def build():
        return personalization.build_personalization_evaluation(
            model_fn=model_fn,
            prompt_shape=prompt.shape,
            sequence_length=config.sequence_length,
            generation_width=config.sequence_length,
            grid=config.personalization_grid(),
            max_new_tokens=config.max_new_tokens,
            stop_token_ids=resolved.stop_token_ids,
            pad_token_id=resolved.tokenizer.pad_token_id,
            generation_batch_size=config.batch_size,
        )

    return prompt, data, build


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_default():
    config = program.ExperimentConfig(output_dir=tempfile.mkdtemp())
    prompt, data, build = _setup(config)
    with execution.local_context():
        process = build()
        inputs = [
            personalization.client_data(c, data.global_batches, data.global_generation)
            for c in data.evaluation_clients
        ]

        def timed(label, fn):
            print(f"{label}: {_timed(fn):.2f} s", flush=True)

        timed(
            "evaluate 1 prompt x 1 client (first call)",
            lambda: process.evaluate([prompt[None]], inputs[:1]),
        )
        timed("evaluate 1 prompt x 1 client", lambda: process.evaluate([prompt[None]], inputs[:1]))
        timed(
            "evaluate 1 prompt x 8 clients",
            lambda: process.evaluate([prompt[None]] * 8, inputs[:8]),
        )
        timed(
            "evaluate 10 prompts x 1 client",
            lambda: process.evaluate([np.stack([prompt] * 10)], inputs[:1]),
        )
        fine_tune = next(iter(process.fine_tune.values()))
        args = (prompt, np.float32(0.1), np.float32(0.0))
        timed("fine-tune 4 epochs x 1 client (first call)", lambda: fine_tune(*args, inputs[:1]))
        timed("fine-tune 4 epochs x 1 client", lambda: fine_tune(*args, inputs[:1]))
        timed("fine-tune 4 epochs x 8 clients", lambda: fine_tune(*args, inputs[:8]))


def bench_run(run_dir: pathlib.Path):
    config = load_run_config(run_dir, tempfile.mkdtemp())
    prompt, data, build = _setup(config)
    final = run_dir / "final_prompt.npy"
    if final.is_file():
        prompt = np.load(final).astype(np.float32)
    clients = data.evaluation_clients
    indices = [int(i) for i in _CLIENTS.value] if _CLIENTS.value else range(len(clients))
    grid = config.personalization_grid()
    result = {
        "bench": "personalization",
        "run_dir": str(run_dir),
        "backbone": config.backbone,
        "sequence_length": config.sequence_length,
        "num_prompts": _NUM_PROMPTS.value,
        "fine_tune_epochs": list(grid.epochs[1:]),
        "clients": {},
    }
    with execution.local_context():  # one client per call: no concurrency bound needed
        start = time.perf_counter()
        process = build()
        result["build_s"] = time.perf_counter() - start
        inputs = [
            personalization.client_data(c, data.global_batches, data.global_generation)
            for c in clients
        ]
        prompts = np.stack([prompt] * _NUM_PROMPTS.value)
        fine_tune = process.fine_tune[grid.optimizers[0]]
        args = (prompt, np.float32(grid.learning_rates[0]), np.float32(0.0))
        result["first_evaluate_s"] = _timed(lambda: process.evaluate([prompts], inputs[:1]))
        result["first_fine_tune_s"] = _timed(lambda: fine_tune(*args, inputs[:1]))
        for i in indices:
            one = [inputs[i]]
            evaluate, tune = [], []
            for _ in range(_REPEATS.value):
                evaluate.append(_timed(lambda: process.evaluate([prompts], one)))  # noqa: B023
                tune.append(_timed(lambda: fine_tune(*args, one)))  # noqa: B023
            result["clients"][clients[i].client_id] = {
                "local_input_lengths": clients[i].local_generation.input_lengths.tolist(),
                "evaluate_s_per_prompt": statistics.median(evaluate) / _NUM_PROMPTS.value,
                "fine_tune_s": statistics.median(tune),
            }
            print(clients[i].client_id, result["clients"][clients[i].client_id], flush=True)
    result["global_input_lengths"] = data.global_generation.input_lengths.tolist()
    result["peak_rss_mib"] = common.peak_rss_mib()
    result["versions"] = program._versions()
    print(json.dumps(result), flush=True)


def main(argv):
    del argv
    if _RUN_DIR.value:
        bench_run(pathlib.Path(_RUN_DIR.value))
    else:
        for name in ("clients", "num_prompts", "repeats"):
            if flags.FLAGS[name].present:
                raise app.UsageError(f"--{name} needs --run_dir.")
        bench_default()


if __name__ == "__main__":
    app.run(main)
