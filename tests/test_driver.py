"""run_experiment.py end to end (subprocess) and its flag validation (in process)."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from absl.testing import flagsaver

import run_experiment
from fedprompt import personalization, program
from fedprompt.backbones import tiny

REPO = pathlib.Path(__file__).resolve().parent.parent

# A backbone small enough to pre-train in seconds; the driver reads it as a
# local preset directory, like any user preset.
SMALL = tiny.TinyConfig(
    vocabulary_size=300,
    num_layers=1,
    num_heads=2,
    hidden_dim=32,
    intermediate_dim=64,
    max_sequence_length=96,
    train_sequence_length=40,
    instances_per_task=8,
    batch_size=16,
    steps=30,
    warmup_steps=5,
    log_every=10,
)

TINY_RUN = [
    "--num_clients=4",
    "--clients_per_round=2",
    "--num_validation_clients=1",
    "--num_test_clients=2",
    "--synthetic_instances_per_task=10",
    "--global_test_per_category=1",
    "--max_global_test_examples=4",
    "--max_local_test_examples=3",
    "--sequence_length=64",
    "--max_new_tokens=3",
    "--prompt_length=2",
    "--batch_size=4",
    "--eval_every=1",
    "--checkpoint_every=1",
    "--personalization_learning_rates=0.3",
    "--personalization_epochs=0,1",
    "--l2_strengths=1.0",
    "--interpolation_alphas=0.5",
]


@pytest.fixture(scope="module")
def small_preset(tmp_path_factory):
    return tiny.build_tiny(output_dir=tmp_path_factory.mktemp("preset") / "small", config=SMALL)


def _run(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "run_experiment.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_driver_end_to_end_and_resume(small_preset, tmp_path):
    common = [f"--backbone={small_preset}", *TINY_RUN]
    full = _run([*common, "--rounds=3", f"--output_dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "full"
    assert "report:" in full.stdout and "round 3/3" in full.stdout
    for name in ("config.json", "partition.json", "rounds.csv", "personalization.csv", "report.md"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    assert list((out / "plots").glob("*.png"))
    recorded = json.loads((out / "config.json").read_text())
    assert (
        recorded["rounds"] == 3
        and recorded["algorithm"] == "fedavg"
        and recorded["flags"]["clients_per_round"] == 2
    )
    assert recorded["versions"]["tensorflow_federated"] == "0.87.0"

    rounds = _rows(out / "rounds.csv")
    assert [int(r["round"]) for r in rounds] == [1, 2, 3]
    assert set(program.ROUND_COLUMNS) == set(rounds[0])
    assert all(np.isfinite(float(r["train_loss"])) for r in rounds)
    assert all(r["val_local_rougeL"] != "" for r in rounds)

    records = _rows(out / "personalization.csv")
    assert tuple(records[0]) == program.PERSONALIZATION_COLUMNS
    # 3 clients x (finetune + interpolation + l2) x epochs {0, 1}.
    assert len(records) == 3 * 3 * 2
    assert {r["client_split"] for r in records} == {"validation", "test"}
    assert {r["method"] for r in records} == {
        personalization.FINETUNE,
        personalization.L2,
        personalization.INTERPOLATION,
    }

    # Interrupted after round 2, then resumed to round 3: the same final prompt.
    part = tmp_path / "part"
    first = _run([*common, "--rounds=2", f"--output_dir={part}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run([*common, "--rounds=3", f"--output_dir={part}"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from the program state saved after round 2" in second.stdout
    assert [int(r["round"]) for r in _rows(part / "rounds.csv")] == [1, 2, 3]
    np.testing.assert_allclose(
        np.load(part / "final_prompt.npy"), np.load(out / "final_prompt.npy"), atol=1e-6
    )
    # A changed setting in the same directory is refused, naming the setting.
    changed = _run([*common, "--rounds=3", "--seed=1", f"--output_dir={part}"], tmp_path)
    assert changed.returncode == 2 and "seed" in changed.stderr


def test_unknown_choice_is_rejected_by_absl(tmp_path):
    result = _run(["--partition=bogus", f"--output_dir={tmp_path}"], tmp_path)
    assert result.returncode != 0
    assert "partition" in result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(client_learning_rate=-1.0), "--client_learning_rate: must be a finite number > 0"),
        (
            dict(partition="dirichlet", alpha=0.0),
            "--alpha: --partition=dirichlet needs --alpha > 0",
        ),
        (dict(alpha=0.5), "--alpha: is only used with --partition=dirichlet"),
        (dict(clients_per_round=20, num_clients=4), "--clients_per_round: 20 exceeds"),
        (dict(data="/nonexistent/sni"), "--data: '/nonexistent/sni' is not a directory"),
        (dict(algorithm="fedsgd", client_optimizer="adam"), "--client_optimizer is not used"),
        (dict(personalization_epochs=["4", "2"]), "personalization_epochs"),
        (dict(interpolation_alphas=["1.5"]), "interpolation_alphas"),
        (dict(l2_strengths=["x"]), "--l2_strengths: expected comma-separated numbers"),
        (dict(backbone="no-such-model"), "--backbone='no-such-model' is unknown"),
    ],
)
def test_bad_flags_exit_with_one_line(overrides, message, tmp_path, capsys):
    with flagsaver.flagsaver(output_dir=str(tmp_path / "out"), **overrides):
        assert run_experiment.main(["run_experiment.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "out" / "rounds.csv").exists()
