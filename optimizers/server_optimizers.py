"""Server optimizers: `tff.learning.optimizers` chosen by an Enum.

The server treats the negated weighted-mean client delta (FedAvg) or the mean
gradient (FedSGD) as a gradient g and applies (t: round, starting at 1):
- SGD:  w <- w - lr * g               (lr 1.0 on the FedAvg pseudo-gradient is
                                       plain FedAvg, McMahan et al. 2017)
- SGDM: a <- momentum * a + g;  w <- w - lr * a        (a starts at 0)
- ADAM: m <- m + (1 - b1)(g - m);  v <- v + (1 - b2)(g^2 - v);
        w <- w - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        (FedAdam, Reddi et al. 2021)
These are pure functions of `(state, weights, gradients)`, so the server
optimizer state is an explicit part of the server state (and of checkpoints).
"""

from __future__ import annotations

import enum

import tensorflow_federated as tff

from optimizers import validation


class ServerOptimizer(enum.Enum):
    """The optimizer the server applies to the aggregated client update."""

    SGD = "sgd"
    SGDM = "sgdm"
    ADAM = "adam"


DEFAULT_MOMENTUM = 0.9
DEFAULT_BETA_1 = 0.9
DEFAULT_BETA_2 = 0.999
DEFAULT_EPSILON = 1e-7


def build_server_optimizer(
    kind: ServerOptimizer,
    *,
    learning_rate: float,
    momentum: float | None = None,
    beta_1: float | None = None,
    beta_2: float | None = None,
    epsilon: float | None = None,
) -> tff.learning.optimizers.Optimizer:
    """Returns a `tff.learning.optimizers.Optimizer` of kind `kind`.

    Hyperparameters that `kind` does not use must be left as `None`; those it
    uses default to momentum 0.9, beta_1 0.9, beta_2 0.999, epsilon 1e-7.

    Args:
      kind: a `ServerOptimizer`.
      learning_rate: > 0, finite (SGD with 1.0 is plain FedAvg).
      momentum: SGDM only, in [0, 1).
      beta_1, beta_2: ADAM only, in [0, 1).
      epsilon: ADAM only, > 0 (FedAdam often uses a larger value, e.g. 1e-3).

    Raises:
      TypeError: `kind` is not a `ServerOptimizer`.
      ValueError: a hyperparameter is out of range or set for a kind that
        does not use it.
    """
    if not isinstance(kind, ServerOptimizer):
        raise TypeError(
            f"`kind` must be a ServerOptimizer ({[k.name for k in ServerOptimizer]}), "
            f"got {kind!r}; convert strings with ServerOptimizer(value)."
        )
    validation.check_positive("learning_rate", learning_rate)
    used = {
        ServerOptimizer.SGD: set(),
        ServerOptimizer.SGDM: {"momentum"},
        ServerOptimizer.ADAM: {"beta_1", "beta_2", "epsilon"},
    }[kind]
    validation.check_unused(
        kind.name, used, momentum=momentum, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon
    )
    if kind == ServerOptimizer.SGD:
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
    if kind == ServerOptimizer.SGDM:
        momentum = DEFAULT_MOMENTUM if momentum is None else momentum
        validation.check_unit_interval("momentum", momentum)
        if momentum == 0.0:
            # build_sgdm treats momentum 0 as "no momentum" (no accumulator).
            return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate, momentum=momentum)
    beta_1 = DEFAULT_BETA_1 if beta_1 is None else beta_1
    beta_2 = DEFAULT_BETA_2 if beta_2 is None else beta_2
    epsilon = DEFAULT_EPSILON if epsilon is None else epsilon
    validation.check_unit_interval("beta_1", beta_1)
    validation.check_unit_interval("beta_2", beta_2)
    validation.check_positive("epsilon", epsilon)
    return tff.learning.optimizers.build_adam(
        learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon
    )
