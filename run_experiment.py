r"""Runs one fedprompt experiment: federated prompt tuning, then personalization.

With no flags it runs the embedded default offline (the `tiny` backbone, built and
cached on first use, on the synthetic instruction suite) and prints where
`report.md` is:

  python run_experiment.py
  python run_experiment.py --backbone=smollm2-135m-instruct --data=../shared/data/sni-mini \
      --partition=dirichlet --alpha=0.1 --algorithm=fedavg --client_optimizer=adam \
      --client_learning_rate=0.01 --rounds=30 --output_dir=/tmp/fedprompt/smollm2

Flags are read only here; they become one `fedprompt.program.ExperimentConfig`
and all of them are recorded in `<output_dir>/config.json`. Flags for options the
run does not use (e.g. `--alpha` without `--partition=dirichlet`,
`--client_optimizer` with `--algorithm=fedsgd`) are rejected.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# TF and keras-nlp are imported at module top, not in main() (DESIGN.md trap 3).
import logging  # noqa: E402
import warnings  # noqa: E402

import tensorflow as tf  # noqa: E402,F401
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from fedprompt import execution, program  # noqa: E402

_BACKBONE = flags.DEFINE_string(
    "backbone", "tiny", "tiny | smollm2-135m-instruct | keras-nlp preset name | preset directory."
)
_DATA = flags.DEFINE_string("data", "synthetic", "synthetic | path to an SNI directory.")
_SYNTHETIC_INSTANCES = flags.DEFINE_integer(
    "synthetic_instances_per_task", 60, "Instances per synthetic task (--data=synthetic)."
)
_MAX_INSTANCES = flags.DEFINE_integer(
    "max_instances_per_task", None, "Keep the first N instances of each SNI task."
)
_PARTITION = flags.DEFINE_enum(
    "partition", "natural", list(program.PARTITIONS), "How examples are dealt to clients."
)
_ALPHA = flags.DEFINE_float("alpha", None, "Dirichlet concentration (> 0; inf = IID).")
_HOME_FRACTION = flags.DEFINE_float("home_fraction", None, "Home-category share in [0, 1].")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 16, "Training clients.")
_NUM_VALIDATION = flags.DEFINE_integer(
    "num_validation_clients", 2, "Validation clients (choose personalization settings)."
)
_NUM_TEST = flags.DEFINE_integer("num_test_clients", 6, "Test clients (reported).")
_EXAMPLES_PER_CLIENT = flags.DEFINE_integer(
    "examples_per_client", None, "Fixed client size (default: as many as the data allows)."
)
_GLOBAL_TEST = flags.DEFINE_integer(
    "global_test_per_category", 6, "Held-out global test examples per category."
)
_CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", 4, "Clients sampled per round.")
_ALGORITHM = flags.DEFINE_enum(
    "algorithm", "fedavg", list(program.ALGORITHMS), "How the global prompt is trained."
)
_CLIENT_OPTIMIZER = flags.DEFINE_string("client_optimizer", "sgd", "sgd | sgdm | adam | adagrad.")
_CLIENT_LR = flags.DEFINE_float("client_learning_rate", 0.3, "Client learning rate.")
_CLIENT_MOMENTUM = flags.DEFINE_float("client_momentum", None, "sgdm momentum (default 0.9).")
_SERVER_OPTIMIZER = flags.DEFINE_string("server_optimizer", "sgd", "sgd | sgdm | adam.")
_SERVER_LR = flags.DEFINE_float(
    "server_learning_rate", 1.0, "Server learning rate (sgd 1.0 = plain FedAvg)."
)
_SERVER_MOMENTUM = flags.DEFINE_float("server_momentum", None, "Server sgdm momentum.")
_CLIENT_WEIGHTING = flags.DEFINE_string(
    "client_weighting", "num_examples", "num_examples | num_tokens | uniform."
)
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Training rounds.")
_LOCAL_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "Local epochs per round.")
_LOCAL_STEPS = flags.DEFINE_integer("local_steps", None, "Cap on local steps per round.")
_CLIP_NORM = flags.DEFINE_float("clip_norm", None, "Per-step gradient L2-norm bound.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_SEQUENCE_LENGTH = flags.DEFINE_integer("sequence_length", 64, "Tokens per training example.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 12, "Decoding budget for ROUGE-L.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 8, "Soft-prompt positions.")
_PROMPT_INIT = flags.DEFINE_string(
    "prompt_init", "vocab_sample", "random_uniform | vocab_sample | text."
)
_PROMPT_INIT_TEXT = flags.DEFINE_string("prompt_init_text", None, "Init text (--prompt_init=text).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 5, "Evaluate the global prompt every k rounds.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 5, "Save the program state every k rounds."
)
_RUNTIME = flags.DEFINE_enum(
    "runtime",
    "tff",
    list(program.RUNTIMES),
    "Where training rounds run: tff, or xla (the same client/server functions XLA-compiled "
    "under tf.distribute, one client per replica; personalization stays on TFF).",
)
_TPU = flags.DEFINE_string(
    "tpu", None, "Cloud TPU name, grpc://host:port or 'local' (TPU VM); needs --runtime=xla."
)
_P_OPTIMIZER = flags.DEFINE_string(
    "personalization_optimizer", "sgd", "Optimizer of personalization fine-tuning."
)
_P_LRS = flags.DEFINE_list(
    "personalization_learning_rates", ["0.31622776601683794", "0.1"], "Fine-tuning lrs."
)
_P_EPOCHS = flags.DEFINE_list(
    "personalization_epochs", ["0", "1", "2", "4"], "Epoch counts evaluated."
)
_L2 = flags.DEFINE_list("l2_strengths", ["0.1"], "Lambdas of L2-to-global fine-tuning.")
_ALPHAS = flags.DEFINE_list("interpolation_alphas", ["0.5"], "Interpolation alphas in [0, 1].")
_MAX_LOCAL_TEST = flags.DEFINE_integer(
    "max_local_test_examples", 8, "Cap on each client's local test examples."
)
_MAX_GLOBAL_TEST = flags.DEFINE_integer(
    "max_global_test_examples", 16, "Fixed subsample of the global test set."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds data, partition, prompt init and sampling.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "results/default", "Results directory (rerun to resume)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Delete --output_dir first and start over (default: resume a compatible run there).",
)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Backbone cache (default $FEDPROMPT_CACHE or ~/.cache/fedprompt)."
)
_TFF_WORKERS = flags.DEFINE_list(
    "tff_workers",
    [],
    "host:port,... of TFF workers (python -m fedprompt.worker) that run every round's clients "
    "and the personalization sweep; the output dir must be readable at the same path on each "
    "(docs/SCALING.md).",
)
_LOCAL_WORKERS = flags.DEFINE_integer(
    "local_workers",
    0,
    "Start N TFF workers on 127.0.0.1 and run over them (not with --tff_workers).",
)
_GRPC_MAX_MESSAGE_MB = flags.DEFINE_integer(
    "grpc_max_message_mb",
    execution.DEFAULT_GRPC_MAX_MESSAGE_MB,
    f"Largest gRPC message to and from TFF workers, MB (1-{execution.MAX_GRPC_MESSAGE_MB}).",
)
_MAX_CONCURRENT_CLIENTS = flags.DEFINE_integer(
    "max_concurrent_clients",
    None,
    "Client computations TFF runs at once (default: all). Each holds a restored backbone and "
    "its activations (SmolLM2 personalization at --sequence_length=320: about 14 GiB for 4 "
    "clients at once), so this bounds memory. Results do not depend on it.",
)
_WORKER_TIMEOUT = flags.DEFINE_float(
    "worker_timeout",
    execution.DEFAULT_WORKER_TIMEOUT_S,
    "Seconds to wait for TFF workers to answer at start.",
)

# Flags that only some algorithms use: setting them for another is a mistake.
_USED_BY = {
    "client_optimizer": ("fedavg", "centralized"),
    "client_learning_rate": ("fedavg", "centralized"),
    "client_momentum": ("fedavg", "centralized"),
    "client_weighting": ("fedavg",),
    "local_epochs": ("fedavg", "centralized"),
    "local_steps": ("fedavg", "centralized"),
    "clip_norm": ("fedavg", "centralized"),
    "clients_per_round": ("fedavg", "fedsgd"),
    "server_optimizer": ("fedavg", "fedsgd", "centralized"),
    "server_learning_rate": ("fedavg", "fedsgd", "centralized"),
    "server_momentum": ("fedavg", "fedsgd", "centralized"),
    "rounds": ("fedavg", "fedsgd", "centralized"),
    "eval_every": ("fedavg", "fedsgd", "centralized"),
    "checkpoint_every": ("fedavg", "fedsgd", "centralized"),
    "runtime": ("fedavg", "fedsgd", "centralized"),
}


class FlagError(ValueError):
    pass


def _is_set(name: str) -> bool:
    flag = flags.FLAGS[name]
    return bool(flag.present) or flag.value != flag.default


def _numbers(flag, cast):
    try:
        return tuple(cast(v) for v in flag.value if v.strip())
    except ValueError:
        raise FlagError(
            f"--{flag.name}: expected comma-separated numbers, got {','.join(flag.value)!r}."
        ) from None


def config_from_flags() -> program.ExperimentConfig:
    """Builds the config from the parsed flags; rejects flags the run does not use."""
    algorithm = _ALGORITHM.value
    for name, users in _USED_BY.items():
        if _is_set(name) and algorithm not in users:
            raise FlagError(
                f"--{name} is not used by --algorithm={algorithm} (only by {', '.join(users)}); "
                "remove it."
            )
    if _is_set("synthetic_instances_per_task") and _DATA.value != "synthetic":
        raise FlagError("--synthetic_instances_per_task is only used with --data=synthetic.")
    server_lr = _SERVER_LR.value
    if algorithm == "fedsgd" and not _is_set("server_learning_rate"):
        # FedSGD's server step is the only step; 1.0 on a token-mean gradient is far
        # too small for soft prompts, so no default is assumed.
        raise FlagError("--algorithm=fedsgd needs --server_learning_rate (e.g. 3.0).")
    return program.ExperimentConfig(
        output_dir=_OUTPUT_DIR.value,
        backbone=_BACKBONE.value,
        data=_DATA.value,
        synthetic_instances_per_task=_SYNTHETIC_INSTANCES.value,
        max_instances_per_task=_MAX_INSTANCES.value,
        partition=_PARTITION.value,
        alpha=_ALPHA.value,
        home_fraction=_HOME_FRACTION.value,
        num_clients=_NUM_CLIENTS.value,
        num_validation_clients=_NUM_VALIDATION.value,
        num_test_clients=_NUM_TEST.value,
        examples_per_client=_EXAMPLES_PER_CLIENT.value,
        global_test_per_category=_GLOBAL_TEST.value,
        clients_per_round=_CLIENTS_PER_ROUND.value if algorithm != "centralized" else 1,
        algorithm=algorithm,
        client_optimizer=_CLIENT_OPTIMIZER.value,
        client_learning_rate=_CLIENT_LR.value,
        client_momentum=_CLIENT_MOMENTUM.value,
        server_optimizer=_SERVER_OPTIMIZER.value,
        server_learning_rate=server_lr,
        server_momentum=_SERVER_MOMENTUM.value,
        client_weighting=_CLIENT_WEIGHTING.value,
        rounds=_ROUNDS.value,
        local_epochs=_LOCAL_EPOCHS.value,
        local_steps=_LOCAL_STEPS.value,
        clip_norm=_CLIP_NORM.value,
        batch_size=_BATCH_SIZE.value,
        sequence_length=_SEQUENCE_LENGTH.value,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        prompt_length=_PROMPT_LENGTH.value,
        prompt_init=_PROMPT_INIT.value,
        prompt_init_text=_PROMPT_INIT_TEXT.value,
        eval_every=_EVAL_EVERY.value,
        checkpoint_every=_CHECKPOINT_EVERY.value,
        runtime=_RUNTIME.value,
        tpu=_TPU.value,
        personalization_optimizer=_P_OPTIMIZER.value,
        personalization_learning_rates=_numbers(_P_LRS, float),
        personalization_epochs=_numbers(_P_EPOCHS, int),
        l2_strengths=_numbers(_L2, float),
        interpolation_alphas=_numbers(_ALPHAS, float),
        max_local_test_examples=_MAX_LOCAL_TEST.value,
        max_global_test_examples=_MAX_GLOBAL_TEST.value,
        seed=_SEED.value,
        cache_dir=_CACHE_DIR.value,
        tff_workers=tuple(_TFF_WORKERS.value),
        local_workers=_LOCAL_WORKERS.value,
        grpc_max_message_mb=_GRPC_MAX_MESSAGE_MB.value,
        worker_timeout=_WORKER_TIMEOUT.value,
        max_concurrent_clients=_MAX_CONCURRENT_CLIENTS.value,
    )


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore")
    tf.get_logger().setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _quiet(flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity > 0)
    try:
        config = config_from_flags()
        config.validate()
        flag_values = {
            f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__])
        }
        report = program.run_experiment(
            config,
            flags=flag_values,
            progress=lambda line: print(line, flush=True),
            overwrite=_OVERWRITE.value,
        )
    except (FlagError, program.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


def _main_then_release_tff(argv):
    # SIGTERM skips atexit; this makes it stop worker processes and unwind instead.
    execution.install_sigterm_handler()
    try:
        return main(argv)
    finally:
        # TFF installs a default context at import; drop it (and any worker
        # process) while the interpreter is still whole (DESIGN.md trap 1).
        execution.reset_context()
        status = execution.exit_status_after_sigterm()
        if status is not None:
            # Whatever the signal's SystemExit turned into on the way out.
            print(f"stopped by SIGTERM (exit status {status})", file=sys.stderr)
            raise SystemExit(status)


if __name__ == "__main__":
    app.run(_main_then_release_tff)
