"""Validation and small TFF helpers shared by `fed_avg` and `fed_sgd`."""

from __future__ import annotations

import collections
import numbers
from typing import Any, Callable, Sequence, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedprompt import server_update as server_update_lib
from optimizers import ServerOptimizer, build_server_optimizer

INF = float("inf")


def check_prompt_shape(prompt_shape: Any) -> tuple[int, int]:
    shape = tuple(prompt_shape) if isinstance(prompt_shape, (tuple, list)) else None
    if (
        shape is None
        or len(shape) != 2
        or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape)
        or min(shape) < 1
    ):
        raise ValueError(
            "`prompt_shape` must be (prompt_length, hidden_size) with both >= 1, "
            f"got {prompt_shape!r}."
        )
    return int(shape[0]), int(shape[1])


def check_batch_spec(batch_spec: Any) -> collections.OrderedDict:
    if not isinstance(batch_spec, collections.OrderedDict) or not all(
        isinstance(s, tf.TensorSpec) for s in batch_spec.values()
    ):
        raise TypeError(
            "`batch_spec` must be an OrderedDict of tf.TensorSpec, e.g. "
            f"fedprompt.data_types.batch_spec(sequence_length), got {batch_spec!r}."
        )
    return batch_spec


def sequence_type(batch_spec: collections.OrderedDict) -> tff.SequenceType:
    """`tff.SequenceType` of client datasets with elements `batch_spec`."""
    return tff.SequenceType(tff.types.tensorflow_to_type(batch_spec))


def resolve_initial_prompt_fn(
    *,
    prompt_shape: tuple[int, int],
    initial_prompt: Any | None,
    initial_prompt_fn: Callable[[], tf.Tensor] | None,
) -> Callable[[], tf.Tensor]:
    """Exactly one of the two; an array is checked against `prompt_shape` now."""
    if (initial_prompt is None) == (initial_prompt_fn is None):
        raise ValueError(
            "Exactly one of `initial_prompt` (a [P, H] array) and `initial_prompt_fn` "
            "(a zero-argument callable returning a [P, H] float32 tensor) must be set, got "
            f"initial_prompt={'set' if initial_prompt is not None else None}, "
            f"initial_prompt_fn={initial_prompt_fn!r}."
        )
    if initial_prompt_fn is not None:
        if not callable(initial_prompt_fn):
            raise TypeError(f"`initial_prompt_fn` must be callable, got {initial_prompt_fn!r}.")
        return initial_prompt_fn
    value = np.asarray(initial_prompt, dtype=np.float32)
    if value.shape != prompt_shape:
        raise ValueError(
            f"`initial_prompt` must have shape `prompt_shape` {prompt_shape}, got {value.shape}."
        )
    if not np.all(np.isfinite(value)):
        raise ValueError("`initial_prompt` must be finite, got NaN or inf entries.")
    return lambda: tf.constant(value)


def resolve_server_optimizer(
    server_optimizer: Union[ServerOptimizer, tff.learning.optimizers.Optimizer],
    *,
    server_learning_rate: float | None,
    server_momentum: float | None,
) -> tff.learning.optimizers.Optimizer:
    """An Enum plus hyperparameters, or a ready `tff.learning.optimizers.Optimizer`.

    `server_learning_rate=None` means 1.0 for `ServerOptimizer.SGD` (plain FedAvg)
    and is an error for the other kinds.
    """
    if isinstance(server_optimizer, tff.learning.optimizers.Optimizer):
        if server_learning_rate is not None or server_momentum is not None:
            raise ValueError(
                "`server_learning_rate` / `server_momentum` must be None when "
                "`server_optimizer` is an already built tff.learning optimizer, got "
                f"server_learning_rate={server_learning_rate!r}, "
                f"server_momentum={server_momentum!r}."
            )
        return server_optimizer
    if not isinstance(server_optimizer, ServerOptimizer):
        raise TypeError(
            "`server_optimizer` must be a ServerOptimizer or a "
            f"tff.learning.optimizers.Optimizer, got {server_optimizer!r}."
        )
    if server_learning_rate is None and server_optimizer == ServerOptimizer.SGD:
        server_learning_rate = 1.0  # plain FedAvg: add the mean client delta
    if server_learning_rate is None:
        raise ValueError(
            f"`server_learning_rate` is required with server_optimizer={server_optimizer}; "
            "pass 1.0 with ServerOptimizer.SGD for plain FedAvg."
        )
    return build_server_optimizer(
        server_optimizer, learning_rate=server_learning_rate, momentum=server_momentum
    )


def build_server_init(
    *,
    server_optimizer: tff.learning.optimizers.Optimizer,
    prompt_shape: tuple[int, int],
    initial_prompt_fn: Callable[[], tf.Tensor],
) -> tff.Computation:
    """`( -> ServerState)`: an unplaced TF computation creating the initial state."""

    @tff.tensorflow.computation
    def server_init():
        prompt = tf.ensure_shape(
            tf.cast(initial_prompt_fn(), tf.float32), prompt_shape, name="initial_prompt"
        )
        return server_update_lib.initial_server_state(
            server_optimizer=server_optimizer, initial_prompt=prompt
        )

    return server_init


def federated_initialize(server_init: tff.Computation) -> tff.Computation:
    """`( -> ServerState@SERVER)`."""

    @tff.federated_computation
    def initialize():
        return tff.federated_eval(server_init, tff.SERVER)

    return initialize


def masked_min_max(
    values: collections.OrderedDict, is_finite: tf.Tensor
) -> tuple[collections.OrderedDict, collections.OrderedDict]:
    """Client-side inputs of federated_min / federated_max that skip non-finite clients."""
    mins = collections.OrderedDict(
        (k, tf.where(is_finite, v, tf.constant(INF))) for k, v in values.items()
    )
    maxs = collections.OrderedDict(
        (k, tf.where(is_finite, v, tf.constant(-INF))) for k, v in values.items()
    )
    return mins, maxs


def aggregate_contributions(
    contributions: Sequence[collections.OrderedDict],
) -> collections.OrderedDict:
    """`<sums, mins, maxs>` over clients in pure TF: what federated_sum/min/max give in TFF.

    Used by the XLA runtime, which has no TFF intrinsics; clients are added in
    the given order.
    """
    if not contributions:
        raise ValueError("A round needs at least one client, got none.")
    reduce = dict(sums=tf.add_n, mins=tf.reduce_min, maxs=tf.reduce_max)
    return collections.OrderedDict(
        (
            part,
            tf.nest.map_structure(
                lambda *xs, fn=fn: fn(list(xs)) if fn is tf.add_n else fn(tf.stack(xs), axis=0),
                *[c[part] for c in contributions],
            ),
        )
        for part, fn in reduce.items()
    )


def nan_unless(has_value: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
    """`value` if `has_value`, else NaN: statistics over no finite client are undefined."""
    return tf.where(has_value, value, tf.constant(float("nan")))


def round_metrics(
    aggregates: collections.OrderedDict,
    *,
    client_norms: Sequence[str],
    server_metrics: collections.OrderedDict,
    old_prompt: tf.Tensor,
    new_prompt: tf.Tensor,
    update_applied: tf.Tensor,
) -> collections.OrderedDict:
    """A round's metrics, in the order the TFF types and CSV columns fix.

    `train_loss`; `{name}_mean/_min/_max` over finite clients for each of
    `client_norms` (summed, min- and max-aggregated by the clients); then
    `server_metrics`; then the counts, `server_update_norm` and `update_applied`.
    Statistics over no finite client are NaN.
    """
    sums, mins, maxs = aggregates["sums"], aggregates["mins"], aggregates["maxs"]
    has_finite = sums["num_finite"] > 0
    num_finite = tf.cast(sums["num_finite"], tf.float32)
    metrics = collections.OrderedDict(
        train_loss=nan_unless(
            has_finite, tf.math.divide_no_nan(sums["loss_sum"], sums["num_tokens"])
        )
    )
    for name in client_norms:
        metrics[f"{name}_mean"] = nan_unless(
            has_finite, tf.math.divide_no_nan(sums[name], num_finite)
        )
        metrics[f"{name}_min"] = nan_unless(has_finite, mins[name])
        metrics[f"{name}_max"] = nan_unless(has_finite, maxs[name])
    metrics.update(server_metrics)
    metrics["num_clients"] = sums["num_clients"]
    metrics["num_nonfinite_clients"] = sums["num_clients"] - sums["num_finite"]
    metrics["num_examples"] = sums["num_examples"]
    metrics["num_tokens"] = sums["num_tokens"]
    metrics["server_update_norm"] = tf.norm(new_prompt - old_prompt)
    metrics["update_applied"] = update_applied
    return metrics


def tensor_shapes(type_spec: tff.Type) -> Sequence[tuple[str, tuple[int, ...]]]:
    return server_update_lib.tensor_shapes(type_spec)
