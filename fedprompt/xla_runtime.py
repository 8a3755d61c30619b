"""The XLA runtime: FedAvg / FedSGD rounds as XLA-compiled TF under `tf.distribute`.

TFF's C++ worker silently ignores `jit_compile=True` on CPU/GPU, and on TPU it
compiles only `tf.data` `reduce` loops (DESIGN.md section 4). This runtime runs
the same pure-TF pieces the TFF computations are made of, without TFF:

1. every client's local batches (`client_update.local_dataset`: the same epochs
   and step cap as the TFF client) are read on the host and padded to static
   shapes `[S, B, T]`: rows without tokens fill short batches, and steps past a
   client's own count are masked out, so XLA compiles each shape once;
2. clients are dealt to replicas in waves of `strategy.num_replicas_in_sync`, one
   client per replica (the default strategy on CPU: one replica, clients in
   turn; `MirroredStrategy` over logical CPU devices; `TPUStrategy`: one client
   per TPU core). Each step, `strategy.run` executes on every replica the
   XLA-compiled loss and gradient (`client_update.client_gradient`, or
   `fedsgd_batch_gradient`), then the tf.keras client optimizer's step on that
   replica's own prompt and slots. Per-client state lives in `ON_READ`
   (sync-on-read) variables, one independent copy per replica; the optimizer is
   reset to its freshly built values before each client, as the TFF client
   computation creates a new one per call. The optimizer step stays outside
   XLA because under a multi-replica strategy Keras synchronises replicas there
   (`merge_call`), which cannot sit inside an XLA function; it is elementwise
   on `[P, H]`, all model FLOPs are in the compiled part;
3. each client's `ClientOutput` goes through the same
   `fed_avg.compute_client_contribution` (weights, non-finite exclusion), the
   contributions are summed / min / max-ed over clients
   (`_federated_common.aggregate_contributions`), and the same
   `fed_avg.compute_server_step` applies the server optimizer.

The result is an object with TFF's `initialize()` / `next(state, client_data)`
interface and the same `ServerState` and metrics, so `fedprompt.program.train`,
its checkpoints and metrics work unchanged; on CPU it matches the TFF process
within 1e-5 (tests/test_xla_runtime.py). The loss must have static shapes:
`prompt_model.PromptTunedLM.static_shape_loss`, not `loss` (`tf.boolean_mask`
cannot be compiled).
"""

from __future__ import annotations

import collections
import numbers
from typing import Any, Callable, Sequence, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedprompt import _federated_common as common
from fedprompt import client_update as client_update_lib
from fedprompt import data_types, fed_avg, fed_sgd
from fedprompt import server_update as server_update_lib
from optimizers import ClientOptimizer, ServerOptimizer

LOCAL_TPU = "local"


# ----------------------------------------------------------------------------- strategies


def configure_cpu_devices(num_devices: int) -> None:
    """Splits the host CPU into `num_devices` logical devices (for `num_cpu_replicas`).

    Must run before TensorFlow initialises its devices (at process start, before
    any op runs); TensorFlow refuses afterwards.
    """
    _check_count("num_devices", num_devices)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as e:
        raise RuntimeError(
            f"configure_cpu_devices({num_devices}) must run before TensorFlow initialises "
            f"its devices ({e}); call it at process start, before any TensorFlow op."
        ) from e


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    return int(value)


def make_strategy(
    *, tpu: str | None = None, num_cpu_replicas: int | None = None
) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy the XLA runtime runs clients on.

    Args:
      tpu: a Cloud TPU name, a `grpc://host:port` address, or "local" (on a TPU
        VM): connects to it, initialises the TPU system and returns a
        `TPUStrategy` (one client per TPU core).
      num_cpu_replicas: with `tpu` None, >= 2 gives a `MirroredStrategy` over that
        many logical CPU devices (`configure_cpu_devices` first; used by tests to
        exercise the multi-replica path); None or 1 gives the default strategy
        (one replica, clients run in turn).

    Raises:
      ValueError: both set, or a malformed value, or too few logical CPUs.
    """
    if tpu is not None and num_cpu_replicas is not None:
        raise ValueError(
            "`tpu` and `num_cpu_replicas` cannot both be set, got "
            f"tpu={tpu!r}, num_cpu_replicas={num_cpu_replicas!r}; pass one of them."
        )
    if tpu is not None:
        if not isinstance(tpu, str) or not tpu.strip():
            raise ValueError(
                "`tpu` must be a Cloud TPU name, a grpc://host:port address or "
                f"{LOCAL_TPU!r} (TPU VM), got {tpu!r}."
            )
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if num_cpu_replicas is None:
        return tf.distribute.get_strategy()
    count = _check_count("num_cpu_replicas", num_cpu_replicas)
    if count == 1:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < count:
        raise ValueError(
            f"`num_cpu_replicas={count}` needs {count} logical CPU devices, found "
            f"{len(devices)}; call fedprompt.xla_runtime.configure_cpu_devices({count}) "
            "at process start."
        )
    return tf.distribute.MirroredStrategy([d.name for d in devices[:count]])


def _per_replica(next_creator, **kwargs):
    # Per-client state: each replica reads and writes only its own copy. The
    # first replica's copy is what a cross-replica read returns; Keras' cross-
    # replica iteration counter update (+1 on every copy) needs an aggregation.
    kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
    kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
    return next_creator(**kwargs)


# ----------------------------------------------------------------------------- client data


def _read_batches(dataset: tf.data.Dataset) -> list[collections.OrderedDict]:
    return [
        collections.OrderedDict((k, np.asarray(batch[k])) for k in data_types.BATCH_KEYS)
        for batch in dataset.as_numpy_iterator()
    ]


def _stack(batches, *, steps: int, rows: int, length: int):
    """`(data {k: [steps, rows, T]}, num_rows [steps] int64)`, zero-padded."""
    data = collections.OrderedDict(
        token_ids=np.zeros([steps, rows, length], np.int32),
        padding_mask=np.zeros([steps, rows, length], bool),
        target_mask=np.zeros([steps, rows, length], bool),
    )
    num_rows = np.zeros([steps], np.int64)
    for s, batch in enumerate(batches):
        n = batch["token_ids"].shape[0]
        for k in data_types.BATCH_KEYS:
            data[k][s, :n] = batch[k]
        num_rows[s] = n
    return data, num_rows


class _Replicas:
    """Runs one client per replica, step by step; subclasses define the step."""

    def __init__(self, strategy: tf.distribute.Strategy):
        self._strategy = strategy

        @tf.function(reduce_retracing=True)
        def run_wave(prompt, data, num_rows, num_steps, max_steps):
            strategy.run(self._start, args=(prompt,))
            for s in tf.range(max_steps):
                strategy.run(self._step, args=(prompt, s, data, num_rows, num_steps))
            return strategy.run(self._finish, args=(prompt,))

        self._run_wave = run_wave

    def _client_batches(self, dataset: tf.data.Dataset):
        raise NotImplementedError

    def _start(self, prompt):
        raise NotImplementedError

    def _step(self, prompt, s, data, num_rows, num_steps):
        raise NotImplementedError

    def _finish(self, prompt):
        raise NotImplementedError

    def run(self, prompt: np.ndarray, datasets: Sequence[tf.data.Dataset]) -> list:
        """The client outputs of `datasets`, in order, each computed from `prompt`."""
        strategy = self._strategy
        replicas = strategy.num_replicas_in_sync
        clients = [self._client_batches(ds) for ds in datasets]
        all_batches = [b for c in clients for b in c]
        length = all_batches[0]["token_ids"].shape[1] if all_batches else 1
        rows = max([b["token_ids"].shape[0] for b in all_batches], default=1)
        prompt = tf.constant(prompt, tf.float32)
        outputs = []
        for first in range(0, len(clients), replicas):
            wave = clients[first : first + replicas]
            steps = max(len(c) for c in wave)
            # Idle replicas of a short last wave get a client with no steps.
            stacked = [
                _stack(c, steps=steps, rows=rows, length=length)
                for c in wave + [[]] * (replicas - len(wave))
            ]
            counts = [np.int64(len(c)) for c in wave] + [np.int64(0)] * (replicas - len(wave))

            def per_replica(values):
                return strategy.experimental_distribute_values_from_function(
                    lambda ctx: values[ctx.replica_id_in_sync_group]
                )

            result = self._run_wave(
                prompt,
                per_replica([d for d, _ in stacked]),
                per_replica([r for _, r in stacked]),
                per_replica(counts),
                tf.constant(steps, tf.int64),
            )
            local = tf.nest.map_structure(strategy.experimental_local_results, result)
            fields = [getattr(local, f) for f in local._fields]
            for r in range(len(wave)):
                outputs.append(type(result)(*[field[r] for field in fields]))
        return outputs


class _FedAvgReplicas(_Replicas):
    """Local training (`ClientOutput`) of one client per replica."""

    def __init__(
        self,
        *,
        strategy,
        model_fn,
        prompt_shape,
        client_optimizer_fn,
        local_epochs,
        local_steps,
        clip_norm,
    ):
        super().__init__(strategy)
        self._local_epochs = local_epochs
        self._local_steps = local_steps
        with strategy.scope():
            loss_fn = model_fn()  # the frozen backbone, mirrored onto every replica
            with tf.variable_creator_scope(_per_replica):
                self._prompt = tf.Variable(tf.zeros(prompt_shape, tf.float32), name="prompt")
                self._optimizer = client_optimizer_fn()
                self._optimizer.build([self._prompt])
                self._num_steps = tf.Variable(tf.constant(0, tf.int64), name="num_steps")
                self._num_examples = tf.Variable(tf.constant(0, tf.int64), name="num_examples")
                self._num_tokens = tf.Variable(0.0, name="num_tokens")
                self._loss_total = tf.Variable(0.0, name="loss_total")
                self._grad_norm_total = tf.Variable(0.0, name="grad_norm_total")
        self._sums = (
            self._num_steps,
            self._num_examples,
            self._num_tokens,
            self._loss_total,
            self._grad_norm_total,
        )
        # A fresh optimizer per client, as in the TFF client computation: its
        # variables (iteration count, slots) return to their built values.
        self._optimizer_variables = list(self._optimizer.variables)
        self._optimizer_initial = [
            tf.constant(np.asarray(strategy.experimental_local_results(v)[0]))
            for v in self._optimizer_variables
        ]
        self._gradient = tf.function(
            lambda prompt, batch: client_update_lib.client_gradient(
                loss_fn=loss_fn, prompt=prompt, batch=batch, clip_norm=clip_norm
            ),
            jit_compile=True,
        )

    def _client_batches(self, dataset):
        return _read_batches(
            client_update_lib.local_dataset(
                dataset, num_epochs=self._local_epochs, max_steps=self._local_steps
            )
        )

    def _start(self, prompt):
        self._prompt.assign(prompt)
        for variable, value in zip(self._optimizer_variables, self._optimizer_initial):
            variable.assign(value)
        for variable in self._sums:
            variable.assign(tf.zeros_like(variable))

    def _step(self, prompt, s, data, num_rows, num_steps):
        del prompt
        active = s < num_steps
        batch = collections.OrderedDict((k, data[k][s]) for k in data_types.BATCH_KEYS)
        tracked = [self._prompt, *self._optimizer_variables]
        before = [v.read_value() for v in tracked]
        loss_sum, num_tokens, norm, gradient = self._gradient(before[0], batch)
        # Each replica is its own client: never sum gradients across replicas.
        self._optimizer.apply_gradients(
            [(gradient, self._prompt)], experimental_aggregate_gradients=False
        )
        # A replica whose client has fewer steps than the wave's longest one
        # steps on padding; undo that step so its state stays put.
        for variable, old in zip(tracked, before):
            variable.assign(tf.where(active, variable.read_value(), old))
        zero = tf.constant(0.0)
        self._num_steps.assign_add(tf.cast(active, tf.int64))
        self._num_examples.assign_add(tf.where(active, num_rows[s], tf.constant(0, tf.int64)))
        self._num_tokens.assign_add(tf.where(active, num_tokens, zero))
        self._loss_total.assign_add(tf.where(active, loss_sum, zero))
        self._grad_norm_total.assign_add(tf.where(active, norm, zero))

    def _finish(self, prompt):
        return client_update_lib.client_output_from_sums(
            initial_prompt=prompt,
            final_prompt=self._prompt.read_value(),
            num_steps=self._num_steps.read_value(),
            num_examples=self._num_examples.read_value(),
            num_tokens=self._num_tokens.read_value(),
            loss_total=self._loss_total.read_value(),
            grad_norm_total=self._grad_norm_total.read_value(),
        )


class _FedSGDReplicas(_Replicas):
    """The FedSGD gradient (`FedSGDClientOutput`) of one client per replica."""

    def __init__(self, *, strategy, model_fn, prompt_shape):
        super().__init__(strategy)
        with strategy.scope():
            loss_fn = model_fn()
            with tf.variable_creator_scope(_per_replica):
                self._gradient_sum = tf.Variable(
                    tf.zeros(prompt_shape, tf.float32), name="gradient_sum"
                )
                self._loss_sum = tf.Variable(0.0, name="loss_sum")
                self._num_tokens = tf.Variable(0.0, name="num_tokens")
                self._num_examples = tf.Variable(tf.constant(0, tf.int64), name="num_examples")
        self._sums = (self._gradient_sum, self._loss_sum, self._num_tokens, self._num_examples)
        self._gradient = tf.function(
            lambda prompt, batch: client_update_lib.fedsgd_batch_gradient(
                loss_fn=loss_fn, prompt=prompt, batch=batch
            ),
            jit_compile=True,
        )

    def _client_batches(self, dataset):
        return _read_batches(dataset)  # one pass, as fedsgd_client_gradient

    def _start(self, prompt):
        del prompt
        for variable in self._sums:
            variable.assign(tf.zeros_like(variable))

    def _step(self, prompt, s, data, num_rows, num_steps):
        active = s < num_steps
        batch = collections.OrderedDict((k, data[k][s]) for k in data_types.BATCH_KEYS)
        # The gradient is taken at the round's broadcast prompt on every step.
        gradient, loss_sum, num_tokens = self._gradient(prompt, batch)
        zero = tf.constant(0.0)
        self._gradient_sum.assign_add(tf.where(active, gradient, tf.zeros_like(gradient)))
        self._loss_sum.assign_add(tf.where(active, loss_sum, zero))
        self._num_tokens.assign_add(tf.where(active, num_tokens, zero))
        self._num_examples.assign_add(tf.where(active, num_rows[s], tf.constant(0, tf.int64)))

    def _finish(self, prompt):
        del prompt
        return client_update_lib.fedsgd_client_output(
            gradient_sum=self._gradient_sum.read_value(),
            loss_sum=self._loss_sum.read_value(),
            num_tokens=self._num_tokens.read_value(),
            num_examples=self._num_examples.read_value(),
        )


# ----------------------------------------------------------------------------- processes


def _to_numpy(structure):
    return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, structure)


class XlaIterativeProcess:
    """`initialize()` / `next(state, client_data)` as a TFF `IterativeProcess`, without TFF.

    `initialize: () -> ServerState` and
    `next: (ServerState, [tf.data.Dataset per client]) -> (ServerState, metrics)`,
    with numpy values, the same `ServerState` structure and the same metrics
    `OrderedDict` as the TFF process of the same algorithm.
    """

    def __init__(self, *, strategy, initialize_fn, replicas, server_round):
        self.strategy = strategy
        self._initialize_fn = initialize_fn
        self._replicas = replicas
        self._server_round = server_round

    def initialize(self) -> server_update_lib.ServerState:
        return _to_numpy(self._initialize_fn())

    def next(self, state, client_data: Sequence[tf.data.Dataset]):
        state = server_update_lib.ServerState(*state)
        client_data = list(client_data)
        if not client_data:
            raise ValueError("`client_data` must hold at least one client dataset, got none.")
        outputs = self._replicas.run(np.asarray(state.prompt, np.float32), client_data)
        new_state, metrics = self._server_round(state, outputs)
        return _to_numpy(server_update_lib.ServerState(*new_state)), _to_numpy(metrics)


def _build_process(
    *, strategy, server_opt, prompt_shape, init_fn, replicas, contribution_fn, step_fn
):
    def initialize_fn():
        prompt = tf.ensure_shape(tf.cast(init_fn(), tf.float32), prompt_shape)
        return server_update_lib.initial_server_state(
            server_optimizer=server_opt, initial_prompt=prompt
        )

    @tf.function
    def server_round(state, outputs):
        aggregates = common.aggregate_contributions([contribution_fn(o) for o in outputs])
        return step_fn(server_optimizer=server_opt, state=state, aggregates=aggregates)

    return XlaIterativeProcess(
        strategy=strategy, initialize_fn=initialize_fn, replicas=replicas, server_round=server_round
    )


def build_xla_fed_avg(
    *,
    model_fn: Callable[[], client_update_lib.PromptLoss],
    prompt_shape: tuple[int, int],
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
    client_weighting: fed_avg.ClientWeighting = fed_avg.ClientWeighting.NUM_EXAMPLES,
    strategy: tf.distribute.Strategy | None = None,
) -> XlaIterativeProcess:
    """FedAvg of a soft prompt on the XLA runtime; arguments as `fed_avg.build_fed_avg`.

    Args:
      model_fn: zero-argument callable returning a `PromptLoss` with static
        shapes (e.g. `PromptTunedLM(...).static_shape_loss`); called once, under
        `strategy.scope()`, so the frozen backbone is placed on every replica.
      strategy: from `make_strategy`; None is the default strategy.
      Others: as in `fedprompt.fed_avg.build_fed_avg`.

    Returns:
      An `XlaIterativeProcess` whose `initialize` / `next` match `build_fed_avg`'s
      process (state `ServerState`, metrics `fed_avg.FED_AVG_METRICS`).
    """
    prompt_shape = common.check_prompt_shape(prompt_shape)
    client_update_lib.check_local_schedule(num_epochs=local_epochs, max_steps=local_steps)
    client_update_lib.check_clip_norm(clip_norm)
    if not isinstance(client_weighting, fed_avg.ClientWeighting):
        raise TypeError(
            "`client_weighting` must be a ClientWeighting "
            f"({[w.name for w in fed_avg.ClientWeighting]}), got {client_weighting!r}."
        )
    init_fn = common.resolve_initial_prompt_fn(
        prompt_shape=prompt_shape,
        initial_prompt=initial_prompt,
        initial_prompt_fn=initial_prompt_fn,
    )
    client_optimizer_fn = fed_avg._resolve_client_optimizer_fn(
        client_optimizer,
        client_learning_rate=client_learning_rate,
        client_momentum=client_momentum,
    )
    server_opt = common.resolve_server_optimizer(
        server_optimizer,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
    )
    strategy = strategy or make_strategy()
    replicas = _FedAvgReplicas(
        strategy=strategy,
        model_fn=model_fn,
        prompt_shape=prompt_shape,
        client_optimizer_fn=client_optimizer_fn,
        local_epochs=local_epochs,
        local_steps=local_steps,
        clip_norm=clip_norm,
    )
    return _build_process(
        strategy=strategy,
        server_opt=server_opt,
        prompt_shape=prompt_shape,
        init_fn=init_fn,
        replicas=replicas,
        contribution_fn=lambda o: fed_avg.compute_client_contribution(
            o, client_weighting=client_weighting
        ),
        step_fn=fed_avg.compute_server_step,
    )


def build_xla_fed_sgd(
    *,
    model_fn: Callable[[], client_update_lib.PromptLoss],
    prompt_shape: tuple[int, int],
    initial_prompt: Any | None = None,
    initial_prompt_fn: Callable[[], tf.Tensor] | None = None,
    server_optimizer: Union[
        ServerOptimizer, tff.learning.optimizers.Optimizer
    ] = ServerOptimizer.SGD,
    server_learning_rate: float | None = None,
    server_momentum: float | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> XlaIterativeProcess:
    """FedSGD of a soft prompt on the XLA runtime; arguments as `fed_sgd.build_fed_sgd`.

    `model_fn` and `strategy` as in `build_xla_fed_avg`. Returns an
    `XlaIterativeProcess` matching `build_fed_sgd`'s process (metrics
    `fed_sgd.FED_SGD_METRICS`).
    """
    prompt_shape = common.check_prompt_shape(prompt_shape)
    init_fn = common.resolve_initial_prompt_fn(
        prompt_shape=prompt_shape,
        initial_prompt=initial_prompt,
        initial_prompt_fn=initial_prompt_fn,
    )
    server_opt = fed_sgd.resolve_server_optimizer(
        server_optimizer,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
    )
    strategy = strategy or make_strategy()
    replicas = _FedSGDReplicas(strategy=strategy, model_fn=model_fn, prompt_shape=prompt_shape)
    return _build_process(
        strategy=strategy,
        server_opt=server_opt,
        prompt_shape=prompt_shape,
        init_fn=init_fn,
        replicas=replicas,
        contribution_fn=fed_sgd.compute_client_contribution,
        step_fn=fed_sgd.compute_server_step,
    )
