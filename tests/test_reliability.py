"""Reliability: the bad-input matrix of docs/RELIABILITY.md, non-finite rounds,
atomic writes, and (in subprocesses) determinism and crash/resume.

The matrix test reads its rows from the table in docs/RELIABILITY.md, so the
documented error text and the tested one cannot drift apart.
"""

import asyncio
import collections
import csv
import dataclasses
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import types

import numpy as np
import psutil
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from absl import flags
from absl.testing import flagsaver

import run_experiment
from fedprompt import program
from fedprompt.backbones import tiny
from tests.test_driver import SMALL, TINY_RUN

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "RELIABILITY.md"


def matrix_rows():
    """`(id, args, message)` of every row of the bad-input table."""
    rows = []
    in_table = False
    for line in DOC.read_text().splitlines():
        if line.startswith("<!-- bad-input-matrix -->"):
            in_table = True
            continue
        if in_table and line.startswith("<!-- /bad-input-matrix -->"):
            break
        if not in_table or not line.startswith("| ") or line.startswith("| id ") or "---" in line:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        row_id, _, args, message = cells
        rows.append((row_id, shlex.split(args.strip("`")), message.strip("`").strip()))
    return rows


@pytest.fixture(scope="module")
def small_preset(tmp_path_factory):
    return tiny.build_tiny(output_dir=tmp_path_factory.mktemp("preset") / "small", config=SMALL)


def _fixtures(tmp: pathlib.Path, preset) -> dict:
    """Placeholders of the matrix: bad files and directories, built per row."""
    sni = {"empty_sni": tmp / "empty_sni", "bad_json_sni": tmp / "bad_json_sni"}
    for d in sni.values():
        d.mkdir()
    (sni["bad_json_sni"] / "task001_x.json").write_text('{"Definition": ["d"],')
    missing = tmp / "missing_key_sni"
    missing.mkdir()
    (missing / "task002_y.json").write_text(json.dumps({"Definition": ["d"], "Instances": []}))
    empty_preset = tmp / "empty_preset"
    empty_preset.mkdir()
    a_file = tmp / "a_file"
    a_file.write_text("not a directory")
    corrupt = tmp / "corrupt_config"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"seed": 0,')
    other = tmp / "other_config"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps(program.ExperimentConfig(output_dir=str(other), seed=1).to_json())
    )
    return dict(
        tmp=tmp,
        preset=preset,
        missing_key_sni=missing,
        empty_preset=empty_preset,
        a_file=a_file,
        corrupt_config=corrupt,
        other_config=other,
        **sni,
    )


def run_bad_input(args, tmp, preset, capsys) -> str:
    """Runs the driver's main() in process; returns the one error line it prints."""
    values = _fixtures(tmp, preset)
    argv = ["run_experiment.py"] + [a.format(**values) for a in args]
    if not any(a.startswith("--output_dir=") for a in argv):
        argv.append(f"--output_dir={tmp / 'out'}")
    with flagsaver.flagsaver():
        try:
            flags.FLAGS(argv)
        except flags.Error as e:  # absl rejects it while parsing, before main()
            return f"FATAL Flags parsing error: {e}"
        assert run_experiment.main(["run_experiment.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err.replace(str(tmp), "{tmp}")


MATRIX = matrix_rows()


def test_matrix_has_at_least_25_rows():
    assert len(MATRIX) >= 25, len(MATRIX)
    assert len({r[0] for r in MATRIX}) == len(MATRIX), "duplicate row ids"


@pytest.mark.parametrize("row_id, args, message", MATRIX, ids=[r[0] for r in MATRIX])
def test_bad_input_gives_documented_error(row_id, args, message, small_preset, tmp_path, capsys):
    err = run_bad_input(args, tmp_path, small_preset, capsys)
    assert err == message, f"row {row_id}: got\n{err}"
    assert not (tmp_path / "out" / "rounds.csv").exists()


# ------------------------------------------------------------- subprocess runs

RUN = [
    *TINY_RUN,
    "--rounds=4",
    "--checkpoint_every=2",
]
WALL_TIME_COLUMNS = ("elapsed_s",)


def _driver(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    # Own session/process group: a SIGKILL of the group also reaches TFF's
    # worker_binary children, which a SIGKILL of the driver alone orphans.
    return subprocess.Popen(
        [sys.executable, "-u", str(REPO / "run_experiment.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _kill_when(proc, predicate) -> list:
    """Reads stdout lines until `predicate(line)`, then SIGKILLs the process group."""
    lines = []
    descendants = psutil.Process(proc.pid).children(recursive=True)
    for line in proc.stdout:
        lines.append(line)
        descendants = psutil.Process(proc.pid).children(recursive=True) or descendants
        if predicate(line):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    else:
        pytest.fail("the run ended before the kill point:\n" + "".join(lines) + proc.stderr.read())
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"orphaned after the kill: {alive}"
    return lines


def _csv(path, drop=()):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference_run(small_preset, tmp_path_factory):
    """One uninterrupted run, shared by the determinism and resume tests."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _finish(_driver([f"--backbone={small_preset}", *RUN, f"--output_dir={out}"]))
    return out


def _assert_same_results(got, want):
    assert _csv(got / "rounds.csv", WALL_TIME_COLUMNS) == _csv(
        want / "rounds.csv", WALL_TIME_COLUMNS
    )
    assert _csv(got / "personalization.csv") == _csv(want / "personalization.csv")
    np.testing.assert_array_equal(
        np.load(got / "final_prompt.npy"), np.load(want / "final_prompt.npy")
    )


def test_same_flags_give_identical_results_and_overwrite_starts_over(
    small_preset, reference_run, tmp_path
):
    # The second run goes to a directory holding another run (a different seed,
    # stale results): --overwrite must delete it and start over.
    out = tmp_path / "again"
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps(program.ExperimentConfig(output_dir=str(out), seed=7).to_json())
    )
    (out / "rounds.csv").write_text("stale\n")
    stdout = _finish(
        _driver([f"--backbone={small_preset}", *RUN, f"--output_dir={out}", "--overwrite"])
    )
    assert "--overwrite: deleting" in stdout and "resuming" not in stdout
    _assert_same_results(out, reference_run)


def test_killed_runs_resume_to_the_uninterrupted_results(small_preset, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = [f"--backbone={small_preset}", *RUN, f"--output_dir={out}"]
    # 1. Killed during round 4: the last saved state is round 2's; rounds.csv
    #    already holds round 3, which the resume must drop and redo.
    _kill_when(_driver(args), lambda line: line.startswith("round 3/4"))
    assert [r["round"] for r in _csv(out / "rounds.csv")] == ["1", "2", "3"]
    assert not (out / "personalization.csv").exists()
    # 2. Resumed, then killed in the personalization sweep.
    lines = _kill_when(_driver(args), lambda line: line.startswith("personalization:"))
    text = "".join(lines)
    assert "resuming from the program state saved after round 2" in text, text
    assert "round 3/4" in text and "round 1/4" not in text
    assert not (out / "personalization.csv").exists()
    # 3. Resumed after training: no round is rerun, personalization is.
    stdout = _finish(_driver(args))
    assert "resuming from the program state saved after round 4" in stdout, stdout
    assert not re.search(r"^round \d+/", stdout, re.M), stdout
    _assert_same_results(out, reference_run)
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------- non-finite clients


@pytest.fixture(scope="module")
def training_setup(small_preset, tmp_path_factory):
    """Data and a FedAvg process whose loss is Inf on a client with corrupted data.

    Corruption: token id -1 somewhere in a batch (clamped before the model, so
    the forward pass still runs); the loss, and so the gradient and the delta,
    become non-finite exactly for the clients holding such a batch.
    """
    from fedprompt import backbones, frozen_backbone, prompt_model

    root = tmp_path_factory.mktemp("nonfinite")
    config = program.ExperimentConfig(
        output_dir=str(root),
        backbone=str(small_preset),
        num_clients=3,
        clients_per_round=3,
        num_validation_clients=1,
        num_test_clients=1,
        synthetic_instances_per_task=10,
        global_test_per_category=1,
        max_global_test_examples=2,
        sequence_length=64,
        prompt_length=2,
        batch_size=4,
        rounds=2,
        eval_every=100,
        checkpoint_every=1,
        personalization_epochs=(0,),
    )
    backbone = backbones.resolve_backbone(config.backbone)
    keras_backbone = backbone.load_keras_backbone()
    initial_prompt = program._initial_prompt(config, keras_backbone, backbone.tokenizer)
    frozen = frozen_backbone.save_frozen_backbone(keras_backbone, str(root / "frozen"))
    data = program.build_data(config, backbone)

    def model_fn():
        lm = prompt_model.PromptTunedLM(frozen_backbone.restore_backbone(frozen))

        def loss(prompt, batch):
            corrupted = tf.reduce_any(batch["token_ids"] < 0)
            clean = dict(batch, token_ids=tf.maximum(batch["token_ids"], 0))
            loss_sum, count = lm.loss(prompt, clean)
            return loss_sum * tf.where(corrupted, float("inf"), 1.0), count

        return types.SimpleNamespace(loss=loss)

    process = program.build_training_process(
        config, model_fn=model_fn, prompt_shape=initial_prompt.shape, initial_prompt=initial_prompt
    )
    return config, data, process, initial_prompt


def _corrupt(dataset):
    def corrupt(batch):
        ids = tf.tensor_scatter_nd_update(batch["token_ids"], [[0, 0]], [-1])
        return collections.OrderedDict(
            (k, ids if k == "token_ids" else v) for k, v in batch.items()
        )

    return dataset.map(corrupt)


def _train(config, data, process, output_dir, **overrides):
    return program.train(
        dataclasses.replace(config, output_dir=str(output_dir), **overrides),
        process=process,
        data=data,
        evaluator=types.SimpleNamespace(evaluate_prompt=lambda prompt, split: {}),
        output_dir=output_dir,
        progress=lambda line: None,
    )


def test_one_nonfinite_client_is_excluded_counted_and_the_run_continues(training_setup, tmp_path):
    config, data, process, initial_prompt = training_setup
    bad = dataclasses.replace(
        data, train_datasets=[_corrupt(data.train_datasets[0])] + data.train_datasets[1:]
    )
    prompt = _train(config, bad, process, tmp_path)
    rows = _csv(tmp_path / "rounds.csv")
    assert [r["round"] for r in rows] == ["1", "2"]
    for r in rows:
        assert (float(r["num_clients"]), float(r["num_nonfinite_clients"])) == (3, 1), r
        assert np.isfinite(float(r["train_loss"])) and float(r["update_norm_max"]) > 0
    assert np.all(np.isfinite(prompt)) and not np.allclose(prompt, initial_prompt)


def test_all_nonfinite_clients_stop_the_run_and_keep_the_last_good_state(training_setup, tmp_path):
    config, data, process, _ = training_setup
    good = _train(config, data, process, tmp_path)  # rounds 1-2, saved
    bad = dataclasses.replace(data, train_datasets=[_corrupt(d) for d in data.train_datasets])
    with pytest.raises(program.NonFiniteRoundError) as raised:
        _train(config, bad, process, tmp_path, rounds=4)
    # Round 3 is already bad: the error names it; the state kept is round 2's.
    assert str(raised.value).startswith("round 3: all 3 clients produced a non-finite"), (
        raised.value
    )
    assert "--client_learning_rate" in str(raised.value)
    assert [r["round"] for r in _csv(tmp_path / "rounds.csv")] == ["1", "2"]
    manager = tff.program.FileProgramStateManager(str(tmp_path / "checkpoints"))
    state, version = asyncio.run(manager.load_latest(process.initialize()))
    assert version == 2
    np.testing.assert_array_equal(np.asarray(state.prompt), good)


def test_unreadable_checkpoint_is_one_line_error_naming_it(tmp_path):
    import asyncio

    import numpy as np
    import tensorflow_federated as tff

    from fedprompt import program

    checkpoints = tmp_path / "checkpoints"
    manager = tff.program.FileProgramStateManager(str(checkpoints), keep_total=2)
    state = [np.arange(4, dtype=np.float32)]
    asyncio.run(manager.save(state, 3))
    loaded, version = program.load_program_state(manager, state, checkpoints)
    assert version == 3
    np.testing.assert_array_equal(loaded[0], state[0])

    data_file = next((checkpoints / "program_state_3" / "variables").glob("variables.data-*"))
    data_file.write_bytes(b"garbage")
    with pytest.raises(program.ConfigError) as raised:
        program.load_program_state(manager, state, checkpoints)
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(
        f"--output_dir: the saved program state {checkpoints}/program_state_3 "
    )
    assert "delete that directory" in message and "--overwrite" in message
