"""The XLA runtime against the TFF processes: same prompts and metrics on CPU within 1e-5.

A random-weight 1-layer GPT-2 (vocab 64, hidden 16) stands in for the backbone:
equivalence needs no pre-training. Clients have different sizes (partial last
batches, different step counts), so the padding and step masking are exercised.
The multi-replica path (`MirroredStrategy` over 2 logical CPU devices) runs in a
subprocess, because logical devices must be configured before TensorFlow
initialises its devices, which pytest's other modules have long done.
"""

import collections
import json
import os
import pathlib
import subprocess
import sys

import keras_nlp
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import flagsaver

from fedprompt import data_types, fed_avg, fed_sgd, frozen_backbone, program, xla_runtime
from fedprompt import prompt_model as prompt_model_lib
from optimizers import ClientOptimizer, ServerOptimizer

REPO = pathlib.Path(__file__).resolve().parent.parent
VOCAB, HIDDEN, PROMPT_LENGTH, SEQ_LEN, BATCH = 64, 16, 3, 12, 2
PROMPT_SHAPE = (PROMPT_LENGTH, HIDDEN)
CLIENT_SIZES = (5, 3, 7, 4)  # batches of 2: 3, 2, 4, 2 steps, three partial
TOLERANCE = 1e-5


def save_tiny_backbone(directory) -> frozen_backbone.FrozenBackbone:
    tf.keras.utils.set_random_seed(0)
    backbone = keras_nlp.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=32,
        max_sequence_length=32,
    )
    return frozen_backbone.save_frozen_backbone(backbone, directory)


def client_datasets(seed=0):
    """Rows of varied length; targets are the tail of each row's real tokens."""
    rng = np.random.default_rng(seed)
    datasets = []
    for size in CLIENT_SIZES:
        lengths = rng.integers(6, SEQ_LEN + 1, size=size)
        starts = rng.integers(2, 5, size=size)
        positions = np.arange(SEQ_LEN)[None]
        padding = positions < lengths[:, None]
        arrays = collections.OrderedDict(
            token_ids=np.where(padding, rng.integers(1, VOCAB, size=(size, SEQ_LEN)), 0).astype(
                np.int32
            ),
            padding_mask=padding,
            target_mask=padding & (positions >= starts[:, None]),
        )
        datasets.append(tf.data.Dataset.from_tensor_slices(arrays).batch(BATCH))
    return datasets


def initial_prompt():
    return np.random.default_rng(1).normal(scale=0.5, size=PROMPT_SHAPE).astype(np.float32)


def model_fns(frozen):
    def model():
        return prompt_model_lib.PromptTunedLM(frozen_backbone.restore_backbone(frozen))

    return (lambda: model().loss), (lambda: model().static_shape_loss)


FED_AVG_ARGS = dict(
    prompt_shape=PROMPT_SHAPE,
    client_optimizer=ClientOptimizer.ADAM,
    client_learning_rate=0.05,
    local_epochs=2,
    local_steps=5,  # the 7-example client stops mid second epoch
    server_optimizer=ServerOptimizer.SGDM,
    server_learning_rate=1.0,
    server_momentum=0.5,
)
FED_SGD_ARGS = dict(
    prompt_shape=PROMPT_SHAPE, server_optimizer=ServerOptimizer.SGD, server_learning_rate=30.0
)


def run_rounds(process, datasets, rounds):
    """Prompts and metrics after each round; 3 of the 4 clients per round, seeded."""
    state = process.initialize()
    prompts, metrics = [], []
    for round_num in range(1, rounds + 1):
        chosen = program.sample_clients(
            seed=0, round_num=round_num, num_clients=len(datasets), clients_per_round=3
        )
        state, round_metrics = process.next(state, [datasets[i] for i in chosen])
        prompts.append(np.asarray(state.prompt))
        metrics.append({k: np.asarray(v) for k, v in round_metrics.items()})
    return state, prompts, metrics


def max_abs_differences(a, b):
    (_, prompts_a, metrics_a), (_, prompts_b, metrics_b) = a, b
    prompt = max(float(np.max(np.abs(x - y))) for x, y in zip(prompts_a, prompts_b))
    metric = max(
        float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64))))
        for x, y in zip(metrics_a, metrics_b)
        for k in x
    )
    return prompt, metric


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("xla") / "frozen")


def test_static_shape_loss_equals_loss(frozen):
    model = prompt_model_lib.PromptTunedLM(frozen_backbone.restore_backbone(frozen))
    batch = next(iter(client_datasets()[2]))
    prompt = tf.constant(initial_prompt())

    def value_and_gradient(loss_fn):
        with tf.GradientTape() as tape:
            tape.watch(prompt)
            loss_sum, count = loss_fn(prompt, batch)
        return loss_sum, count, tape.gradient(loss_sum, prompt)

    expected = value_and_gradient(model.loss)
    compiled = tf.function(model.static_shape_loss, jit_compile=True)
    for got in (value_and_gradient(model.static_shape_loss), value_and_gradient(compiled)):
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
        assert float(got[1]) == float(expected[1]) > 0
        np.testing.assert_allclose(got[2], expected[2], atol=1e-6)


def test_fed_avg_matches_tff(frozen):
    tff_loss, xla_loss = model_fns(frozen)
    datasets = client_datasets()
    # The TFF process first: an eagerly built Keras model must not outlive
    # TFF tracing (DESIGN.md trap 2); the XLA process builds its own afterwards.
    tff_process = fed_avg.build_fed_avg(
        model_fn=tff_loss,
        batch_spec=data_types.batch_spec(SEQ_LEN),
        initial_prompt=initial_prompt(),
        **FED_AVG_ARGS,
    )
    reference = run_rounds(tff_process, datasets, rounds=3)
    xla_process = xla_runtime.build_xla_fed_avg(
        model_fn=xla_loss, initial_prompt=initial_prompt(), **FED_AVG_ARGS
    )
    got = run_rounds(xla_process, datasets, rounds=3)
    prompt_diff, metric_diff = max_abs_differences(got, reference)
    print(f"fedavg max |xla - tff|: prompt {prompt_diff:.2e}, metrics {metric_diff:.2e}")
    assert prompt_diff < TOLERANCE and metric_diff < TOLERANCE
    # The prompt moved (the comparison is not between two unchanged prompts).
    assert np.max(np.abs(got[1][-1] - initial_prompt())) > 1e-2
    # Same state structure and types, so program.train's checkpoints work.
    tff_state, xla_state = reference[0], got[0]
    assert type(xla_state) is type(tff_state)
    assert tf.nest.map_structure(np.shape, xla_state) == tf.nest.map_structure(np.shape, tff_state)
    assert xla_state.round_num == tff_state.round_num == 3
    assert set(got[2][0]) == set(fed_avg.FED_AVG_METRICS)


def test_fed_sgd_matches_tff(frozen):
    tff_loss, xla_loss = model_fns(frozen)
    datasets = client_datasets()
    tff_process = fed_sgd.build_fed_sgd(
        model_fn=tff_loss,
        batch_spec=data_types.batch_spec(SEQ_LEN),
        initial_prompt=initial_prompt(),
        **FED_SGD_ARGS,
    )
    reference = run_rounds(tff_process, datasets, rounds=2)
    xla_process = xla_runtime.build_xla_fed_sgd(
        model_fn=xla_loss, initial_prompt=initial_prompt(), **FED_SGD_ARGS
    )
    got = run_rounds(xla_process, datasets, rounds=2)
    prompt_diff, metric_diff = max_abs_differences(got, reference)
    print(f"fedsgd max |xla - tff|: prompt {prompt_diff:.2e}, metrics {metric_diff:.2e}")
    assert prompt_diff < TOLERANCE and metric_diff < TOLERANCE
    assert np.max(np.abs(got[1][-1] - initial_prompt())) > 1e-2
    assert set(got[2][0]) == set(fed_sgd.FED_SGD_METRICS)


def test_client_gradient_is_really_xla_compiled(frozen):
    # `loss` uses tf.boolean_mask, which XLA cannot compile: if the client
    # gradient were not compiled, this would run.
    tff_loss, _ = model_fns(frozen)
    process = xla_runtime.build_xla_fed_sgd(
        model_fn=tff_loss, initial_prompt=initial_prompt(), **FED_SGD_ARGS
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="compile"):
        process.next(process.initialize(), client_datasets()[:1])


def mirrored_check(directory):
    """Run in a fresh process: 2 logical CPU replicas vs the default strategy."""
    xla_runtime.configure_cpu_devices(2)
    frozen = save_tiny_backbone(pathlib.Path(directory) / "frozen")
    _, xla_loss = model_fns(frozen)
    datasets = client_datasets()
    mirrored = xla_runtime.make_strategy(num_cpu_replicas=2)
    result = {"num_replicas": mirrored.num_replicas_in_sync}
    for name, build, args in (
        ("fedavg", xla_runtime.build_xla_fed_avg, FED_AVG_ARGS),
        ("fedsgd", xla_runtime.build_xla_fed_sgd, FED_SGD_ARGS),
    ):
        runs = [
            run_rounds(
                build(model_fn=xla_loss, initial_prompt=initial_prompt(), strategy=s, **args),
                datasets,
                rounds=2,
            )
            for s in (mirrored, xla_runtime.make_strategy())
        ]
        result[name] = max_abs_differences(*runs)
    print(json.dumps(result))


def test_mirrored_strategy_one_client_per_replica_matches_default(tmp_path):
    # 3 clients per round on 2 replicas: a full wave, then one client beside an
    # idle replica; clients in a wave have different step counts.
    code = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
        "from tests import test_xla_runtime as t\n"
        f"t.mirrored_check({str(tmp_path)!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert result["num_replicas"] == 2
    for name in ("fedavg", "fedsgd"):
        assert max(result[name]) < TOLERANCE, (name, result[name])


# ----------------------------------------------------------------------------- strategies


def test_make_strategy_defaults_to_the_default_strategy():
    for strategy in (
        xla_runtime.make_strategy(),
        xla_runtime.make_strategy(tpu=None),
        xla_runtime.make_strategy(num_cpu_replicas=1),
    ):
        assert strategy is tf.distribute.get_strategy()
        assert strategy.num_replicas_in_sync == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tpu="my-tpu", num_cpu_replicas=2), "cannot both be set"),
        (dict(tpu=""), "`tpu` must be a Cloud TPU name"),
        (dict(tpu=3), "`tpu` must be a Cloud TPU name"),
        (dict(num_cpu_replicas=0), "`num_cpu_replicas` must be an int >= 1, got 0"),
        (dict(num_cpu_replicas=True), "`num_cpu_replicas` must be an int >= 1"),
        (dict(num_cpu_replicas=64), "needs 64 logical CPU devices"),
    ],
)
def test_make_strategy_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        xla_runtime.make_strategy(**kwargs)


# ----------------------------------------------------------------------------- config and flags


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(runtime="jax"), "--runtime: must be one of ['tff', 'xla'], got 'jax'."),
        (dict(tpu="my-tpu"), "--tpu: is only used with --runtime=xla"),
        (dict(runtime="xla", tpu=" "), "--tpu: must be a Cloud TPU name"),
        (dict(runtime="xla", algorithm="local"), "--runtime: --algorithm=local trains nothing"),
    ],
)
def test_config_validation(overrides, message, tmp_path):
    config = program.ExperimentConfig(output_dir=str(tmp_path), **overrides)
    with pytest.raises(program.ConfigError) as raised:
        config.validate()
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_config_records_runtime(tmp_path):
    config = program.ExperimentConfig(output_dir=str(tmp_path), runtime="xla", tpu="my-tpu")
    config.validate()
    assert config.to_json()["runtime"] == "xla" and config.to_json()["tpu"] == "my-tpu"
    assert program.ExperimentConfig(output_dir=str(tmp_path)).to_json()["runtime"] == "tff"


def test_driver_rejects_tpu_without_xla_in_one_line(tmp_path, capsys):
    import run_experiment

    with flagsaver.flagsaver(output_dir=str(tmp_path / "out"), tpu="my-tpu"):
        assert run_experiment.main(["run_experiment.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tpu: is only used with --runtime=xla" in err, err


def test_driver_runtime_xla_end_to_end(tmp_path):
    """`run_experiment.py --runtime=xla` trains, checkpoints, personalizes and records it.

    (Equivalence with TFF is the in-process tests' job; the same two-round run
    with --runtime=tff gives the same final prompt within 1e-5, checked by hand
    when this test was written: one more subprocess would double its time.)
    """
    from tests import test_driver

    preset = tiny_preset(tmp_path)
    out = tmp_path / "xla"
    args = [f"--backbone={preset}", *test_driver.TINY_RUN, "--rounds=2", "--runtime=xla"]
    done = test_driver._run([*args, f"--output_dir={out}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 2/2" in done.stdout and "report:" in done.stdout
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["runtime"] == "xla" and recorded["tpu"] is None
    assert recorded["flags"]["runtime"] == "xla"
    rows = test_driver._rows(out / "rounds.csv")
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert (out / "personalization.csv").is_file() and (out / "final_prompt.npy").is_file()
    assert list((out / "checkpoints").iterdir())


def test_xla_state_round_trips_through_program_checkpoints(frozen, tmp_path):
    import asyncio

    import tensorflow_federated as tff

    _, xla_loss = model_fns(frozen)
    process = xla_runtime.build_xla_fed_avg(
        model_fn=xla_loss, initial_prompt=initial_prompt(), **FED_AVG_ARGS
    )
    datasets = client_datasets()[:2]
    state, _ = process.next(process.initialize(), datasets)
    manager = tff.program.FileProgramStateManager(str(tmp_path / "checkpoints"))
    asyncio.run(manager.save(state, 1))
    loaded, version = asyncio.run(manager.load_latest(process.initialize()))
    assert version == 1
    tf.nest.map_structure(np.testing.assert_array_equal, loaded, state)
    resumed, _ = process.next(loaded, datasets)
    direct, _ = process.next(state, datasets)
    np.testing.assert_array_equal(resumed.prompt, direct.prompt)


def tiny_preset(tmp_path):
    from fedprompt.backbones import tiny
    from tests import test_driver

    return tiny.build_tiny(output_dir=tmp_path / "preset", config=test_driver.SMALL)
