"""The experiment program: backbone -> data -> clients -> training -> personalization.

`run_experiment(config)` is the one library call behind `run_experiment.py`:

1. resolve the backbone (build `tiny` / convert SmolLM2 / read a preset dir), save
   its frozen checkpoint and build the initial prompt, all eagerly and before any
   TFF tracing (DESIGN.md trap 2);
2. load the data (the synthetic suite or an SNI directory) and partition it into
   train / validation / test clients and a global test set (`partition.json`);
3. train the prompt with TFF (or, with `runtime="xla"`, the same client and server
   functions XLA-compiled under `tf.distribute`, on CPU or a Cloud TPU: see
   `fedprompt.xla_runtime`; evaluation and personalization stay on TFF):
   `fedavg`, `fedsgd`, `centralized` (FedAvg with one client holding the pooled
   data of all train clients, so the same optimizer, step budget and evaluation
   apply; the client optimizer restarts every round),
   or `local` (no training: personalization starts from the initial prompt).
   Clients per round are sampled with a generator seeded by (seed, round), the
   global prompt is evaluated on the validation clients every `eval_every` rounds,
   and the program state is saved every `checkpoint_every` rounds; a rerun with
   the same output directory resumes from the latest saved round;
4. personalize the final prompt on every validation and test client over the grid
   (`fedprompt.personalization`) and score local and global ROUGE-L;
5. write `rounds.csv`, TensorBoard logs, `personalization.csv`, `config.json`,
   plots and `report.md`.

TFF runs inside `fedprompt.execution.local_context()`, which owns the execution
context and stops TFF's worker processes at the end; with `tff_workers` (or
`local_workers`) every round's clients and the personalization sweep run over
remote TFF workers instead (`execution.remote_context`, docs/SCALING.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import gc
import json
import logging
import math
import os
import pathlib
import platform
import shutil
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedprompt import backbones, data_types, execution, frozen_backbone, personalization
from fedprompt import prompt_model as prompt_model_lib
from fedprompt.fed_avg import ClientWeighting, build_fed_avg
from fedprompt.fed_sgd import build_fed_sgd
from optimizers import ClientOptimizer, ServerOptimizer

ALGORITHMS = ("fedavg", "fedsgd", "centralized", "local")
PARTITIONS = ("natural", "dirichlet", "home_fraction")
SYNTHETIC = "synthetic"
# Where training rounds run: TFF computations, or the same pure-TF client and server
# functions XLA-compiled under tf.distribute (fedprompt.xla_runtime; CPU or Cloud TPU).
RUNTIMES = ("tff", "xla")

ROUND_COLUMNS = (
    "round",
    "elapsed_s",
    "train_loss",
    "grad_norm_mean",
    "grad_norm_min",
    "grad_norm_max",
    "update_norm_mean",
    "update_norm_min",
    "update_norm_max",
    "server_update_norm",
    "num_clients",
    "num_nonfinite_clients",
    "val_local_rougeL",
    "val_global_rougeL",
    "val_local_loss",
    "val_global_loss",
)
PERSONALIZATION_COLUMNS = ("start",) + personalization.RECORD_COLUMNS
# Where the computations run, not what they compute: a run may resume on other
# workers (e.g. after one died), so these never make a results directory "different".
EXECUTION_SETTINGS = (
    "tff_workers",
    "local_workers",
    "grpc_max_message_mb",
    "worker_timeout",
    "max_concurrent_clients",
)

logger = logging.getLogger("fedprompt")


class ConfigError(ValueError):
    """An experiment setting that cannot work; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one experiment (recorded in `config.json`).

    Defaults are the embedded default experiment: the `tiny` backbone on the
    synthetic suite, natural (one category per client) partition, FedAvg with SGD
    clients, sized to run in a few minutes on a 2-core laptop.
    """

    output_dir: str
    backbone: str = backbones.TINY
    data: str = SYNTHETIC
    synthetic_instances_per_task: int = 60
    max_instances_per_task: Optional[int] = None
    partition: str = "natural"
    alpha: Optional[float] = None
    home_fraction: Optional[float] = None
    num_clients: int = 16
    num_validation_clients: int = 2
    num_test_clients: int = 6
    examples_per_client: Optional[int] = None
    global_test_per_category: int = 6
    clients_per_round: int = 4
    algorithm: str = "fedavg"
    client_optimizer: str = "sgd"
    client_learning_rate: float = 0.3
    client_momentum: Optional[float] = None
    server_optimizer: str = "sgd"
    server_learning_rate: float = 1.0
    server_momentum: Optional[float] = None
    client_weighting: str = "num_examples"
    rounds: int = 20
    local_epochs: Optional[int] = 1
    local_steps: Optional[int] = None
    clip_norm: Optional[float] = None
    batch_size: int = 8
    sequence_length: int = 64
    max_new_tokens: int = 12
    prompt_length: int = 8
    prompt_init: str = "vocab_sample"
    prompt_init_text: Optional[str] = None
    eval_every: int = 5
    checkpoint_every: int = 5
    runtime: str = "tff"
    tpu: Optional[str] = None
    personalization_optimizer: str = "sgd"
    personalization_learning_rates: tuple = (10**-0.5, 10**-1.0)
    personalization_epochs: tuple = (0, 1, 2, 4)
    l2_strengths: tuple = (0.1,)
    interpolation_alphas: tuple = (0.5,)
    max_local_test_examples: Optional[int] = 8
    max_global_test_examples: Optional[int] = 16
    seed: int = 0
    cache_dir: Optional[str] = None
    tff_workers: tuple = ()
    local_workers: int = 0
    grpc_max_message_mb: int = execution.DEFAULT_GRPC_MAX_MESSAGE_MB
    worker_timeout: float = execution.DEFAULT_WORKER_TIMEOUT_S
    # Client computations a TFF executor runs at once (None = all). Each running
    # client holds its own restored backbone and activations, so this bounds memory.
    max_concurrent_clients: Optional[int] = None

    def validate(self) -> None:
        """Raises `ConfigError` (one line naming the setting and the fix)."""

        def fail(name, message):
            raise ConfigError(f"--{name}: {message}")

        choice = lambda name, value, options: (  # noqa: E731
            None
            if value in options
            else fail(name, f"must be one of {list(options)}, got {value!r}.")
        )
        choice("algorithm", self.algorithm, ALGORITHMS)
        choice("partition", self.partition, PARTITIONS)
        choice("client_optimizer", self.client_optimizer, [o.value for o in ClientOptimizer])
        choice(
            "personalization_optimizer",
            self.personalization_optimizer,
            [o.value for o in ClientOptimizer],
        )
        choice("server_optimizer", self.server_optimizer, [o.value for o in ServerOptimizer])
        choice("client_weighting", self.client_weighting, [w.value for w in ClientWeighting])
        choice("prompt_init", self.prompt_init, [p.value for p in prompt_model_lib.PromptInit])
        for name in (
            "num_clients",
            "clients_per_round",
            "rounds",
            "batch_size",
            "sequence_length",
            "max_new_tokens",
            "prompt_length",
            "eval_every",
            "checkpoint_every",
            "synthetic_instances_per_task",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, f"must be an integer >= 1, got {value!r}.")
        for name in ("num_validation_clients", "num_test_clients", "global_test_per_category"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, f"must be an integer >= 0, got {value!r}.")
        for name in (
            "local_epochs",
            "local_steps",
            "max_instances_per_task",
            "examples_per_client",
            "max_local_test_examples",
            "max_global_test_examples",
        ):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                fail(name, f"must be an integer >= 1 or unset, got {value!r}.")
        if self.local_epochs is None and self.local_steps is None:
            fail("local_epochs", "set --local_epochs or --local_steps (both unset never stops).")
        for name in ("client_learning_rate", "server_learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(name, f"must be a finite number > 0, got {value!r}.")
        if self.clip_norm is not None and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            fail("clip_norm", f"must be > 0 or unset, got {self.clip_norm!r}.")
        if self.clients_per_round > self.num_clients:
            fail(
                "clients_per_round",
                f"{self.clients_per_round} exceeds --num_clients={self.num_clients}; "
                "lower it or add clients.",
            )
        if self.partition == "dirichlet":
            if self.alpha is None or not self.alpha > 0:
                fail(
                    "alpha",
                    f"--partition=dirichlet needs --alpha > 0 (inf = IID), got {self.alpha!r}.",
                )
        elif self.alpha is not None:
            fail(
                "alpha",
                f"is only used with --partition=dirichlet, not {self.partition!r}; unset it.",
            )
        if self.partition == "home_fraction":
            if self.home_fraction is None or not 0 <= self.home_fraction <= 1:
                fail(
                    "home_fraction",
                    f"--partition=home_fraction needs --home_fraction in [0, 1], got {self.home_fraction!r}.",
                )
        elif self.home_fraction is not None:
            fail(
                "home_fraction",
                f"is only used with --partition=home_fraction, not {self.partition!r}; unset it.",
            )
        if self.client_momentum is not None and self.client_optimizer != "sgdm":
            fail("client_momentum", "is only used with --client_optimizer=sgdm; unset it.")
        if self.server_momentum is not None and self.server_optimizer != "sgdm":
            fail("server_momentum", "is only used with --server_optimizer=sgdm; unset it.")
        if self.prompt_init_text is not None and self.prompt_init != "text":
            fail("prompt_init_text", "is only used with --prompt_init=text; unset it.")
        if self.prompt_init == "text" and not self.prompt_init_text:
            fail("prompt_init_text", "--prompt_init=text needs a non-empty --prompt_init_text.")
        if self.algorithm == "fedsgd":
            for name in ("client_momentum", "clip_norm", "local_steps"):
                if getattr(self, name) is not None:
                    fail(
                        name,
                        "is not used by --algorithm=fedsgd (one full-batch gradient); unset it.",
                    )
        choice("runtime", self.runtime, RUNTIMES)
        if self.runtime == "xla" and self.algorithm == "local":
            fail(
                "runtime", "--algorithm=local trains nothing, so --runtime=xla is unused; unset it."
            )
        if self.tpu is not None:
            if self.runtime != "xla":
                fail("tpu", "is only used with --runtime=xla; add --runtime=xla or unset it.")
            if not isinstance(self.tpu, str) or not self.tpu.strip():
                fail(
                    "tpu",
                    "must be a Cloud TPU name, a grpc://host:port address or 'local' (TPU VM), "
                    f"got {self.tpu!r}.",
                )
        if self.data != SYNTHETIC and not os.path.isdir(os.path.expanduser(self.data)):
            fail(
                "data",
                f"{self.data!r} is not a directory; use 'synthetic' or the path of an SNI "
                "directory (a natural-instructions clone or a folder of task JSON files).",
            )
        if self.data == SYNTHETIC and self.max_instances_per_task is not None:
            fail(
                "max_instances_per_task",
                "is for SNI data; with synthetic data use --synthetic_instances_per_task.",
            )
        if self.num_validation_clients + self.num_test_clients == 0:
            fail(
                "num_test_clients", "personalization needs at least one validation or test client."
            )
        try:
            self.personalization_grid()
        except ValueError as e:
            raise ConfigError(f"--{str(e).strip('`').split('`')[0]}: {e}") from e
        self._validate_execution(fail)

    def _validate_execution(self, fail) -> None:
        if self.tff_workers:
            try:
                execution.parse_worker_addresses(self.tff_workers)
            except ValueError as e:
                fail("tff_workers", f"{e}; pass --tff_workers=host:port,host:port,...")
        workers = self.local_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            fail("local_workers", f"must be an integer >= 0 (0 = none), got {workers!r}.")
        if self.tff_workers and workers:
            fail(
                "local_workers",
                "cannot be combined with --tff_workers (workers are either started here or "
                "elsewhere); drop one of them.",
            )
        remote = bool(self.tff_workers or workers)
        concurrent = self.max_concurrent_clients
        if concurrent is not None:
            if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
                fail(
                    "max_concurrent_clients",
                    f"must be an integer >= 1 (unset = all clients at once), got {concurrent!r}.",
                )
            if self.tff_workers:
                fail(
                    "max_concurrent_clients",
                    "cannot reach workers started elsewhere; start each with `python -m "
                    "fedprompt.worker --max_concurrent_computation_calls=N` and unset it.",
                )
        size = self.grpc_max_message_mb
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or not 0 < size <= execution.MAX_GRPC_MESSAGE_MB
        ):
            fail(
                "grpc_max_message_mb",
                f"must be an integer in 1-{execution.MAX_GRPC_MESSAGE_MB}, got {size!r}.",
            )
        timeout = self.worker_timeout
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            fail("worker_timeout", f"must be a finite number of seconds > 0, got {timeout!r}.")
        for name, default in (
            ("grpc_max_message_mb", execution.DEFAULT_GRPC_MAX_MESSAGE_MB),
            ("worker_timeout", execution.DEFAULT_WORKER_TIMEOUT_S),
        ):
            if not remote and getattr(self, name) != default:
                fail(name, "is only used with --tff_workers or --local_workers; unset it.")

    def personalization_grid(self) -> personalization.PersonalizationGrid:
        return personalization.PersonalizationGrid(
            optimizers=(ClientOptimizer(self.personalization_optimizer),),
            learning_rates=tuple(float(v) for v in self.personalization_learning_rates),
            epochs=tuple(int(v) for v in self.personalization_epochs),
            l2_strengths=tuple(float(v) for v in self.l2_strengths),
            interpolation_alphas=tuple(float(v) for v in self.interpolation_alphas),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
        }


# ----------------------------------------------------------------------------- execution


class WorkerFailureError(ConfigError):
    """A TFF computation failed on remote workers; the message names them and the step."""


@contextlib.contextmanager
def execution_context(config: ExperimentConfig) -> Iterator[tuple[str, ...]]:
    """Local TFF, remote workers or local workers per `config`; yields worker addresses."""
    options = dict(max_message_mb=config.grpc_max_message_mb, timeout=config.worker_timeout)
    concurrent = -1 if config.max_concurrent_clients is None else config.max_concurrent_clients
    if config.local_workers:
        try:
            workers = execution.start_local_workers(
                config.local_workers, max_concurrent_computation_calls=concurrent, **options
            )
        except execution.WorkerError as e:
            raise WorkerFailureError(f"--local_workers: {e}") from e
        try:
            addresses = tuple(w.address for w in workers)
            with execution.remote_context(addresses, **options):
                yield addresses
        finally:
            execution.stop_local_workers(workers)
    elif config.tff_workers:
        addresses = execution.parse_worker_addresses(config.tff_workers)
        try:
            execution.set_remote_context(addresses, **options)
        except execution.WorkerError as e:
            raise WorkerFailureError(f"--tff_workers: {e}") from e
        try:
            yield addresses
        finally:
            execution.reset_context()
    else:
        with execution.local_context(max_concurrent_computation_calls=concurrent):
            yield ()


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _worker_failures(step: str, *, output_dir: pathlib.Path, state_manager=None) -> Iterator[None]:
    """Turns a remote worker's failure during `step` into one `WorkerFailureError` line."""
    try:
        yield
    except execution.WorkerError as e:
        addresses = execution.remote_worker_addresses()
        dead = execution.unreachable_workers(addresses, timeout=2.0) if addresses else []
        if state_manager is not None:
            versions = asyncio.run(state_manager.get_versions()) or []
            kept = (
                f"the program state saved after round {max(versions)} is intact in "
                f"{output_dir / 'checkpoints'}"
                if versions
                else "no program state was saved yet"
            )
        else:
            kept = f"the final prompt is saved in {output_dir / 'final_prompt.npy'}"
        if dead:
            raise WorkerFailureError(
                f"{step}: TFF worker(s) {', '.join(dead)} stopped answering ({_one_line(e, 200)}); "
                f"{kept}. Restart the worker(s) (python -m fedprompt.worker --port=PORT) and rerun "
                "the same command to resume (the worker list may change)."
            ) from e
        raise WorkerFailureError(
            f"{step}: a TFF worker call failed: {_one_line(e)}. The frozen backbone checkpoint "
            f"{output_dir.resolve() / 'frozen_backbone'} is read by every worker at that path, so "
            f"it must be readable there on each worker host (shared filesystem); {kept}. Fix the "
            "cause and rerun the same command to resume."
        ) from e


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class ExperimentData:
    split: Any
    train_datasets: list
    pooled_dataset: Any
    evaluation_clients: list
    global_batches: Any
    global_generation: Any


def load_tasks(config: ExperimentConfig):
    from tasks import load_sni
    from tasks.synthetic import generate_synthetic_suite

    if config.data == SYNTHETIC:
        return generate_synthetic_suite(
            seed=config.seed, instances_per_task=config.synthetic_instances_per_task
        )
    return load_sni(
        os.path.expanduser(config.data), max_instances_per_task=config.max_instances_per_task
    )


def build_data(config: ExperimentConfig, backbone: backbones.ResolvedBackbone) -> ExperimentData:
    from tasks.partition import build_federated_split
    from tasks.preprocess import build_dataset, build_generation_inputs
    from tasks.sni import SniFormatError

    try:
        tasks = load_tasks(config)
    except (SniFormatError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"--data={config.data}: {str(e).strip(chr(34))}") from e
    try:
        split = build_federated_split(
            tasks,
            scheme=config.partition,
            num_clients=config.num_clients,
            num_validation_clients=config.num_validation_clients,
            num_test_clients=config.num_test_clients,
            alpha=config.alpha,
            home_fraction=config.home_fraction,
            seed=config.seed,
            global_test_per_category=config.global_test_per_category,
            examples_per_client=config.examples_per_client,
        )
    except ValueError as e:
        raise ConfigError(f"--partition={config.partition}: {e}") from e
    encode = dict(
        tokenizer=backbone.tokenizer,
        template=backbone.template,
        sequence_length=config.sequence_length,
    )

    def batches(examples, seed=None):
        # Evaluation sets (no seed) are sorted by length: their loss sums do not
        # depend on order, and similar lengths per batch leave little padding.
        return build_dataset(
            examples,
            batch_size=config.batch_size,
            shuffle_seed=seed,
            sort_by_length=seed is None,
            **encode,
        )

    def generation(examples, limit):
        return build_generation_inputs(
            list(examples)[:limit] if limit else list(examples),
            tokenizer=backbone.tokenizer,
            template=backbone.template,
            max_prompt_length=config.sequence_length,
        )

    try:
        train = [
            batches(c.examples, seed=config.seed + i) for i, c in enumerate(split.train_clients)
        ]
    except ValueError as e:  # e.g. SequenceTooLongError, which names the needed length
        raise ConfigError(f"--sequence_length: {e}") from e
    pooled = batches([e for c in split.train_clients for e in c.examples], seed=config.seed)
    evaluation_clients = []
    for population, clients in (
        ("validation", split.validation_clients),
        ("test", split.test_clients),
    ):
        for c in clients:
            local_test = list(c.local_test)[: config.max_local_test_examples or None]
            evaluation_clients.append(
                personalization.EvaluationClient(
                    client_id=c.client_id,
                    split=population,
                    personalization_train=batches(c.personalization_train, seed=config.seed),
                    local_test_batches=batches(local_test),
                    local_generation=generation(local_test, None),
                )
            )
    global_examples = list(split.global_test)
    if config.max_global_test_examples and len(global_examples) > config.max_global_test_examples:
        # A fixed, category-interleaved subsample (the split orders by category).
        order = np.random.default_rng(config.seed).permutation(len(global_examples))
        global_examples = [
            global_examples[i] for i in sorted(order[: config.max_global_test_examples])
        ]
    if not global_examples:
        raise ConfigError("--global_test_per_category: the global test set is empty; set it >= 1.")
    return ExperimentData(
        split=split,
        train_datasets=train,
        pooled_dataset=pooled,
        evaluation_clients=evaluation_clients,
        global_batches=batches(global_examples),
        global_generation=generation(global_examples, None),
    )


# ----------------------------------------------------------------------------- training


def build_training_process(
    config: ExperimentConfig, *, model_fn: Callable, prompt_shape, initial_prompt
) -> tff.templates.IterativeProcess:
    """The iterative process of `config.algorithm` (not for `local`).

    A TFF process, or with `runtime="xla"` an `xla_runtime.XlaIterativeProcess`
    with the same `initialize` / `next` and state (on `config.tpu` if set).
    """
    spec = data_types.batch_spec(config.sequence_length)
    server = dict(
        server_optimizer=ServerOptimizer(config.server_optimizer),
        server_learning_rate=config.server_learning_rate,
        server_momentum=config.server_momentum,
    )
    if config.runtime == "xla":
        return _build_xla_training_process(
            config, model_fn=model_fn, prompt_shape=prompt_shape, initial_prompt=initial_prompt
        )
    loss_fn = lambda: model_fn().loss  # noqa: E731
    if config.algorithm == "fedsgd":
        return build_fed_sgd(
            model_fn=loss_fn,
            prompt_shape=prompt_shape,
            batch_spec=spec,
            initial_prompt=initial_prompt,
            **server,
        )
    return build_fed_avg(
        model_fn=loss_fn,
        prompt_shape=prompt_shape,
        batch_spec=spec,
        initial_prompt=initial_prompt,
        client_optimizer=ClientOptimizer(config.client_optimizer),
        client_learning_rate=config.client_learning_rate,
        client_momentum=config.client_momentum,
        local_epochs=config.local_epochs,
        local_steps=config.local_steps,
        clip_norm=config.clip_norm,
        client_weighting=ClientWeighting(config.client_weighting),
        **server,
    )


def _build_xla_training_process(config, *, model_fn, prompt_shape, initial_prompt):
    from fedprompt import xla_runtime

    # XLA needs static shapes: the masked-weights loss, not tf.boolean_mask's.
    loss_fn = lambda: model_fn().static_shape_loss  # noqa: E731
    common = dict(
        model_fn=loss_fn,
        prompt_shape=prompt_shape,
        initial_prompt=initial_prompt,
        server_optimizer=ServerOptimizer(config.server_optimizer),
        server_learning_rate=config.server_learning_rate,
        server_momentum=config.server_momentum,
        strategy=xla_runtime.make_strategy(tpu=config.tpu),
    )
    if config.algorithm == "fedsgd":
        return xla_runtime.build_xla_fed_sgd(**common)
    return xla_runtime.build_xla_fed_avg(
        client_optimizer=ClientOptimizer(config.client_optimizer),
        client_learning_rate=config.client_learning_rate,
        client_momentum=config.client_momentum,
        local_epochs=config.local_epochs,
        local_steps=config.local_steps,
        clip_norm=config.clip_norm,
        client_weighting=ClientWeighting(config.client_weighting),
        **common,
    )


def sample_clients(*, seed: int, round_num: int, num_clients: int, clients_per_round: int):
    """Clients of round `round_num` (1-based): a pure function, so resumes match."""
    rng = np.random.default_rng([seed, round_num])
    return sorted(rng.choice(num_clients, size=clients_per_round, replace=False).tolist())


def _scalar(value) -> float:
    return float(np.asarray(value))


def _mean_scores(records: Sequence[dict]) -> dict:
    def mean(key):
        values = [r[key] for r in records if not math.isnan(r[key])]
        return float(np.mean(values)) if values else float("nan")

    return {k: mean(k) for k in ("local_rougeL", "global_rougeL", "local_loss", "global_loss")}


class _Evaluator:
    """Scores prompts on evaluation clients with the personalization computations."""

    def __init__(self, process, data: ExperimentData, tokenizer):
        self.process = process
        self.data = data
        self.tokenizer = tokenizer
        self.client_inputs = [
            personalization.client_data(c, data.global_batches, data.global_generation)
            for c in data.evaluation_clients
        ]

    def _clients(self, split: Optional[str]):
        return [
            i
            for i, c in enumerate(self.data.evaluation_clients)
            if split is None or c.split == split
        ]

    def evaluate_prompt(self, prompt, split="validation") -> dict:
        indices = self._clients(split)
        if not indices:
            return {}
        results = self.process.evaluate(
            [np.asarray(prompt, np.float32)[None]] * len(indices),
            [self.client_inputs[i] for i in indices],
        )
        grid = personalization.PersonalizationGrid(
            optimizers=self.process.grid.optimizers, learning_rates=(1.0,), epochs=(0,)
        )
        records = []
        for i, result in zip(indices, results):
            records += personalization.score_personalization(
                grid=grid,
                client=self.data.evaluation_clients[i],
                global_generation=self.data.global_generation,
                result={k: np.asarray(v) for k, v in result.items()},
                tokenizer=self.tokenizer,
            )
        return _mean_scores(records)

    def personalize(self, prompt) -> list[dict]:
        results = personalization.run_personalization(self.process, prompt, self.client_inputs)
        records = []
        for client, result in zip(self.data.evaluation_clients, results):
            records += personalization.score_personalization(
                grid=self.process.grid,
                client=client,
                global_generation=self.data.global_generation,
                result=result,
                tokenizer=self.tokenizer,
            )
        return records


def _read_rounds(path: pathlib.Path, up_to: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["round"]) <= up_to]


def _write_atomic(path: pathlib.Path, write: Callable[[Any], None], *, binary=False) -> None:
    """Writes `path` via a temp file + `os.replace`: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text(path: pathlib.Path, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text))


class NonFiniteRoundError(ConfigError):
    """Every client of a round had a non-finite update; the run cannot continue."""


def _write_csv(path: pathlib.Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    os.replace(tmp, path)


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def load_program_state(state_manager, initial_state, checkpoints_dir: pathlib.Path):
    """The latest saved (state, round), or (None, 0); an unreadable save is a `ConfigError`.

    A truncated or corrupted checkpoint (disk full, a copy cut short) would
    otherwise surface as a TensorFlow traceback from deep inside the reader.
    """
    try:
        return asyncio.run(state_manager.load_latest(initial_state))
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable save
        versions = asyncio.run(state_manager.get_versions()) or []
        latest = checkpoints_dir / f"program_state_{max(versions)}" if versions else checkpoints_dir
        raise ConfigError(
            f"--output_dir: the saved program state {latest} is unreadable "
            f"({type(e).__name__}: {_one_line(str(e), 160)}); delete that directory to "
            "resume from the round saved before it, or pass --overwrite to start over."
        ) from e


def train(
    config: ExperimentConfig,
    *,
    process: tff.templates.IterativeProcess,
    data: ExperimentData,
    evaluator: _Evaluator,
    output_dir: pathlib.Path,
    progress: Callable[[str], None],
):
    """Runs the rounds with checkpoint/resume; returns the final prompt."""
    state_manager = tff.program.FileProgramStateManager(
        str(output_dir / "checkpoints"), keep_total=2
    )
    initial_state = process.initialize()
    state, version = load_program_state(state_manager, initial_state, output_dir / "checkpoints")
    if state is None:
        state, start_round = initial_state, 0
    else:
        start_round = int(version)
        progress(f"resuming from the program state saved after round {start_round}")
    rounds_path = output_dir / "rounds.csv"
    rows = _read_rounds(rounds_path, start_round) if start_round else []
    writer = tf.summary.create_file_writer(str(output_dir / "tensorboard"))
    pooled = config.algorithm == "centralized"
    started = time.perf_counter()
    previous_elapsed = float(rows[-1]["elapsed_s"]) if rows else 0.0
    for round_num in range(start_round + 1, config.rounds + 1):
        if pooled:
            client_data = [data.pooled_dataset]
        else:
            chosen = sample_clients(
                seed=config.seed,
                round_num=round_num,
                num_clients=len(data.train_datasets),
                clients_per_round=config.clients_per_round,
            )
            client_data = [data.train_datasets[i] for i in chosen]
        previous_state = state
        with _worker_failures(
            f"round {round_num}", output_dir=output_dir, state_manager=state_manager
        ):
            state, metrics = process.next(state, client_data)
        num_clients = int(_scalar(metrics.get("num_clients", 0)))
        if num_clients and int(_scalar(metrics["num_nonfinite_clients"])) == num_clients:
            # Keep the last good state on disk (the bad round changed nothing).
            versions = asyncio.run(state_manager.get_versions()) or []
            if round_num > 1 and round_num - 1 not in versions:
                asyncio.run(state_manager.save(previous_state, round_num - 1))
            kept = (
                f"the state after round {round_num - 1} is kept"
                if round_num > 1
                else ("no state was saved")
            )
            raise NonFiniteRoundError(
                f"round {round_num}: all {num_clients} clients produced a non-finite "
                f"(NaN/Inf) update, so training cannot continue ({kept} in {output_dir}). "
                "Lower --client_learning_rate (or --server_learning_rate), or set --clip_norm, "
                "and rerun with a new --output_dir or --overwrite."
            )
        elapsed = previous_elapsed + time.perf_counter() - started
        row = {"round": round_num, "elapsed_s": round(elapsed, 3)}
        for key in ROUND_COLUMNS[2:12]:
            if key in metrics:
                row[key] = _scalar(metrics[key])
        if "grad_norm_mean" not in metrics and "server_grad_norm" in metrics:
            # FedSGD: the clients' gradient is the update direction.
            row["grad_norm_mean"] = _scalar(metrics["server_grad_norm"])
        evaluated = round_num % config.eval_every == 0 or round_num == config.rounds
        if evaluated:
            with _worker_failures(
                f"round {round_num} (evaluation)",
                output_dir=output_dir,
                state_manager=state_manager,
            ):
                scores = evaluator.evaluate_prompt(
                    state.prompt, "validation"
                ) or evaluator.evaluate_prompt(state.prompt, "test")
            row.update({f"val_{k}": v for k, v in scores.items()})
        rows.append(row)
        with writer.as_default(step=round_num):
            for key, value in row.items():
                if key != "round" and isinstance(value, float) and math.isfinite(value):
                    tf.summary.scalar(key, value)
        _write_csv(rounds_path, ROUND_COLUMNS, rows)
        if round_num % config.checkpoint_every == 0 or round_num == config.rounds:
            asyncio.run(state_manager.save(state, round_num))
        done = round_num - start_round
        eta = (time.perf_counter() - started) / done * (config.rounds - round_num)
        line = (
            f"round {round_num}/{config.rounds}  loss {row.get('train_loss', float('nan')):.4f}  "
            f"elapsed {_format_eta(elapsed)}  eta {_format_eta(eta)}"
        )
        if evaluated and "val_local_rougeL" in row:
            line += (
                f"  val local ROUGE-L {row['val_local_rougeL']:.3f}"
                f" global {row['val_global_rougeL']:.3f}"
            )
        progress(line)
    writer.flush()
    return np.asarray(state.prompt, np.float32)


# ----------------------------------------------------------------------------- program


def _versions() -> dict:
    import keras_nlp
    from tensorflow.python.util import _pywrap_util_port

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tensorflow_federated": tff.__version__,
        "keras_nlp": keras_nlp.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        # Which CPU kernels ran (fedprompt/__init__.py): float32 results differ in
        # summation order between oneDNN and Eigen.
        "onednn_cpu_kernels": bool(_pywrap_util_port.IsMklEnabled()),
    }


def _initial_prompt(config, keras_backbone, tokenizer) -> np.ndarray:
    embeddings = np.asarray(keras_backbone.token_embedding.embeddings)
    init = prompt_model_lib.PromptInit(config.prompt_init)
    init_ids = (
        tokenizer.encode(config.prompt_init_text)
        if init is prompt_model_lib.PromptInit.TEXT
        else None
    )
    return prompt_model_lib.create_initial_prompt(
        embedding_matrix=embeddings,
        prompt_length=config.prompt_length,
        init=init,
        seed=config.seed,
        init_token_ids=init_ids,
        excluded_token_ids=sorted(tokenizer.special_token_ids),
    )


def run_experiment(
    config: ExperimentConfig,
    *,
    flags: Optional[dict] = None,
    progress: Callable[[str], None] = print,
    overwrite: bool = False,
) -> pathlib.Path:
    """Runs one experiment end to end; returns the path of its `report.md`.

    A rerun with the same `output_dir` resumes a compatible run (same settings;
    `rounds` may grow); a different one is refused unless `overwrite`, which
    deletes the directory first.
    """
    config.validate()
    output_dir = pathlib.Path(config.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(
            f"--output_dir={output_dir} is a file, not a directory; pick another path."
        )
    if overwrite and output_dir.exists():
        progress(f"--overwrite: deleting {output_dir}")
        shutil.rmtree(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output_dir={output_dir} cannot be created ({e.strerror}).") from e
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir={output_dir} is not writable; pick another path.")
    config_path = output_dir / "config.json"
    if config_path.exists():
        try:
            previous = json.loads(config_path.read_text())
            if not isinstance(previous, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise ConfigError(
                f"--output_dir={output_dir}: config.json is unreadable ({e}); "
                "pass --overwrite to start over, or use a new --output_dir."
            ) from e
        # More rounds may be asked for on resume (continue training); nothing else.
        changed = [
            f"--{k}: {previous[k]!r} -> {v!r}"
            for k, v in config.to_json().items()
            if k not in ("rounds", "output_dir", *EXECUTION_SETTINGS)
            and k in previous
            and previous[k] != v
        ]
        if changed:
            raise ConfigError(
                f"--output_dir={output_dir} holds a run with different settings "
                f"({'; '.join(changed)}); rerun with the old values to resume, pass --overwrite "
                "to delete it and start over, or use a new --output_dir."
            )
    if config.tff_workers:
        # Before the heavy work: a wrong or down worker should cost seconds, not a build.
        try:
            execution.wait_for_workers(
                execution.parse_worker_addresses(config.tff_workers), timeout=config.worker_timeout
            )
        except execution.WorkerError as e:
            raise WorkerFailureError(f"--tff_workers: {e}") from e
    start = time.perf_counter()
    progress(f"backbone {config.backbone}: resolving (first use builds and caches it)")
    try:
        backbone = backbones.resolve_backbone(config.backbone, cache_dir=config.cache_dir)
    except backbones.BackboneError as e:
        raise ConfigError(str(e)) from e
    keras_backbone = backbone.load_keras_backbone()
    architecture = prompt_model_lib.architecture_of(keras_backbone)
    max_length = getattr(keras_backbone, "max_sequence_length", None)
    needed = config.prompt_length + config.sequence_length + config.max_new_tokens
    if max_length is not None and needed > max_length:
        raise ConfigError(
            f"--sequence_length: prompt_length + sequence_length + max_new_tokens = {needed} exceeds "
            f"the backbone's max_sequence_length {max_length}; shorten one of them."
        )
    initial_prompt = _initial_prompt(config, keras_backbone, backbone.tokenizer)
    frozen = frozen_backbone.save_frozen_backbone(
        keras_backbone, str(output_dir / "frozen_backbone")
    )
    del keras_backbone
    progress(f"data {config.data}: partitioning into clients ({config.partition})")
    data = build_data(config, backbone)
    from tasks.partition import partition_statistics

    _write_text(
        output_dir / "partition.json", json.dumps(partition_statistics(data.split), indent=1)
    )
    _write_text(
        config_path,
        json.dumps(
            config.to_json()
            | {
                "flags": flags or {},
                "resolved_backbone": backbone.describe() | {"architecture": architecture.value},
                "versions": _versions(),
            },
            indent=1,
        ),
    )
    prompt_shape = tuple(initial_prompt.shape)
    model_fn = lambda: prompt_model_lib.PromptTunedLM(frozen_backbone.restore_backbone(frozen))  # noqa: E731

    with execution_context(config) as workers:
        if workers:
            progress(f"TFF workers: {', '.join(workers)}")
        evaluation_process = personalization.build_personalization_evaluation(
            model_fn=model_fn,
            prompt_shape=prompt_shape,
            sequence_length=config.sequence_length,
            generation_width=config.sequence_length,
            grid=config.personalization_grid(),
            max_new_tokens=config.max_new_tokens,
            stop_token_ids=backbone.stop_token_ids,
            pad_token_id=backbone.tokenizer.pad_token_id,
            # Length-sorted batches of the training batch size: a long example
            # (e.g. en->ja translation) no longer pads every other row to its width.
            generation_batch_size=config.batch_size,
        )
        evaluator = _Evaluator(evaluation_process, data, backbone.tokenizer)
        if config.algorithm == "local":
            final_prompt = initial_prompt
            _write_csv(output_dir / "rounds.csv", ROUND_COLUMNS, [])
        else:
            process = build_training_process(
                config, model_fn=model_fn, prompt_shape=prompt_shape, initial_prompt=initial_prompt
            )
            progress(f"training: {config.algorithm}, {config.rounds} rounds")
            final_prompt = train(
                config,
                process=process,
                data=data,
                evaluator=evaluator,
                output_dir=output_dir,
                progress=progress,
            )
            # The XLA runtime's process holds an eager backbone and its compiled
            # step; drop them before personalization, which needs the memory.
            del process
            gc.collect()
        _write_atomic(
            output_dir / "final_prompt.npy", lambda f: np.save(f, final_prompt), binary=True
        )
        progress(
            f"personalization: {len(data.evaluation_clients)} clients x "
            f"{len(evaluation_process.grid.evaluated_points())} prompts"
        )
        with _worker_failures("personalization", output_dir=output_dir):
            records = evaluator.personalize(final_prompt)
        # Written before the execution context is torn down, so that no teardown
        # problem can lose the evaluation's results.
        for r in records:
            r["start"] = config.algorithm
        _write_csv(output_dir / "personalization.csv", PERSONALIZATION_COLUMNS, records)
    from fedprompt import report

    report_path = report.write_all(output_dir)["report"]
    progress(f"done in {_format_eta(time.perf_counter() - start)}; report: {report_path}")
    return report_path


def clear_run(output_dir: str) -> None:
    """Deletes a results directory (used by tests and the sweep's --restart)."""
    shutil.rmtree(output_dir, ignore_errors=True)
