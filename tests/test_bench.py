"""Smoke test of the bench scripts' core functions on a tiny config (no timing asserts)."""

import json

import keras_nlp
import numpy as np
import pytest
import tensorflow as tf

from bench import bench_generate, bench_train_step, plain_round
from fedprompt import prompt_model


@pytest.fixture(scope="module")
def model():
    backbone = keras_nlp.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=64,
    )  # fmt: skip
    return prompt_model.PromptTunedLM(backbone)


def test_flop_counter_matches_hand_computation():
    dims = dict(num_layers=1, hidden_dim=16, intermediate_dim=32, num_heads=2, num_kv_heads=2,
                vocabulary_size=64, gated_mlp=False)  # fmt: skip
    # batch 2 x 10 positions, 6 target rows.
    linear = 2 * 20 * (4 * 16 * 16 + 2 * 16 * 32)  # q,k,v,o + 2 MLP matmuls
    attention = 2 * 2 * 2 * 10 * 10 * 16  # QK^T and AV
    head = 2 * 6 * 16 * 64
    flops = bench_train_step.step_flops(dims, batch=2, positions=10, targets=6)
    assert flops["forward"] == linear + attention + head
    assert flops["total"] == 2 * linear + 3 * attention + 2 * head


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_train_step_schema(model, mode):
    result = bench_train_step.bench_config(
        model, name="toy", batch=2, seq=8, mode=mode, repeats=1, matmul_rate=1.0
    )
    json.dumps(result)
    for key in ("step_s_median", "tokens_per_s", "flops_per_step", "achieved_gflops",
                "fraction_of_matmul_rate", "peak_rss_mib", "machine"):  # fmt: skip
        assert key in result
    assert "loadavg" in result["machine"]


def test_generate_schema(model):
    result = bench_generate.bench_generate(model, name="toy", batch=2, input_length=4,
                                           new_tokens=3, repeats=1)  # fmt: skip
    json.dumps(result)
    assert result["generated_tokens"] == 6
    assert result["generated_tokens_per_s"] > 0


def test_parallel_plain_round_equals_the_sequential_one(model):
    # The overhead baseline with per-client state must compute the same round.
    datasets = plain_round.client_datasets(
        model.vocabulary_size, clients=3, steps=2, batch=2, seq=8
    )
    shape = (4, model.hidden_dim)
    initial = tf.random.stateless_uniform(shape, [2, 3], -0.5, 0.5)
    sequential = plain_round.build_plain_round(model.loss, datasets, shape, learning_rate=0.5)
    parallel = plain_round.build_plain_round(
        model.loss, datasets, shape, learning_rate=0.5, parallel=True
    )
    a, b = sequential(initial).numpy(), parallel(initial).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - initial.numpy()).max() > 1e-5  # the round moved the prompt (7e-5 seen)


def test_profile_sums_op_events_by_type_and_part(tmp_path):
    from tensorflow.core.profiler.protobuf import xplane_pb2

    from bench import profile_train_step

    space = xplane_pb2.XSpace()
    host = space.planes.add(name="/host:CPU")
    other = space.planes.add(name="/device:TPU:0")  # Not the host: ignored.
    names = {
        1: "transformer_layer_0/feedforward_gate_dense/Tensordot/MatMul:MatMul",
        2: "gradient_tape/token_embedding/MatMul:MatMul",
        3: "transformer_layer_0/self_attention/Softmax:Softmax",
        4: "ExecutorState::Process",  # Not a TF op event.
    }
    for key, name in names.items():
        host.event_metadata[key].name = name
        other.event_metadata[key].name = name
    line = host.lines.add(name="tf_Compute")
    for metadata_id, duration in ((1, 5), (2, 7), (1, 3), (3, 11), (4, 100)):
        line.events.add(metadata_id=metadata_id, duration_ps=duration)
    other.lines.add().events.add(metadata_id=1, duration_ps=1000)
    path = tmp_path / "x.xplane.pb"
    path.write_bytes(space.SerializeToString())

    by_type, by_part = profile_train_step.op_times(str(path))
    assert by_type == {"MatMul": 15, "Softmax": 11}
    assert by_part == {
        "forward mlp": 8,
        "gradient lm_head_or_embedding": 7,
        "forward attention": 11,
    }
