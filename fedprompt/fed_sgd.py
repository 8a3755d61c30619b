"""FedSGD for soft prompts: one exact full-batch gradient step per round.

Each round every sampled client computes, at the broadcast prompt, the gradient
of its *summed* token loss over all its local data and its token count
(`fedsgd_client_gradient`); the server forms

    g = sum_i gradient_sum_i / sum_i num_tokens_i,

the exact gradient of the token-mean loss over the union of the finite
clients' data (equivalently the per-client mean gradients weighted by token
count), and applies the server optimizer to it (SGD: `P <- P - lr * g`).
Non-finite clients are excluded and counted; if none is usable (or no client
has a target token) the state is returned unchanged.

TFF type signatures (`S` = `ServerState`, the same type as FedAvg's for the
same server optimizer):
- `initialize`: `( -> S@SERVER)`
- `next`: `(<state=S@SERVER, client_data={B*}@CLIENTS> -> <S@SERVER, M@SERVER>)`,
  `M` the metrics `OrderedDict` of `FED_SGD_METRICS`.
- `client_work`: `(<float32[P,H], B*> -> FedSGDClientOutput)`
- `client_contribution`: `(FedSGDClientOutput -> <sums, mins, maxs>)`
- `server_step`: `(<S, <sums, mins, maxs>> -> <S, M>)`
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple, Union

import tensorflow as tf
import tensorflow_federated as tff

from fedprompt import _federated_common as common
from fedprompt import client_update as client_update_lib
from fedprompt import server_update as server_update_lib
from optimizers import ServerOptimizer

FED_SGD_METRICS = collections.OrderedDict(
    train_loss="token-mean loss at the broadcast prompt over finite clients (NaN if none)",
    grad_norm_mean="mean over finite clients of ||client token-mean gradient|| (NaN if none)",
    grad_norm_min="min of the same (NaN if none)",
    grad_norm_max="max of the same (NaN if none)",
    server_grad_norm="||g||, the norm of the exact union gradient (NaN if none)",
    num_clients="int64, clients in the round",
    num_nonfinite_clients="int64, clients excluded for a non-finite gradient or loss",
    num_examples="int64, examples of the finite clients",
    num_tokens="float32, target tokens of the finite clients",
    server_update_norm="||new prompt - old prompt|| (0 when no update was applied)",
    update_applied="bool, False when no client had a usable gradient (state unchanged)",
)


class FedSGDComponents(NamedTuple):
    """The computations `build_fed_sgd` composes (see the module docstring)."""

    server_init: tff.Computation
    client_work: tff.Computation
    client_contribution: tff.Computation
    server_step: tff.Computation
    initialize: tff.Computation
    next: tff.Computation


def build_client_work(
    *,
    model_fn: Callable[[], client_update_lib.PromptLoss],
    prompt_shape: tuple[int, int],
    batch_spec: collections.OrderedDict,
) -> tff.Computation:
    """`(<float32[P,H], B*> -> FedSGDClientOutput)`; `model_fn()` runs inside."""
    prompt_shape = common.check_prompt_shape(prompt_shape)
    batch_spec = common.check_batch_spec(batch_spec)

    @tff.tensorflow.computation(
        tf.TensorSpec(prompt_shape, tf.float32), common.sequence_type(batch_spec)
    )
    def client_work(prompt, dataset):
        loss_fn = model_fn()

        @tf.function
        def gradient(p, data):
            return client_update_lib.fedsgd_client_gradient(loss_fn=loss_fn, prompt=p, dataset=data)

        return gradient(prompt, dataset)

    return client_work


def compute_client_contribution(
    output: client_update_lib.FedSGDClientOutput,
) -> collections.OrderedDict:
    """Pure TF body of `build_client_contribution` (also used by the XLA runtime)."""
    finite = output.is_finite
    zero = tf.constant(0.0)
    sums = collections.OrderedDict(
        gradient_sum=tf.where(finite, output.gradient_sum, tf.zeros_like(output.gradient_sum)),
        loss_sum=tf.where(finite, output.loss_sum, zero),
        num_tokens=tf.where(finite, output.num_tokens, zero),
        num_examples=tf.where(finite, output.num_examples, tf.constant(0, tf.int64)),
        grad_norm=tf.where(finite, output.grad_norm, zero),
        num_finite=tf.cast(finite, tf.int64),
        num_clients=tf.constant(1, tf.int64),
    )
    mins, maxs = common.masked_min_max(collections.OrderedDict(grad_norm=output.grad_norm), finite)
    return collections.OrderedDict(sums=sums, mins=mins, maxs=maxs)


def build_client_contribution(*, client_output_type: tff.Type) -> tff.Computation:
    """`(FedSGDClientOutput -> <sums, mins, maxs>)`; non-finite clients add zeros."""

    @tff.tensorflow.computation(client_output_type)
    def client_contribution(output):
        return compute_client_contribution(client_update_lib.FedSGDClientOutput(*output))

    return client_contribution


def compute_server_step(
    *,
    server_optimizer: tff.learning.optimizers.Optimizer,
    state: server_update_lib.ServerState,
    aggregates: collections.OrderedDict,
) -> tuple[server_update_lib.ServerState, collections.OrderedDict]:
    """Pure TF body of `build_server_step` (also used by the XLA runtime)."""
    sums = aggregates["sums"]
    has_finite = sums["num_finite"] > 0
    apply_update = tf.logical_and(has_finite, sums["num_tokens"] > 0)
    gradient = tf.math.divide_no_nan(sums["gradient_sum"], sums["num_tokens"])
    new_state = server_update_lib.server_update(
        server_optimizer=server_optimizer,
        state=state,
        gradient=gradient,
        apply_update=apply_update,
    )
    metrics = common.round_metrics(
        aggregates,
        client_norms=("grad_norm",),
        server_metrics=collections.OrderedDict(
            server_grad_norm=common.nan_unless(has_finite, tf.norm(gradient))
        ),
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
    """`(<S, <sums, mins, maxs>> -> <S, M>)`: one step on the exact union gradient."""

    @tff.tensorflow.computation(state_type, aggregates_type)
    def server_step(state, aggregates):
        return compute_server_step(
            server_optimizer=server_optimizer,
            state=server_update_lib.ServerState(*state),
            aggregates=aggregates,
        )

    return server_step


def resolve_server_optimizer(
    server_optimizer: Union[ServerOptimizer, tff.learning.optimizers.Optimizer],
    *,
    server_learning_rate: float | None,
    server_momentum: float | None,
) -> tff.learning.optimizers.Optimizer:
    """`common.resolve_server_optimizer`, with the learning rate required.

    Unlike FedAvg's pseudo-gradient, a gradient has no natural step size.
    """
    if isinstance(server_optimizer, ServerOptimizer) and server_learning_rate is None:
        raise ValueError(
            "`server_learning_rate` is required for FedSGD (the step size on the mean "
            "gradient), got None; pass e.g. 0.1."
        )
    return common.resolve_server_optimizer(
        server_optimizer,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
    )


def build_fed_sgd_components(
    *,
    model_fn: Callable[[], client_update_lib.PromptLoss],
    prompt_shape: tuple[int, int],
    batch_spec: collections.OrderedDict,
    initial_prompt: Any | None = None,
    initial_prompt_fn: Callable[[], tf.Tensor] | None = None,
    server_optimizer: Union[
        ServerOptimizer, tff.learning.optimizers.Optimizer
    ] = ServerOptimizer.SGD,
    server_learning_rate: float | None = None,
    server_momentum: float | None = None,
) -> FedSGDComponents:
    """Builds every FedSGD computation; arguments as in `build_fed_sgd`."""
    prompt_shape = common.check_prompt_shape(prompt_shape)
    batch_spec = common.check_batch_spec(batch_spec)
    init_fn = common.resolve_initial_prompt_fn(
        prompt_shape=prompt_shape,
        initial_prompt=initial_prompt,
        initial_prompt_fn=initial_prompt_fn,
    )
    server_opt = resolve_server_optimizer(
        server_optimizer,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
    )
    server_init = common.build_server_init(
        server_optimizer=server_opt, prompt_shape=prompt_shape, initial_prompt_fn=init_fn
    )
    client_work = build_client_work(
        model_fn=model_fn, prompt_shape=prompt_shape, batch_spec=batch_spec
    )
    client_contribution = build_client_contribution(
        client_output_type=client_work.type_signature.result
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

    return FedSGDComponents(
        server_init=server_init,
        client_work=client_work,
        client_contribution=client_contribution,
        server_step=server_step,
        initialize=initialize,
        next=next_fn,
    )


def build_fed_sgd(
    *,
    model_fn: Callable[[], client_update_lib.PromptLoss],
    prompt_shape: tuple[int, int],
    batch_spec: collections.OrderedDict,
    initial_prompt: Any | None = None,
    initial_prompt_fn: Callable[[], tf.Tensor] | None = None,
    server_optimizer: Union[
        ServerOptimizer, tff.learning.optimizers.Optimizer
    ] = ServerOptimizer.SGD,
    server_learning_rate: float | None = None,
    server_momentum: float | None = None,
) -> tff.templates.IterativeProcess:
    """FedSGD of a soft prompt, as a `tff.templates.IterativeProcess`.

    Args:
      model_fn, prompt_shape, batch_spec, initial_prompt, initial_prompt_fn: as
        in `fedprompt.fed_avg.build_fed_avg`.
      server_optimizer: a `ServerOptimizer` (then `server_learning_rate` is
        required; SGDM takes optional `server_momentum`, default 0.9) or a built
        `tff.learning.optimizers.Optimizer` (then both None).

    Returns:
      `initialize: ( -> S@SERVER)` and
      `next: (<S@SERVER, {B*}@CLIENTS> -> <S@SERVER, M@SERVER>)`, `S` a
      `ServerState`, `M` the metrics `OrderedDict` of `FED_SGD_METRICS`.
    """
    components = build_fed_sgd_components(
        model_fn=model_fn,
        prompt_shape=prompt_shape,
        batch_spec=batch_spec,
        initial_prompt=initial_prompt,
        initial_prompt_fn=initial_prompt_fn,
        server_optimizer=server_optimizer,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
    )
    return tff.templates.IterativeProcess(components.initialize, components.next)
