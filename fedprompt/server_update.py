"""Pure-TF server state and update, shared by FedAvg and FedSGD.

Only the prompt and the server optimizer's state are server state: the frozen
backbone never travels (DESIGN.md section 4).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import tensorflow as tf
import tensorflow_federated as tff


class ServerState(NamedTuple):
    """Server state of fedprompt's federated algorithms.

    Attributes:
      prompt: float32 `[P, H]`, the global soft prompt.
      optimizer_state: the `tff.learning.optimizers.Optimizer` state (an
        `OrderedDict` of hyperparameters and slots shaped like the prompt).
      round_num: int64 scalar, number of rounds whose update was applied.
    """

    prompt: Any
    optimizer_state: Any
    round_num: Any


def initial_server_state(
    *, server_optimizer: tff.learning.optimizers.Optimizer, initial_prompt: tf.Tensor
) -> ServerState:
    """The server state before round 1 (pure TF)."""
    prompt = tf.cast(initial_prompt, tf.float32)
    return ServerState(
        prompt=prompt,
        optimizer_state=server_optimizer.initialize(tf.TensorSpec(prompt.shape, tf.float32)),
        round_num=tf.constant(0, tf.int64),
    )


def server_update(
    *,
    server_optimizer: tff.learning.optimizers.Optimizer,
    state: ServerState,
    gradient: tf.Tensor,
    apply_update: tf.Tensor,
) -> ServerState:
    """Applies one server optimizer step to the prompt (pure TF).

    Args:
      server_optimizer: the `tff.learning.optimizers.Optimizer` whose state is
        `state.optimizer_state`.
      state: the current `ServerState`.
      gradient: float32 `[P, H]`: the FedAvg pseudo-gradient (minus the weighted
        mean client delta) or the FedSGD mean gradient.
      apply_update: bool scalar; when False (no usable client update this round)
        the whole state, round number included, is returned unchanged, so a
        non-finite `gradient` cannot leak into the prompt or optimizer slots.

    Returns:
      The new `ServerState`.
    """
    gradient = tf.cast(gradient, tf.float32)
    # Keep NaNs out of the optimizer arithmetic when the update is discarded.
    safe_gradient = tf.where(apply_update, gradient, tf.zeros_like(gradient))
    optimizer_state, prompt = server_optimizer.next(
        state.optimizer_state, state.prompt, safe_gradient
    )
    updated = ServerState(
        prompt=prompt, optimizer_state=optimizer_state, round_num=state.round_num + 1
    )
    return tf.nest.map_structure(lambda new, old: tf.where(apply_update, new, old), updated, state)


def tensor_shapes(type_spec: tff.Type) -> Sequence[tuple[str, tuple[int, ...]]]:
    """(path, shape) of every tensor in a TFF type; used to audit what travels."""
    found = []

    def visit(t, path):
        if isinstance(t, tff.FederatedType):
            visit(t.member, path)
        elif isinstance(t, tff.StructType):
            for i, (name, member) in enumerate(tff.structure.iter_elements(t)):
                visit(member, f"{path}/{name if name else i}")
        elif isinstance(t, tff.TensorType):
            found.append((path, tuple(t.shape)))
        elif isinstance(t, tff.SequenceType):
            visit(t.element, f"{path}/*")

    visit(type_spec, "")
    return found
