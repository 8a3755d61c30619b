"""Client (local-training) optimizers: tf.keras optimizers chosen by an Enum.

Client optimizers run inside the TFF client computation, so they are tf.keras
optimizers (TFF 0.87's learning algorithms reject those, which is one reason
fedprompt has its own FedAvg; DESIGN.md section 4). Create one per client call
*inside* the computation and `opt.build([prompt_variable])` before entering the
`tf.function` that trains, so that its slot variables are created once, in the
computation's graph, and initialized by TFF on every call.

Update rules (g: gradient, w: the prompt, t: step starting at 1), exactly as
Keras 2.14 applies them:
- SGD:     w <- w - lr * g
- SGDM:    m <- momentum * m - lr * g;  w <- w + m   (m starts at 0)
- ADAM:    m <- m + (1 - b1)(g - m);  v <- v + (1 - b2)(g^2 - v);
           w <- w - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
- ADAGRAD: a <- a + g^2 (a starts at `initial_accumulator_value`);
           w <- w - lr * g / sqrt(a + eps)
"""

from __future__ import annotations

import enum
import math

import tensorflow as tf

from optimizers import validation


class ClientOptimizer(enum.Enum):
    """The local optimizer a client uses on the prompt."""

    SGD = "sgd"
    SGDM = "sgdm"
    ADAM = "adam"
    ADAGRAD = "adagrad"


DEFAULT_MOMENTUM = 0.9
DEFAULT_BETA_1 = 0.9
DEFAULT_BETA_2 = 0.999
DEFAULT_EPSILON = 1e-7
DEFAULT_INITIAL_ACCUMULATOR_VALUE = 0.1


def build_client_optimizer(
    kind: ClientOptimizer,
    *,
    learning_rate: float,
    momentum: float | None = None,
    beta_1: float | None = None,
    beta_2: float | None = None,
    epsilon: float | None = None,
    initial_accumulator_value: float | None = None,
) -> tf.keras.optimizers.Optimizer:
    """Returns a new tf.keras optimizer of kind `kind`.

    Hyperparameters that `kind` does not use must be left as `None` (a value set
    for an unused option is a configuration mistake, so it is rejected); those it
    uses default to Keras' values (momentum 0.9, beta_1 0.9, beta_2 0.999,
    epsilon 1e-7, initial_accumulator_value 0.1).

    The optimizer is created with `jit_compile=False`: inside a TFF computation
    XLA is ignored anyway, and the XLA path compiles the whole enclosing
    `tf.function` instead (DESIGN.md section 4).

    Args:
      kind: a `ClientOptimizer`.
      learning_rate: > 0, finite.
      momentum: SGDM only, in [0, 1).
      beta_1, beta_2: ADAM only, in [0, 1).
      epsilon: ADAM and ADAGRAD only, > 0.
      initial_accumulator_value: ADAGRAD only, >= 0.

    Raises:
      TypeError: `kind` is not a `ClientOptimizer`.
      ValueError: a hyperparameter is out of range or set for a kind that
        does not use it.
    """
    if not isinstance(kind, ClientOptimizer):
        raise TypeError(
            f"`kind` must be a ClientOptimizer ({[k.name for k in ClientOptimizer]}), "
            f"got {kind!r}; convert strings with ClientOptimizer(value)."
        )
    validation.check_positive("learning_rate", learning_rate)
    used = {
        ClientOptimizer.SGD: set(),
        ClientOptimizer.SGDM: {"momentum"},
        ClientOptimizer.ADAM: {"beta_1", "beta_2", "epsilon"},
        ClientOptimizer.ADAGRAD: {"epsilon", "initial_accumulator_value"},
    }[kind]
    validation.check_unused(
        kind.name,
        used,
        momentum=momentum,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        initial_accumulator_value=initial_accumulator_value,
    )
    if kind == ClientOptimizer.SGD:
        return tf.keras.optimizers.SGD(learning_rate=learning_rate, jit_compile=False)
    if kind == ClientOptimizer.SGDM:
        momentum = DEFAULT_MOMENTUM if momentum is None else momentum
        validation.check_unit_interval("momentum", momentum)
        return tf.keras.optimizers.SGD(
            learning_rate=learning_rate, momentum=momentum, jit_compile=False
        )
    if kind == ClientOptimizer.ADAM:
        beta_1 = DEFAULT_BETA_1 if beta_1 is None else beta_1
        beta_2 = DEFAULT_BETA_2 if beta_2 is None else beta_2
        epsilon = DEFAULT_EPSILON if epsilon is None else epsilon
        validation.check_unit_interval("beta_1", beta_1)
        validation.check_unit_interval("beta_2", beta_2)
        validation.check_positive("epsilon", epsilon)
        return tf.keras.optimizers.Adam(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            jit_compile=False,
        )
    epsilon = DEFAULT_EPSILON if epsilon is None else epsilon
    initial_accumulator_value = (
        DEFAULT_INITIAL_ACCUMULATOR_VALUE
        if initial_accumulator_value is None
        else initial_accumulator_value
    )
    validation.check_positive("epsilon", epsilon)
    if not (math.isfinite(initial_accumulator_value) and initial_accumulator_value >= 0):
        raise ValueError(
            "`initial_accumulator_value` must be >= 0 and finite, got "
            f"{initial_accumulator_value!r}; Keras' default is 0.1."
        )
    return tf.keras.optimizers.Adagrad(
        learning_rate=learning_rate,
        initial_accumulator_value=initial_accumulator_value,
        epsilon=epsilon,
        jit_compile=False,
    )
