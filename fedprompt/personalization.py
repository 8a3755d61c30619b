"""Personalization and robustness evaluation over evaluation clients.

For each evaluation client, starting from a given global prompt `P_g`:
  * `finetune`: fine-tune with each (optimizer, learning rate) of the grid and
    evaluate after each epoch count of the schedule (e.g. 0, 1, 2, 4, ..., 64);
  * `l2`: the same with the penalty `(lambda/2)||P - P_g||^2`, for each lambda;
  * `interpolation`: `P_alpha = (1 - alpha) P_g + alpha P_personal` for each
    alpha, applied to the `finetune` prompts at every scheduled epoch count.
Every evaluated prompt is scored on the client's own test data (local score,
personalization) and on the global test set (global score, robustness): token
loss, and greedy-decoded ROUGE-L / exact match.

The per-client work is one TFF computation mapped over clients
(`build_personalization_evaluation`, like TFF's personalization evaluation); it
returns token ids and loss sums, and the text is decoded and scored in Python
(`score_personalization`). Fine-tuning uses `fedprompt.client_update`, so the
update rule is the one federated training uses.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedprompt import client_update as client_update_lib
from fedprompt import data_types, evaluation
from fedprompt.evaluation import GenerationSet
from fedprompt.prompt_model import PromptTunedLM
from optimizers import ClientOptimizer, build_client_optimizer

FINETUNE = "finetune"
L2 = "l2"
INTERPOLATION = "interpolation"

DEFAULT_LEARNING_RATES = tuple(10.0**e for e in (-0.5, -1.0, -1.5, -2.0))
DEFAULT_EPOCHS = (0, 1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class PersonalizationGrid:
    """The grid evaluated for every client (validated at construction).

    Attributes:
      optimizers: client optimizers used for fine-tuning.
      learning_rates: fine-tuning learning rates (> 0).
      epochs: increasing epoch counts at which prompts are evaluated; 0 (the
        global prompt itself) is always evaluated.
      l2_strengths: lambdas (> 0) of the L2-to-global runs; empty disables them.
      interpolation_alphas: alphas in [0, 1] applied to the fine-tuned prompts;
        empty disables interpolation.
      momentum: used by `ClientOptimizer.SGDM`.
    """

    optimizers: tuple = (ClientOptimizer.ADAM,)
    learning_rates: tuple = DEFAULT_LEARNING_RATES
    epochs: tuple = DEFAULT_EPOCHS
    l2_strengths: tuple = ()
    interpolation_alphas: tuple = ()
    momentum: float = 0.9

    def __post_init__(self):
        object.__setattr__(self, "optimizers", tuple(ClientOptimizer(o) for o in self.optimizers))
        if not self.optimizers:
            raise ValueError("`personalization_optimizers` must name at least one optimizer.")
        for name, values, ok, rule in (
            ("personalization_learning_rates", self.learning_rates, lambda v: v > 0, "> 0"),
            ("l2_strengths", self.l2_strengths, lambda v: v > 0, "> 0"),
            ("interpolation_alphas", self.interpolation_alphas, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ):
            for v in values:
                if not (isinstance(v, (int, float)) and math.isfinite(v) and ok(v)):
                    raise ValueError(f"`{name}` values must be {rule}, got {v!r} in {values}.")
        if not self.learning_rates:
            raise ValueError("`personalization_learning_rates` must not be empty.")
        epochs = tuple(int(e) for e in self.epochs)
        if any(e < 0 for e in epochs) or list(epochs) != sorted(set(epochs)):
            raise ValueError(
                f"`personalization_epochs` must be distinct, increasing and >= 0, got {self.epochs}."
            )
        if 0 not in epochs:
            epochs = (0,) + epochs
        object.__setattr__(self, "epochs", epochs)

    def trained_runs(self) -> list[tuple[ClientOptimizer, float, float]]:
        """(optimizer, learning rate, l2 strength) of every fine-tuning run."""
        return [
            (opt, float(lr), float(l2))
            for opt, lr, l2 in itertools.product(
                self.optimizers, self.learning_rates, (0.0,) + tuple(self.l2_strengths)
            )
        ]

    def evaluated_points(self) -> list[dict]:
        """The evaluated prompts, in the order the computation stacks them.

        Index 0 is the global prompt (epoch 0). Then, per trained run and scheduled
        epoch > 0: the run's prompt, followed (for l2 == 0) by one point per alpha.
        """
        points = [dict(kind="global")]
        for opt, lr, l2 in self.trained_runs():
            for epochs in self.epochs[1:]:
                method = FINETUNE if l2 == 0 else L2
                points.append(dict(kind=method, optimizer=opt, lr=lr, l2=l2, epochs=epochs))
                if l2 == 0:
                    for alpha in self.interpolation_alphas:
                        points.append(
                            dict(
                                kind=INTERPOLATION,
                                optimizer=opt,
                                lr=lr,
                                l2=0.0,
                                epochs=epochs,
                                alpha=float(alpha),
                            )
                        )
        return points


@dataclasses.dataclass(frozen=True)
class EvaluationClient:
    """One evaluation client's data, as numpy/tf.data (built by the program)."""

    client_id: str
    split: str  # "validation" or "test"
    personalization_train: tf.data.Dataset
    local_test_batches: tf.data.Dataset
    local_generation: GenerationSet


def client_data_type(sequence_length: int, generation_width: int):
    """TFF type of one evaluation client's data."""
    batches = tff.SequenceType(data_types.batch_type(sequence_length))
    return tff.StructWithPythonType(
        [
            ("personalization_train", batches),
            ("local_test_batches", batches),
            ("local_input_ids", tff.TensorType(np.int32, [None, generation_width])),
            ("local_input_lengths", tff.TensorType(np.int32, [None])),
            ("global_test_batches", batches),
            ("global_input_ids", tff.TensorType(np.int32, [None, generation_width])),
            ("global_input_lengths", tff.TensorType(np.int32, [None])),
        ],
        collections.OrderedDict,
    )


def evaluate_prompts(
    *,
    model: PromptTunedLM,
    prompts: tf.Tensor,
    data,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    generation_batch_size: Optional[int] = None,
) -> collections.OrderedDict:
    """Scores each of `prompts [K, P, H]` on one client's local and global test data.

    A graph loop over `K`, so the decoding and loss graphs are traced once however
    large the grid is. Decoding runs shortest inputs first, `generation_batch_size`
    rows at a time, each batch cut to its longest input
    (`evaluation.generate_in_length_order`). Returns an OrderedDict of tensors stacked over `K`:
    `{local,global}_loss_sum [K]`, `{local,global}_num_tokens [K]`,
    `{local,global}_tokens [K, N, max_new_tokens]`, `{local,global}_lengths [K, N]`.
    """
    keys = tuple(_RESULT_DTYPES)

    def evaluate(prompt):
        local_loss, local_count = evaluation.dataset_loss(model, prompt, data["local_test_batches"])
        global_loss, global_count = evaluation.dataset_loss(
            model, prompt, data["global_test_batches"]
        )
        generate = lambda ids, lens: evaluation.generate_in_length_order(  # noqa: E731
            model,
            prompt,
            ids,
            lens,
            chunk_size=generation_batch_size,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            pad_token_id=pad_token_id,
        )
        local_tokens, local_lengths = generate(data["local_input_ids"], data["local_input_lengths"])
        global_tokens, global_lengths = generate(
            data["global_input_ids"], data["global_input_lengths"]
        )
        return (
            local_loss,
            local_count,
            global_loss,
            global_count,
            local_tokens,
            local_lengths,
            global_tokens,
            global_lengths,
        )

    prompts = tf.cast(prompts, tf.float32)
    num_prompts = tf.shape(prompts)[0]
    arrays = tuple(tf.TensorArray(_RESULT_DTYPES[k], size=num_prompts) for k in keys)

    def body(i, arrays):
        values = evaluate(prompts[i])
        return i + 1, tuple(a.write(i, v) for a, v in zip(arrays, values))

    _, arrays = tf.while_loop(lambda i, _: i < num_prompts, body, (tf.constant(0), arrays))
    return collections.OrderedDict((k, a.stack()) for k, a in zip(keys, arrays))


_RESULT_DTYPES = collections.OrderedDict(
    local_loss_sum=tf.float32,
    local_num_tokens=tf.float32,
    global_loss_sum=tf.float32,
    global_num_tokens=tf.float32,
    local_tokens=tf.int32,
    local_lengths=tf.int32,
    global_tokens=tf.int32,
    global_lengths=tf.int32,
)


def fine_tune_snapshots(
    *,
    model: PromptTunedLM,
    global_prompt: tf.Tensor,
    dataset: tf.data.Dataset,
    epochs: Sequence[int],
    prompt_variable: tf.Variable,
    optimizer: tf.keras.optimizers.Optimizer,
    learning_rate: tf.Tensor,
    l2_strength: tf.Tensor,
    clip_norm: Optional[float] = None,
) -> tf.Tensor:
    """Fine-tunes from `global_prompt`; returns the prompts after each of `epochs`.

    One continuous run (the optimizer state carries over between snapshots), one
    epoch per iteration of a graph loop, so the training graph is traced once for
    any schedule. The L2 penalty `(l2_strength/2)||P - P_global||^2` is applied
    when `l2_strength > 0`. The caller resets `optimizer` (see
    `_reset_optimizer`) and sets its learning rate to `learning_rate`.

    Returns:
      float32 `[len(epochs), P, H]`.
    """
    epochs = [int(e) for e in epochs]
    if not epochs or epochs[0] < 1 or epochs != sorted(set(epochs)):
        raise ValueError(f"`epochs` must be increasing and >= 1, got {epochs}.")
    global_prompt = tf.cast(global_prompt, tf.float32)
    optimizer.learning_rate.assign(tf.cast(learning_rate, optimizer.learning_rate.dtype))
    prompt_variable.assign(global_prompt)
    max_epochs = epochs[-1]
    snapshots = tf.TensorArray(tf.float32, size=max_epochs)
    for epoch in tf.range(max_epochs):
        client_update_lib.client_update(
            loss_fn=model.loss,
            prompt_variable=prompt_variable,
            initial_prompt=prompt_variable.read_value(),
            dataset=dataset,
            optimizer=optimizer,
            num_epochs=1,
            clip_norm=clip_norm,
            l2_strength=tf.cast(l2_strength, tf.float32),
            l2_reference=global_prompt,
        )
        snapshots = snapshots.write(epoch, prompt_variable.read_value())
    return tf.gather(snapshots.stack(), [e - 1 for e in epochs])


def _reset_optimizer(optimizer: tf.keras.optimizers.Optimizer):
    """Restores every optimizer variable (slots, iteration count) to its initial value.

    Inside a TFF computation variables are graph variables, whose `initial_value`
    (zeros, or Adagrad's initial accumulator) is a tensor of that graph.
    """
    for variable in optimizer.variables:
        variable.assign(variable.initial_value)


class PersonalizationEvaluation(NamedTuple):
    """The TFF computations of the personalization sweep (see `run_personalization`).

    Attributes:
      grid: the `PersonalizationGrid`.
      fine_tune: `{ClientOptimizer: computation}` with type signature
        `(<prompt float32[P,H]@SERVER, learning_rate float32@SERVER,
          l2_strength float32@SERVER, data@CLIENTS> -> float32[E,P,H]@CLIENTS)`,
        the prompts after each scheduled epoch count > 0 (E of them).
      evaluate: `(<prompts float32[?,P,H]@CLIENTS, data@CLIENTS> -> results@CLIENTS)`,
        `results` as documented in `evaluate_prompts`.
    """

    grid: PersonalizationGrid
    fine_tune: dict
    evaluate: tff.Computation


def build_personalization_evaluation(
    *,
    model_fn: Callable[[], PromptTunedLM],
    prompt_shape: tuple,
    sequence_length: int,
    generation_width: int,
    grid: PersonalizationGrid,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    clip_norm: Optional[float] = None,
    generation_batch_size: Optional[int] = None,
) -> PersonalizationEvaluation:
    """Builds the federated computations of the personalization sweep.

    Learning rate and lambda are arguments, not constants, so one fine-tuning
    computation per optimizer kind and one evaluation computation serve the whole
    grid (tracing a 30-layer backbone costs about a minute: DESIGN.md trap 6). The
    frozen backbone is rebuilt inside each client computation by `model_fn`
    (restored from its checkpoint there); only prompts and data cross the wire.
    `generation_batch_size` bounds how many rows are decoded at once (None: a
    client's whole local or global set), see `evaluate_prompts`.
    """
    prompt_shape = tuple(int(d) for d in prompt_shape)
    prompt_type = tff.TensorType(np.float32, list(prompt_shape))
    scalar_type = tff.TensorType(np.float32)
    data_type = client_data_type(sequence_length, generation_width)
    epochs = grid.epochs[1:]

    def build_fine_tune(kind: ClientOptimizer):
        @tff.tensorflow.computation(prompt_type, scalar_type, scalar_type, data_type)
        def client_fine_tune(global_prompt, learning_rate, l2_strength, data):
            model = model_fn()
            variable = tf.Variable(tf.zeros(prompt_shape, tf.float32), trainable=True)
            # The learning rate is overwritten before use; 1.0 only builds the optimizer.
            optimizer = build_client_optimizer(
                kind, learning_rate=1.0, **_momentum_kwargs(kind, grid.momentum)
            )
            optimizer.build([variable])

            @tf.function
            def run(global_prompt, learning_rate, l2_strength, dataset):
                _reset_optimizer(optimizer)
                return fine_tune_snapshots(
                    model=model,
                    global_prompt=global_prompt,
                    dataset=dataset,
                    epochs=epochs,
                    prompt_variable=variable,
                    optimizer=optimizer,
                    learning_rate=learning_rate,
                    l2_strength=l2_strength,
                    clip_norm=clip_norm,
                )

            return run(global_prompt, learning_rate, l2_strength, data["personalization_train"])

        @tff.federated_computation(
            tff.FederatedType(prompt_type, tff.SERVER),
            tff.FederatedType(scalar_type, tff.SERVER),
            tff.FederatedType(scalar_type, tff.SERVER),
            tff.FederatedType(data_type, tff.CLIENTS),
        )
        def fine_tune(global_prompt, learning_rate, l2_strength, client_data):
            return tff.federated_map(
                client_fine_tune,
                (
                    tff.federated_broadcast(global_prompt),
                    tff.federated_broadcast(learning_rate),
                    tff.federated_broadcast(l2_strength),
                    client_data,
                ),
            )

        return fine_tune

    prompts_type = tff.TensorType(np.float32, [None, *prompt_shape])

    @tff.tensorflow.computation(prompts_type, data_type)
    def client_evaluate(prompts, data):
        model = model_fn()

        # A tf.function, not the computation's TF1 graph: the test-set losses loop
        # over dataset iterators (`evaluation.dataset_loss`), which need one.
        @tf.function
        def run(prompts, data):
            return evaluate_prompts(
                model=model,
                prompts=prompts,
                data=data,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stop_token_ids,
                pad_token_id=pad_token_id,
                generation_batch_size=generation_batch_size,
            )

        return run(prompts, data)

    @tff.federated_computation(
        tff.FederatedType(prompts_type, tff.CLIENTS), tff.FederatedType(data_type, tff.CLIENTS)
    )
    def evaluate(prompts, client_data):
        return tff.federated_map(client_evaluate, (prompts, client_data))

    fine_tune = {}
    if epochs:
        fine_tune = {kind: build_fine_tune(kind) for kind in grid.optimizers}
    return PersonalizationEvaluation(grid=grid, fine_tune=fine_tune, evaluate=evaluate)


def interpolate(global_prompt: np.ndarray, personal: np.ndarray, alpha: float) -> np.ndarray:
    """`(1 - alpha) P_global + alpha P_personal`, exact at alpha 0 and 1."""
    if alpha == 0:
        return np.array(global_prompt, np.float32)
    if alpha == 1:
        return np.array(personal, np.float32)
    return ((1.0 - alpha) * global_prompt + alpha * personal).astype(np.float32)


def run_personalization(
    process: PersonalizationEvaluation, global_prompt, clients_data: Sequence
) -> list[collections.OrderedDict]:
    """Runs the grid for every client; returns per-client results.

    Each result stacks, along its first axis, the prompts of
    `grid.evaluated_points()` in order (what `score_personalization` reads).
    """
    grid = process.grid
    global_prompt = np.asarray(global_prompt, np.float32)
    prompts = [[global_prompt] for _ in clients_data]
    for kind, learning_rate, l2_strength in grid.trained_runs():
        if not process.fine_tune:
            break
        snapshots = process.fine_tune[kind](
            global_prompt, np.float32(learning_rate), np.float32(l2_strength), list(clients_data)
        )
        for client_prompts, client_snapshots in zip(prompts, snapshots):
            for personal in np.asarray(client_snapshots):
                client_prompts.append(personal)
                if l2_strength == 0:
                    for alpha in grid.interpolation_alphas:
                        client_prompts.append(interpolate(global_prompt, personal, alpha))
    expected = len(grid.evaluated_points())
    if any(len(p) != expected for p in prompts):
        raise AssertionError("prompt list does not follow grid.evaluated_points()")
    results = process.evaluate([np.stack(p) for p in prompts], list(clients_data))
    return [collections.OrderedDict((k, np.asarray(v)) for k, v in r.items()) for r in results]


def _momentum_kwargs(kind: ClientOptimizer, momentum: float) -> dict:
    return {"momentum": momentum} if ClientOptimizer(kind) is ClientOptimizer.SGDM else {}


def client_data(
    client: EvaluationClient, global_batches: tf.data.Dataset, global_generation: GenerationSet
) -> collections.OrderedDict:
    """One client's input to the computation (the global set is replicated)."""
    return collections.OrderedDict(
        personalization_train=client.personalization_train,
        local_test_batches=client.local_test_batches,
        local_input_ids=client.local_generation.input_ids,
        local_input_lengths=client.local_generation.input_lengths,
        global_test_batches=global_batches,
        global_input_ids=global_generation.input_ids,
        global_input_lengths=global_generation.input_lengths,
    )


RECORD_COLUMNS = (
    "client_id",
    "client_split",
    "method",
    "optimizer",
    "learning_rate",
    "epochs",
    "l2_strength",
    "alpha",
    "local_rougeL",
    "global_rougeL",
    "local_loss",
    "global_loss",
    "local_exact_match",
    "global_exact_match",
)


def score_personalization(
    *,
    grid: PersonalizationGrid,
    client: EvaluationClient,
    global_generation: GenerationSet,
    result,
    tokenizer: data_types.TextTokenizer,
) -> list[dict]:
    """Turns one client's computation output into records (one per grid point).

    Epoch 0 (the global prompt) is reported once per (method, optimizer, lr,
    l2 or alpha) combination so every curve starts at the global prompt.
    """
    result = {k: np.asarray(v) for k, v in result.items()}
    scores = []
    for k in range(len(result["local_loss_sum"])):
        local = evaluation.score_generations(
            tokenizer,
            result["local_tokens"][k],
            result["local_lengths"][k],
            client.local_generation,
        )
        global_ = evaluation.score_generations(
            tokenizer, result["global_tokens"][k], result["global_lengths"][k], global_generation
        )
        scores.append(
            dict(
                local_rougeL=float(local["rougeL"].mean())
                if len(local["rougeL"])
                else float("nan"),
                global_rougeL=float(global_["rougeL"].mean())
                if len(global_["rougeL"])
                else float("nan"),
                local_exact_match=float(local["exact_match"].mean())
                if len(local["rougeL"])
                else float("nan"),
                global_exact_match=float(global_["exact_match"].mean())
                if len(global_["rougeL"])
                else float("nan"),
                local_loss=_ratio(result["local_loss_sum"][k], result["local_num_tokens"][k]),
                global_loss=_ratio(result["global_loss_sum"][k], result["global_num_tokens"][k]),
            )
        )
    records = []

    def record(method, opt, lr, epochs, l2, alpha, score):
        records.append(
            dict(
                client_id=client.client_id,
                client_split=client.split,
                method=method,
                optimizer=ClientOptimizer(opt).value,
                learning_rate=lr,
                epochs=epochs,
                l2_strength=l2,
                alpha=alpha,
                **score,
            )
        )

    points = grid.evaluated_points()
    if len(points) != len(scores):
        raise ValueError(f"expected {len(points)} evaluated prompts, got {len(scores)}.")
    for opt, lr, l2 in grid.trained_runs():
        if l2 == 0:
            record(FINETUNE, opt, lr, 0, 0.0, 1.0, scores[0])
            for alpha in grid.interpolation_alphas:
                record(INTERPOLATION, opt, lr, 0, 0.0, float(alpha), scores[0])
        else:
            record(L2, opt, lr, 0, l2, 1.0, scores[0])
    for point, score in zip(points[1:], scores[1:]):
        record(
            point["kind"],
            point["optimizer"],
            point["lr"],
            point["epochs"],
            point["l2"],
            point.get("alpha", 1.0),
            score,
        )
    return records


def _ratio(a, b) -> float:
    return float(a) / float(b) if float(b) > 0 else float("nan")
