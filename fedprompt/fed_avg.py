"""FedAvg for soft prompts as TFF computations: only the prompt travels.

Round (`next`), with the TFF types below (P, H = prompt shape; B = batch spec):
1. broadcast the prompt `float32[P,H]@SERVER -> @CLIENTS`;
2. each client runs `client_update` (local epochs/steps with a tf.keras
   optimizer created inside the client computation, where `model_fn()` also
   builds and restores the frozen backbone);
3. clients with a non-finite delta, loss or gradient norm get weight 0 and a
   zeroed delta (excluded, and counted in `num_nonfinite_clients`); the others
   are averaged with weights from `ClientWeighting`: `sum_i w_i d_i / sum_i w_i`;
4. the server optimizer (a `tff.learning.optimizers.Optimizer`) takes the
   pseudo-gradient `-mean delta`; SGD with learning rate 1.0 is plain FedAvg
   (McMahan et al. 2017), Adam is FedAdam (Reddi et al. 2021). If no client is
   usable the state is returned unchanged and `update_applied` is False.

The building blocks are exported (`build_fed_avg_components`) so research code
can recompose them, e.g. with its own aggregation.

TFF type signatures (`S` = `ServerState` =
`<prompt=float32[P,H], optimizer_state=<...>, round_num=int64>`; the optimizer
state holds the server optimizer's hyperparameters and `[P,H]` slots only):
- `initialize`: `( -> S@SERVER)`
- `next`: `(<state=S@SERVER, client_data={B*}@CLIENTS> -> <S@SERVER, M@SERVER>)`
  with `M` the `OrderedDict` of metrics described in `FED_AVG_METRICS`.
- `client_work`: `(<float32[P,H], B*> -> ClientOutput)`
- `client_contribution`: `(ClientOutput -> <sums=<...>, mins=<...>, maxs=<...>>)`
- `server_step`: `(<S, sums, mins, maxs> -> <S, M>)`
- `server_init`: `( -> S)`
"""

from __future__ import annotations

import collections
import enum
from typing import Any, Callable, NamedTuple, Union

import tensorflow as tf
import tensorflow_federated as tff

from fedprompt import _federated_common as common
from fedprompt import client_update as client_update_lib
from fedprompt import server_update as server_update_lib
from optimizers import ClientOptimizer, ServerOptimizer, build_client_optimizer

# Metric names of FedAvg's `next`, all computed at the server over the round's clients.
FED_AVG_METRICS = collections.OrderedDict(
    train_loss="token-weighted mean training loss over finite clients (NaN if none)",
    grad_norm_mean="mean over finite clients of ClientOutput.grad_norm (NaN if none)",
    grad_norm_min="min over finite clients of ClientOutput.grad_norm (NaN if none)",
    grad_norm_max="max over finite clients of ClientOutput.grad_norm (NaN if none)",
    update_norm_mean="mean over finite clients of ||client delta|| (NaN if none)",
    update_norm_min="min over finite clients of ||client delta|| (NaN if none)",
    update_norm_max="max over finite clients of ||client delta|| (NaN if none)",
    num_clients="int64, clients in the round",
    num_nonfinite_clients="int64, clients excluded for a non-finite delta/loss/gradient",
    num_examples="int64, examples processed by the finite clients (over all local steps)",
    num_tokens="float32, target tokens processed by the finite clients",
    server_update_norm="||new prompt - old prompt|| (0 when no update was applied)",
    update_applied="bool, False when no client had a usable update (state unchanged)",
)


class ClientWeighting(enum.Enum):
    """How client deltas are weighted in the server average."""

    # Examples processed in local training (tff.learning's default).
    NUM_EXAMPLES = "num_examples"
    # Target tokens processed in local training.
    NUM_TOKENS = "num_tokens"
    # 1 per client that processed at least one example (empty clients get 0).
    UNIFORM = "uniform"


class FedAvgComponents(NamedTuple):
    """The computations `build_fed_avg` composes (see the module docstring)."""

    server_init: tff.Computation
    client_work: tff.Computation
    client_contribution: tff.Computation
    server_step: tff.Computation
    initialize: tff.Computation
    next: tff.Computation


def _resolve_client_optimizer_fn(
    client_optimizer: Union[ClientOptimizer, Callable[[], tf.keras.optimizers.Optimizer]],
    *,
    client_learning_rate: float | None,
    client_momentum: float | None,
) -> Callable[[], tf.keras.optimizers.Optimizer]:
    if isinstance(client_optimizer, ClientOptimizer):
        if client_learning_rate is None:
            raise ValueError(
                f"`client_learning_rate` is required with client_optimizer={client_optimizer}."
            )
        # Build once now so that bad hyperparameters fail at construction, not in TFF.
        build_client_optimizer(
            client_optimizer, learning_rate=client_learning_rate, momentum=client_momentum
        )
        return lambda: build_client_optimizer(
            client_optimizer, learning_rate=client_learning_rate, momentum=client_momentum
        )
    if callable(client_optimizer):
        if client_learning_rate is not None or client_momentum is not None:
            raise ValueError(
                "`client_learning_rate` / `client_momentum` must be None when "
                "`client_optimizer` is a callable returning a tf.keras optimizer, got "
                f"client_learning_rate={client_learning_rate!r}, "
                f"client_momentum={client_momentum!r}."
            )
        return client_optimizer
    raise TypeError(
        "`client_optimizer` must be a ClientOptimizer or a zero-argument callable "
        f"returning a tf.keras optimizer, got {client_optimizer!r}."
    )


def build_client_work(
    *,
    model_fn: Callable[[], client_update_lib.PromptLoss],
    prompt_shape: tuple[int, int],
    batch_spec: collections.OrderedDict,
    client_optimizer_fn: Callable[[], tf.keras.optimizers.Optimizer],
    local_epochs: int | None = 1,
    local_steps: int | None = None,
    clip_norm: float | None = None,
) -> tff.Computation:
    """`(<float32[P,H], B*> -> ClientOutput)`: one client's local training.

    `model_fn()` and `client_optimizer_fn()` are called inside the computation,
    so the backbone's variables (restored there from a checkpoint) and the
    optimizer's slots live in the client's graph and never cross the wire.
    """
    prompt_shape = common.check_prompt_shape(prompt_shape)
    batch_spec = common.check_batch_spec(batch_spec)
    client_update_lib.check_local_schedule(num_epochs=local_epochs, max_steps=local_steps)
    client_update_lib.check_clip_norm(clip_norm)

    @tff.tensorflow.computation(
        tf.TensorSpec(prompt_shape, tf.float32), common.sequence_type(batch_spec)
    )
    def client_work(prompt, dataset):
        loss_fn = model_fn()
        prompt_variable = tf.Variable(
            tf.zeros(prompt_shape, tf.float32), trainable=True, name="prompt"
        )
        optimizer = client_optimizer_fn()
        optimizer.build([prompt_variable])

        @tf.function
        def train(initial_prompt, data):
            return client_update_lib.client_update(
                loss_fn=loss_fn,
                prompt_variable=prompt_variable,
                initial_prompt=initial_prompt,
                dataset=data,
                optimizer=optimizer,
                num_epochs=local_epochs,
                max_steps=local_steps,
                clip_norm=clip_norm,
            )

        return train(prompt, dataset)

    return client_work


def compute_client_contribution(
    output: client_update_lib.ClientOutput, *, client_weighting: ClientWeighting
) -> collections.OrderedDict:
    """Pure TF body of `build_client_contribution` (also used by the XLA runtime)."""
    finite = output.is_finite
    finite_f = tf.cast(finite, tf.float32)
    if client_weighting == ClientWeighting.NUM_EXAMPLES:
        weight = tf.cast(output.num_examples, tf.float32)
    elif client_weighting == ClientWeighting.NUM_TOKENS:
        weight = output.num_tokens
    else:
        weight = tf.cast(output.num_examples > 0, tf.float32)
    weight = weight * finite_f
    delta = tf.where(finite, output.prompt_delta, tf.zeros_like(output.prompt_delta))
    zero = tf.constant(0.0)
    sums = collections.OrderedDict(
        weighted_delta=weight * delta,
        weight=weight,
        loss_sum=tf.where(finite, output.loss_mean * output.num_tokens, zero),
        num_tokens=tf.where(finite, output.num_tokens, zero),
        num_examples=tf.where(finite, output.num_examples, tf.constant(0, tf.int64)),
        grad_norm=tf.where(finite, output.grad_norm, zero),
        update_norm=tf.where(finite, output.update_norm, zero),
        num_finite=tf.cast(finite, tf.int64),
        num_clients=tf.constant(1, tf.int64),
    )
    mins, maxs = common.masked_min_max(
        collections.OrderedDict(grad_norm=output.grad_norm, update_norm=output.update_norm),
        finite,
    )
    return collections.OrderedDict(sums=sums, mins=mins, maxs=maxs)


def build_client_contribution(
    *, client_output_type: tff.Type, client_weighting: ClientWeighting
) -> tff.Computation:
    """`(ClientOutput -> <sums, mins, maxs>)`: what each client adds to the aggregates.

    `sums` (federated_sum): weighted delta, weight, loss sum, tokens, examples,
    norms, counts; non-finite clients contribute zeros except `num_clients`.
    `mins` / `maxs` (federated_min / max): the norms, +inf / -inf for
    non-finite clients so they never win.
    """
    if not isinstance(client_weighting, ClientWeighting):
        raise TypeError(f"`client_weighting` must be a ClientWeighting, got {client_weighting!r}.")

    @tff.tensorflow.computation(client_output_type)
    def client_contribution(output):
        return compute_client_contribution(
            client_update_lib.ClientOutput(*output), client_weighting=client_weighting
        )

    return client_contribution


def compute_server_step(
    *,
    server_optimizer: tff.learning.optimizers.Optimizer,
    state: server_update_lib.ServerState,
    aggregates: collections.OrderedDict,
) -> tuple[server_update_lib.ServerState, collections.OrderedDict]:
    """Pure TF body of `build_server_step` (also used by the XLA runtime)."""
    sums = aggregates["sums"]
    apply_update = tf.logical_and(sums["num_finite"] > 0, sums["weight"] > 0)
    mean_delta = tf.math.divide_no_nan(sums["weighted_delta"], sums["weight"])
    new_state = server_update_lib.server_update(
        server_optimizer=server_optimizer,
        state=state,
        gradient=-mean_delta,
        apply_update=apply_update,
    )
    metrics = common.round_metrics(
        aggregates,
        client_norms=("grad_norm", "update_norm"),
        server_metrics=collections.OrderedDict(),
        old_prompt=state.prompt,
        new_prompt=new_state.prompt,
        update_applied=apply_update,
    )
    return new_state, metrics


def build_server_step(
    *,
    server_optimizer: tff.learning.optimizers.Optimizer,
    state_type: tff.Type,
    aggregates_type: tff.Type,
) -> tff.Computation:
    """`(<S, <sums, mins, maxs>> -> <S, M>)`: the server optimizer step and metrics."""

    @tff.tensorflow.computation(state_type, aggregates_type)
    def server_step(state, aggregates):
        return compute_server_step(
            server_optimizer=server_optimizer,
            state=server_update_lib.ServerState(*state),
            aggregates=aggregates,
        )

    return server_step


def build_fed_avg_components(
    *,
    model_fn: Callable[[], client_update_lib.PromptLoss],
    prompt_shape: tuple[int, int],
    batch_spec: collections.OrderedDict,
    initial_prompt: Any | None = None,
    initial_prompt_fn: Callable[[], tf.Tensor] | None = None,
    client_optimizer: Union[
        ClientOptimizer, Callable[[], tf.keras.optimizers.Optimizer]
    ] = ClientOptimizer.SGD,
    client_learning_rate: float | None = None,
    client_momentum: float | None = None,
    local_epochs: int | None = 1,
    local_steps: int | None = None,
    clip_norm: float | None = None,
    server_optimizer: Union[
        ServerOptimizer, tff.learning.optimizers.Optimizer
    ] = ServerOptimizer.SGD,
    server_learning_rate: float | None = None,
    server_momentum: float | None = None,
    client_weighting: ClientWeighting = ClientWeighting.NUM_EXAMPLES,
) -> FedAvgComponents:
    """Builds every FedAvg computation; arguments as in `build_fed_avg`."""
    prompt_shape = common.check_prompt_shape(prompt_shape)
    batch_spec = common.check_batch_spec(batch_spec)
    if not isinstance(client_weighting, ClientWeighting):
        raise TypeError(
            "`client_weighting` must be a ClientWeighting "
            f"({[w.name for w in ClientWeighting]}), got {client_weighting!r}."
        )
    init_fn = common.resolve_initial_prompt_fn(
        prompt_shape=prompt_shape,
        initial_prompt=initial_prompt,
        initial_prompt_fn=initial_prompt_fn,
    )
    client_optimizer_fn = _resolve_client_optimizer_fn(
        client_optimizer,
        client_learning_rate=client_learning_rate,
        client_momentum=client_momentum,
    )
    server_opt = common.resolve_server_optimizer(
        server_optimizer,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
    )

    server_init = common.build_server_init(
        server_optimizer=server_opt, prompt_shape=prompt_shape, initial_prompt_fn=init_fn
    )
    client_work = build_client_work(
        model_fn=model_fn,
        prompt_shape=prompt_shape,
        batch_spec=batch_spec,
        client_optimizer_fn=client_optimizer_fn,
        local_epochs=local_epochs,
        local_steps=local_steps,
        clip_norm=clip_norm,
    )
    client_contribution = build_client_contribution(
        client_output_type=client_work.type_signature.result,
        client_weighting=client_weighting,
    )
    state_type = server_init.type_signature.result
    server_step = build_server_step(
        server_optimizer=server_opt,
        state_type=state_type,
        aggregates_type=client_contribution.type_signature.result,
    )
    initialize = common.federated_initialize(server_init)

    @tff.federated_computation(
        tff.FederatedType(state_type, tff.SERVER),
        tff.FederatedType(common.sequence_type(batch_spec), tff.CLIENTS),
    )
    def next_fn(state, client_data):
        prompt_at_clients = tff.federated_broadcast(state.prompt)
        outputs = tff.federated_map(client_work, (prompt_at_clients, client_data))
        contributions = tff.federated_map(client_contribution, outputs)
        aggregates = collections.OrderedDict(
            sums=tff.federated_sum(contributions.sums),
            mins=tff.federated_min(contributions.mins),
            maxs=tff.federated_max(contributions.maxs),
        )
        result = tff.federated_map(server_step, (state, tff.federated_zip(aggregates)))
        return result[0], result[1]

    return FedAvgComponents(
        server_init=server_init,
        client_work=client_work,
        client_contribution=client_contribution,
        server_step=server_step,
        initialize=initialize,
        next=next_fn,
    )


def build_fed_avg(
    *,
    model_fn: Callable[[], client_update_lib.PromptLoss],
    prompt_shape: tuple[int, int],
    batch_spec: collections.OrderedDict,
    initial_prompt: Any | None = None,
    initial_prompt_fn: Callable[[], tf.Tensor] | None = None,
    client_optimizer: Union[
        ClientOptimizer, Callable[[], tf.keras.optimizers.Optimizer]
    ] = ClientOptimizer.SGD,
    client_learning_rate: float | None = None,
    client_momentum: float | None = None,
    local_epochs: int | None = 1,
    local_steps: int | None = None,
    clip_norm: float | None = None,
    server_optimizer: Union[
        ServerOptimizer, tff.learning.optimizers.Optimizer
    ] = ServerOptimizer.SGD,
    server_learning_rate: float | None = None,
    server_momentum: float | None = None,
    client_weighting: ClientWeighting = ClientWeighting.NUM_EXAMPLES,
) -> tff.templates.IterativeProcess:
    """FedAvg of a soft prompt, as a `tff.templates.IterativeProcess`.

    Args:
      model_fn: zero-argument callable returning a `PromptLoss`; called inside
        the client computation (it may create and restore frozen variables).
      prompt_shape: `(P, H)`.
      batch_spec: element spec of client datasets,
        `fedprompt.data_types.batch_spec(T)`.
      initial_prompt: `[P, H]` array, or
      initial_prompt_fn: zero-argument callable returning a `[P, H]` float32
        tensor, run inside the `initialize` TF computation (exactly one).
      client_optimizer: a `ClientOptimizer` (with `client_learning_rate` and, for
        SGDM, optional `client_momentum`, default 0.9), or a zero-argument
        callable returning a new tf.keras optimizer (then both None).
      local_epochs: passes over the local data per round (None: until
        `local_steps`).
      local_steps: optional cap on local steps per round.
      clip_norm: optional per-step gradient L2-norm bound.
      server_optimizer: a `ServerOptimizer` (with `server_learning_rate`; None
        means 1.0 for SGD and is an error otherwise; for SGDM optional
        `server_momentum`, default 0.9), or a built
        `tff.learning.optimizers.Optimizer` (then both None).
      client_weighting: `ClientWeighting`, default NUM_EXAMPLES.

    Returns:
      `initialize: ( -> S@SERVER)` and
      `next: (<S@SERVER, {B*}@CLIENTS> -> <S@SERVER, M@SERVER>)`, `S` a
      `ServerState`, `M` the metrics `OrderedDict` of `FED_AVG_METRICS`.
    """
    components = build_fed_avg_components(
        model_fn=model_fn,
        prompt_shape=prompt_shape,
        batch_spec=batch_spec,
        initial_prompt=initial_prompt,
        initial_prompt_fn=initial_prompt_fn,
        client_optimizer=client_optimizer,
        client_learning_rate=client_learning_rate,
        client_momentum=client_momentum,
        local_epochs=local_epochs,
        local_steps=local_steps,
        clip_norm=clip_norm,
        server_optimizer=server_optimizer,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
        client_weighting=client_weighting,
    )
    return tff.templates.IterativeProcess(components.initialize, components.next)
