"""Pure-TF client computations: local prompt training (FedAvg) and the FedSGD gradient.

Nothing here depends on TFF: these functions run eagerly, inside a
`tf.function` (with or without `jit_compile`), or inside a
`tff.tensorflow.computation` (see `fedprompt.fed_avg` and `fedprompt.fed_sgd`).

The model is seen only through a `PromptLoss`: a callable
`(prompt [P, H] float32, batch) -> (loss_sum, num_tokens)` where `loss_sum` is the
summed token cross-entropy over the batch's target tokens and `num_tokens` the
number of those tokens (both float32 scalars). The per-step objective is the
token mean `loss_sum / num_tokens` (0 for a batch without target tokens), the
same reduction a `tff.learning` model's `forward_pass(...).loss` would report.
"""

from __future__ import annotations

import collections
import math
import numbers
from typing import Callable, NamedTuple, Protocol, Union

import tensorflow as tf

Batch = collections.OrderedDict  # token_ids / padding_mask / target_mask, each [B, T]


def iterate_batches(dataset: tf.data.Dataset):
    """`iter(dataset)`: loop over this, not over the dataset, in a `tf.function`.

    Inside a `tf.function`, autograph turns `for batch in dataset` into
    `dataset.reduce`, whose body runs as a tf.data function, outside the graph
    optimizations and intra-op threads of the enclosing function: 16 train steps
    of the tiny backbone took 1.66 s that way against 0.38 s as 16 separate
    `tf.function` calls (2-core CPU, `python -m bench.bench_client_loop`). Over an
    iterator, autograph emits a `tf.while_loop` in the enclosing function
    instead (0.38 s). Eagerly, both
    are a Python loop. Needs eager mode or a `tf.function` (TFF's builders wrap
    their client work in one).
    """
    return iter(dataset)


class PromptLoss(Protocol):
    """Loss of the frozen model with a soft prompt; differentiable in `prompt`.

    Args:
      prompt: float32 `[P, H]` (a tensor or a `tf.Variable`).
      batch: an `OrderedDict` with `token_ids` int32 `[B, T]`, `padding_mask`
        bool `[B, T]` and `target_mask` bool `[B, T]` (`fedprompt.data_types`).

    Returns:
      `(loss_sum, num_tokens)`: float32 scalars, the summed cross-entropy over
      the target tokens and how many target tokens there are.
    """

    def __call__(self, prompt: tf.Tensor, batch: Batch) -> tuple[tf.Tensor, tf.Tensor]: ...


class ClientOutput(NamedTuple):
    """What one client's local training produces (all tensors).

    Attributes:
      prompt_delta: float32 `[P, H]`, trained prompt minus initial prompt.
      num_examples: int64 scalar, examples processed during training, summed over
        steps (a client that runs 2 epochs over 5 examples reports 10), as in
        `tff.learning`'s FedAvg.
      num_tokens: float32 scalar, target tokens processed, summed over steps.
      num_steps: int64 scalar, optimizer steps taken.
      loss_mean: float32 scalar, token-weighted mean training loss over all steps,
        each batch's loss taken before its update and *without* the L2 term:
        `sum_steps loss_sum / sum_steps num_tokens` (0 if no tokens).
      grad_norm: float32 scalar, mean over steps of the L2 norm of the gradient
        of the step objective (token-mean loss + L2 term) before clipping
        (0 if no steps).
      update_norm: float32 scalar, `||prompt_delta||_2`.
      is_finite: bool scalar, True iff `prompt_delta`, `loss_mean` and
        `grad_norm` are all finite.
    """

    prompt_delta: tf.Tensor
    num_examples: tf.Tensor
    num_tokens: tf.Tensor
    num_steps: tf.Tensor
    loss_mean: tf.Tensor
    grad_norm: tf.Tensor
    update_norm: tf.Tensor
    is_finite: tf.Tensor


class FedSGDClientOutput(NamedTuple):
    """One client's contribution to an exact full-batch gradient (all tensors).

    With `L(P) = sum_{clients, tokens} ce / sum_{clients} num_tokens` the token-mean
    loss over the union of the clients' data, the server forms the exact gradient
    `grad L = sum_i gradient_sum_i / sum_i num_tokens_i`, i.e. the mean of the
    per-client mean gradients `gradient_sum_i / num_tokens_i` weighted by
    `num_tokens_i`.

    Attributes:
      gradient_sum: float32 `[P, H]`, gradient of the *summed* token loss
        `sum_batches loss_sum` with respect to the prompt.
      loss_sum: float32 scalar, summed token loss over the client's data.
      num_tokens: float32 scalar, number of target tokens.
      num_examples: int64 scalar, number of examples.
      grad_norm: float32 scalar, `||gradient_sum / num_tokens||_2` (the norm of
        the client's own token-mean gradient; 0 if no tokens).
      is_finite: bool scalar, True iff `gradient_sum` and `loss_sum` are finite.
    """

    gradient_sum: tf.Tensor
    loss_sum: tf.Tensor
    num_tokens: tf.Tensor
    num_examples: tf.Tensor
    grad_norm: tf.Tensor
    is_finite: tf.Tensor


def _batch_size(batch: Batch) -> tf.Tensor:
    return tf.shape(batch["token_ids"], out_type=tf.int64)[0]


def local_dataset(
    dataset: tf.data.Dataset, *, num_epochs: int | None, max_steps: int | None
) -> tf.data.Dataset:
    """The batches a client trains on: `num_epochs` passes, cut at `max_steps`.

    `num_epochs=None` repeats until `max_steps` (an empty dataset stays empty).
    """
    check_local_schedule(num_epochs=num_epochs, max_steps=max_steps)
    data = dataset.repeat() if num_epochs is None else dataset.repeat(num_epochs)
    if max_steps is not None:
        data = data.take(max_steps)
    return data


def check_local_schedule(*, num_epochs: int | None, max_steps: int | None) -> None:
    """Validates a (num_epochs, max_steps) pair; errors name the argument."""
    for name, value in (("num_epochs", num_epochs), ("max_steps", max_steps)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
        ):
            raise ValueError(f"`{name}` must be an int >= 1 or None, got {value!r}.")
    if num_epochs is None and max_steps is None:
        raise ValueError(
            "At least one of `num_epochs` and `max_steps` must be set, got both None; "
            "pass num_epochs=1 for one pass over the local data."
        )


def check_clip_norm(clip_norm: float | None) -> None:
    if clip_norm is None:
        return
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real):
        raise TypeError(f"`clip_norm` must be a float > 0 or None, got {clip_norm!r}.")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"`clip_norm` must be > 0 and finite or None, got {clip_norm!r}.")


def l2_penalty(
    prompt: tf.Tensor, reference: tf.Tensor, strength: Union[float, tf.Tensor]
) -> tf.Tensor:
    """`(strength / 2) * ||prompt - reference||_2^2`; its gradient is `strength * (P - P_ref)`."""
    diff = tf.convert_to_tensor(prompt) - tf.cast(reference, tf.float32)
    return 0.5 * tf.cast(strength, tf.float32) * tf.reduce_sum(tf.square(diff))


def client_gradient(
    *,
    loss_fn: PromptLoss,
    prompt: tf.Tensor,
    batch: Batch,
    clip_norm: float | None = None,
    l2_strength: float | tf.Tensor | None = None,
    l2_reference: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The step objective's gradient on one batch; no variables, no optimizer.

    Split from `client_train_step` so that the XLA runtime
    (`fedprompt.xla_runtime`) can compile exactly this part, which holds every
    model FLOP: under a multi-replica `tf.distribute` strategy the tf.keras
    optimizer step synchronises replicas (`merge_call`), which cannot sit inside
    an XLA function.

    Objective: `loss_sum / num_tokens` (0 without target tokens) plus, when
    `l2_strength` is not None, `(l2_strength / 2) ||P - l2_reference||^2`.

    Args:
      prompt: float32 `[P, H]`, a tensor or a `tf.Variable`.

    Returns:
      `(loss_sum, num_tokens, grad_norm, gradient)`: the batch's data loss
      (without the L2 term), its target-token count, the objective gradient's L2
      norm before clipping (float32 scalars) and the gradient `[P, H]`, clipped
      to `clip_norm` when set.
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(prompt)
        loss_sum, num_tokens = loss_fn(prompt, batch)
        loss_sum = tf.cast(loss_sum, tf.float32)
        num_tokens = tf.cast(num_tokens, tf.float32)
        objective = tf.math.divide_no_nan(loss_sum, num_tokens)
        if l2_strength is not None:
            objective += l2_penalty(prompt, l2_reference, l2_strength)
    # A loss that ignores the prompt has a zero, not a missing, gradient.
    gradient = tape.gradient(objective, prompt, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    norm = tf.norm(gradient)
    if clip_norm is not None:
        gradient = tf.clip_by_norm(gradient, clip_norm)
    return loss_sum, num_tokens, norm, gradient


def client_train_step(
    *,
    loss_fn: PromptLoss,
    prompt_variable: tf.Variable,
    batch: Batch,
    optimizer: tf.keras.optimizers.Optimizer,
    clip_norm: float | None = None,
    l2_strength: float | tf.Tensor | None = None,
    l2_reference: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One optimizer step on one batch; the body of `client_update`'s loop.

    Exposed separately because it has no dataset iteration, so it can be
    XLA-compiled (`tf.function(jit_compile=True)`) by a driver that feeds
    batches itself; a `tf.data` loop cannot be.

    The gradient is `client_gradient`'s (see there for the objective).

    Returns:
      `(loss_sum, num_tokens, grad_norm)` float32 scalars: the batch's data loss
      (before the update, without the L2 term), its target-token count, and the
      objective gradient's L2 norm before clipping.
    """
    loss_sum, num_tokens, norm, gradient = client_gradient(
        loss_fn=loss_fn,
        prompt=prompt_variable,
        batch=batch,
        clip_norm=clip_norm,
        l2_strength=l2_strength,
        l2_reference=l2_reference,
    )
    optimizer.apply_gradients([(gradient, prompt_variable)])
    return loss_sum, num_tokens, norm


def client_update(
    *,
    loss_fn: PromptLoss,
    prompt_variable: tf.Variable,
    initial_prompt: tf.Tensor,
    dataset: tf.data.Dataset,
    optimizer: tf.keras.optimizers.Optimizer,
    num_epochs: int | None = 1,
    max_steps: int | None = None,
    clip_norm: float | None = None,
    l2_strength: Union[float, tf.Tensor] = 0.0,
    l2_reference: tf.Tensor | None = None,
) -> ClientOutput:
    """Trains the prompt on one client's data with a tf.keras optimizer.

    Each step, on one batch: objective = `loss_sum / num_tokens` (0 without
    target tokens) + `(l2_strength / 2) ||P - P_ref||^2`; gradient with respect
    to the prompt only (`watch_accessed_variables=False`, so frozen backbone
    variables are never differentiated); optionally clipped to L2 norm
    `clip_norm`; applied by `optimizer`.

    `prompt_variable` and the optimizer's slots are created by the caller,
    outside any `tf.function` (`optimizer.build([prompt_variable])`), because
    variables cannot be created on every trace. The optimizer's state (momentum,
    Adam moments, iteration count) carries over between calls: use a fresh
    optimizer per client when calling this eagerly; inside a TFF computation all
    variables are re-initialized on every call anyway.

    Wrap the call in a `tf.function` for speed: autograph turns the loop into a
    `tf.while_loop` over the dataset's iterator (`iterate_batches`).

    Args:
      loss_fn: a `PromptLoss`.
      prompt_variable: float32 `[P, H]` `tf.Variable` the optimizer was built on;
        it is overwritten with `initial_prompt` first and holds the trained
        prompt afterwards.
      initial_prompt: float32 `[P, H]`, the prompt to start from (the broadcast
        global prompt in FedAvg).
      dataset: `tf.data.Dataset` of batches (`fedprompt.data_types.batch_spec`).
      optimizer: a tf.keras optimizer built on `[prompt_variable]`.
      num_epochs: passes over `dataset` (None: repeat until `max_steps`).
      max_steps: optional cap on the total number of steps.
      clip_norm: optional L2-norm bound for each step's gradient.
      l2_strength: lambda >= 0 of the L2 penalty (float or scalar tensor).
      l2_reference: `[P, H]` reference prompt of the L2 penalty; defaults to
        `initial_prompt` (the global prompt, as in personalization with L2).

    Returns:
      A `ClientOutput`.
    """
    check_clip_norm(clip_norm)
    if isinstance(l2_strength, numbers.Real) and not (
        math.isfinite(l2_strength) and l2_strength >= 0
    ):
        raise ValueError(f"`l2_strength` must be >= 0 and finite, got {l2_strength!r}.")
    use_l2 = not (isinstance(l2_strength, numbers.Real) and l2_strength == 0)
    data = local_dataset(dataset, num_epochs=num_epochs, max_steps=max_steps)

    initial = tf.identity(tf.cast(initial_prompt, tf.float32))
    reference = initial if l2_reference is None else tf.cast(l2_reference, tf.float32)
    prompt_variable.assign(initial)

    num_steps = tf.constant(0, tf.int64)
    num_examples = tf.constant(0, tf.int64)
    num_tokens = tf.constant(0.0, tf.float32)
    loss_total = tf.constant(0.0, tf.float32)
    grad_norm_total = tf.constant(0.0, tf.float32)
    for batch in iterate_batches(data):
        batch_loss_sum, batch_tokens, norm = client_train_step(
            loss_fn=loss_fn,
            prompt_variable=prompt_variable,
            batch=batch,
            optimizer=optimizer,
            clip_norm=clip_norm,
            l2_strength=l2_strength if use_l2 else None,
            l2_reference=reference,
        )
        num_steps += 1
        num_examples += _batch_size(batch)
        num_tokens += batch_tokens
        loss_total += batch_loss_sum
        grad_norm_total += norm

    return client_output_from_sums(
        initial_prompt=initial,
        final_prompt=tf.convert_to_tensor(prompt_variable),
        num_steps=num_steps,
        num_examples=num_examples,
        num_tokens=num_tokens,
        loss_total=loss_total,
        grad_norm_total=grad_norm_total,
    )


def client_output_from_sums(
    *,
    initial_prompt: tf.Tensor,
    final_prompt: tf.Tensor,
    num_steps: tf.Tensor,
    num_examples: tf.Tensor,
    num_tokens: tf.Tensor,
    loss_total: tf.Tensor,
    grad_norm_total: tf.Tensor,
) -> ClientOutput:
    """A `ClientOutput` from the sums a local training loop keeps.

    Shared by `client_update` and the XLA runtime's per-replica loop, so both
    report the same quantities. `loss_total` sums each step's `loss_sum`,
    `grad_norm_total` each step's pre-clipping gradient norm.
    """
    delta = final_prompt - initial_prompt
    loss_mean = tf.math.divide_no_nan(loss_total, num_tokens)
    grad_norm = tf.math.divide_no_nan(grad_norm_total, tf.cast(num_steps, tf.float32))
    is_finite = tf.logical_and(
        tf.reduce_all(tf.math.is_finite(delta)),
        tf.logical_and(tf.math.is_finite(loss_mean), tf.math.is_finite(grad_norm)),
    )
    return ClientOutput(
        prompt_delta=delta,
        num_examples=num_examples,
        num_tokens=num_tokens,
        num_steps=num_steps,
        loss_mean=loss_mean,
        grad_norm=grad_norm,
        update_norm=tf.norm(delta),
        is_finite=is_finite,
    )


def fedsgd_client_gradient(
    *, loss_fn: PromptLoss, prompt: tf.Tensor, dataset: tf.data.Dataset
) -> FedSGDClientOutput:
    """Gradient of the summed token loss over all of a client's data, at `prompt`.

    Accumulated batch by batch (memory of one batch), one pass, no update. See
    `FedSGDClientOutput` for how the server combines clients into the exact
    full-batch gradient of the token-mean loss over their union.

    Args:
      loss_fn: a `PromptLoss`.
      prompt: float32 `[P, H]`.
      dataset: `tf.data.Dataset` of batches.

    Returns:
      A `FedSGDClientOutput`.
    """
    prompt = tf.cast(prompt, tf.float32)
    gradient_sum = tf.zeros_like(prompt)
    loss_sum = tf.constant(0.0, tf.float32)
    num_tokens = tf.constant(0.0, tf.float32)
    num_examples = tf.constant(0, tf.int64)
    for batch in iterate_batches(dataset):
        batch_gradient, batch_loss_sum, batch_tokens = fedsgd_batch_gradient(
            loss_fn=loss_fn, prompt=prompt, batch=batch
        )
        gradient_sum += batch_gradient
        loss_sum += batch_loss_sum
        num_tokens += batch_tokens
        num_examples += _batch_size(batch)
    return fedsgd_client_output(
        gradient_sum=gradient_sum,
        loss_sum=loss_sum,
        num_tokens=num_tokens,
        num_examples=num_examples,
    )


def fedsgd_batch_gradient(
    *, loss_fn: PromptLoss, prompt: tf.Tensor, batch: Batch
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`(gradient of loss_sum [P, H], loss_sum, num_tokens)` on one batch at `prompt`.

    The part of `fedsgd_client_gradient` that the XLA runtime compiles.
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(prompt)
        batch_loss_sum, batch_tokens = loss_fn(prompt, batch)
        batch_loss_sum = tf.cast(batch_loss_sum, tf.float32)
    gradient = tape.gradient(
        batch_loss_sum, prompt, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return gradient, batch_loss_sum, tf.cast(batch_tokens, tf.float32)


def fedsgd_client_output(
    *,
    gradient_sum: tf.Tensor,
    loss_sum: tf.Tensor,
    num_tokens: tf.Tensor,
    num_examples: tf.Tensor,
) -> FedSGDClientOutput:
    """A `FedSGDClientOutput` from the per-client sums (shared with the XLA runtime)."""
    is_finite = tf.logical_and(
        tf.reduce_all(tf.math.is_finite(gradient_sum)), tf.math.is_finite(loss_sum)
    )
    return FedSGDClientOutput(
        gradient_sum=gradient_sum,
        loss_sum=loss_sum,
        num_tokens=num_tokens,
        num_examples=num_examples,
        grad_norm=tf.norm(tf.math.divide_no_nan(gradient_sum, num_tokens)),
        is_finite=is_finite,
    )


LossFnFactory = Callable[[], PromptLoss]
