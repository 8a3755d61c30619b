"""fedprompt.report on a small hand-designed results directory.

Synthetic personalization scores, start "fedavg":
  * clients: validation v1, v2; test t1, t2, t3, with epoch-0 (global prompt)
    local / global ROUGE-L
        v1 0.3 / 0.6, v2 0.5 / 0.4, t1 0.2 / 0.6, t2 0.4 / 0.5, t3 0.3 / 0.7
    so the test means at epoch 0 are local 0.3, global 0.6;
  * at epochs e > 0, for a grid point with rates (a_val, a_test, b):
        local  = L0 + e * a      (a = a_val on validation, a_test on test)
                     - 0.15 on client t2
        global = G0 - e * b      - 0.03 on client t3.
    Test means at e > 0: local 0.3 + e * a_test - 0.05, global 0.6 - e * b - 0.01.
"""

import csv
import json
import math
import pathlib
import re

import pytest

from fedprompt import report

START = "fedavg"
LEARNING_RATES = (0.01, 0.1)
EPOCHS = (0, 1, 2)
L2_STRENGTH = 0.1
BASE_SCORES = {  # client: (split, local ROUGE-L, global ROUGE-L) at epoch 0
    "v1": ("validation", 0.3, 0.6),
    "v2": ("validation", 0.5, 0.4),
    "t1": ("test", 0.2, 0.6),
    "t2": ("test", 0.4, 0.5),
    "t3": ("test", 0.3, 0.7),
}
LOCAL_BUMP = {"t2": -0.15}
GLOBAL_BUMP = {"t3": -0.03}
FINETUNE_RATES = {0.01: (0.10, 0.06, 0.04), 0.1: (0.05, 0.10, 0.10)}
# (method, learning rate, l2 strength, alpha) -> (a_val, a_test, b)
RATES = {
    ("finetune", 0.01, 0.0, 1.0): FINETUNE_RATES[0.01],
    ("finetune", 0.1, 0.0, 1.0): FINETUNE_RATES[0.1],
    # Tied on validation: the smaller learning rate must be selected.
    ("l2", 0.01, L2_STRENGTH, 1.0): (0.06, 0.04, 0.02),
    ("l2", 0.1, L2_STRENGTH, 1.0): (0.06, 0.06, 0.03),
    ("interpolation", 0.01, 0.0, 0.0): (0.0, 0.0, 0.0),
    ("interpolation", 0.1, 0.0, 0.0): (0.0, 0.0, 0.0),
    ("interpolation", 0.01, 0.0, 0.5): (0.12, 0.035, 0.01),
    ("interpolation", 0.1, 0.0, 0.5): (0.04, 0.05, 0.045),
    ("interpolation", 0.01, 0.0, 1.0): FINETUNE_RATES[0.01],
    ("interpolation", 0.1, 0.0, 1.0): FINETUNE_RATES[0.1],
}
PERSONALIZATION_COLUMNS = (
    "start",
    "client_id",
    "client_split",
    "method",
    "optimizer",
    "learning_rate",
    "epochs",
    "l2_strength",
    "alpha",
    "local_rougeL",
    "global_rougeL",
    "local_loss",
    "global_loss",
    "local_exact_match",
    "global_exact_match",
)
ROUNDS_COLUMNS = (
    "round",
    "elapsed_s",
    "train_loss",
    "grad_norm_mean",
    "grad_norm_min",
    "grad_norm_max",
    "update_norm_mean",
    "update_norm_min",
    "update_norm_max",
    "server_update_norm",
    "num_clients",
    "num_nonfinite_clients",
    "val_local_rougeL",
    "val_global_rougeL",
    "val_local_loss",
    "val_global_loss",
)


def personalization_rows():
    rows = []
    for (method, learning_rate, l2_strength, alpha), rates in RATES.items():
        a_val, a_test, b = rates
        for client, (split, local0, global0) in BASE_SCORES.items():
            for epochs in EPOCHS:
                a = a_val if split == "validation" else a_test
                local, global_ = local0, global0
                if epochs:
                    local += epochs * a + LOCAL_BUMP.get(client, 0.0)
                    global_ += -epochs * b + GLOBAL_BUMP.get(client, 0.0)
                rows.append(
                    {
                        "start": START,
                        "client_id": client,
                        "client_split": split,
                        "method": method,
                        "optimizer": "sgd",
                        "learning_rate": learning_rate,
                        "epochs": epochs,
                        "l2_strength": l2_strength,
                        "alpha": alpha,
                        "local_rougeL": local,
                        "global_rougeL": global_,
                        "local_loss": 1.0 + epochs,
                        "global_loss": 2.0 + epochs,
                        "local_exact_match": 0.0,
                        "global_exact_match": "nan",
                    }
                )
    return rows


def write_csv(path, columns, rows):
    with path.open("w", newline="") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_results_dir(path: pathlib.Path, rounds=True) -> pathlib.Path:
    write_csv(path / "personalization.csv", PERSONALIZATION_COLUMNS, personalization_rows())
    round_rows = []
    if rounds:
        for round_number in (1, 2, 3):
            evaluated = round_number != 2
            round_rows.append(
                {
                    "round": round_number,
                    "elapsed_s": 10.0 * round_number,
                    "train_loss": 3.0 / round_number,
                    "grad_norm_mean": 1.0,
                    "grad_norm_min": 0.5,
                    "grad_norm_max": "nan" if round_number == 3 else 2.0,
                    "update_norm_mean": 0.1,
                    "update_norm_min": 0.05,
                    "update_norm_max": 0.2,
                    "server_update_norm": 0.08,
                    "num_clients": 4,
                    "num_nonfinite_clients": 0,
                    "val_local_rougeL": 0.1 * round_number if evaluated else "",
                    "val_global_rougeL": 0.2 * round_number if evaluated else "",
                    "val_local_loss": 1.0 if evaluated else "",
                    "val_global_loss": 1.5 if evaluated else "",
                }
            )
    write_csv(path / "rounds.csv", ROUNDS_COLUMNS, round_rows)
    config = {
        "algorithm": START,
        "backbone": "tiny",
        "data": "synthetic",
        "partition": "dirichlet",
        "alpha": 0.1,
        "rounds": 3,
        "seed": 7,
        "client_optimizer": "sgd",
        "client_learning_rate": 0.1,
        "server_optimizer": "adam",
        "extra": {"nested": [1, 2]},
    }
    (path / "config.json").write_text(json.dumps(config))
    partition = {"num_clients": 5, "client_sizes": list(range(10, 22)), "stats": {"gini": 0.25}}
    (path / "partition.json").write_text(json.dumps(partition))
    return path


@pytest.fixture(scope="module")
def summary():
    return report.summarize_personalization(personalization_rows())


def grid_entry(summary, method, learning_rate, epochs, alpha=1.0):
    matches = [
        e
        for e in summary["starts"][START]["grid"]
        if e["method"] == method
        and e["learning_rate"] == learning_rate
        and e["epochs"] == epochs
        and e["alpha"] == alpha
    ]
    assert len(matches) == 1
    return matches[0]


def test_read_csv_converts_numbers_and_keeps_strings(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("start,client_id,epochs,val_local_rougeL,note\nfedavg,7,2,,a\nlocal,8,0,0.5,\n")
    rows = report.read_csv(path)
    assert rows[0]["start"] == "fedavg" and rows[0]["client_id"] == "7"
    assert rows[0]["epochs"] == 2.0 and math.isnan(rows[0]["val_local_rougeL"])
    assert rows[1]["val_local_rougeL"] == 0.5
    assert rows[0]["note"] == "a" and rows[1]["note"] == ""
    (tmp_path / "empty.csv").write_text("")
    assert report.read_csv(tmp_path / "empty.csv") == []


def test_summary_is_strict_json(summary):
    json.dumps(summary, allow_nan=False)
    entry = grid_entry(summary, "finetune", 0.1, 2)
    assert entry["num_clients"] == 3
    assert entry["global_exact_match_mean"] is None  # all NaN
    assert entry["local_loss_mean"] == pytest.approx(3.0)


def test_global_prompt_means(summary):
    global_prompt = summary["starts"][START]["global_prompt"]
    assert global_prompt["num_clients"] == 3
    assert global_prompt["local_rougeL"]["mean"] == pytest.approx(0.3)
    assert global_prompt["global_rougeL"]["mean"] == pytest.approx(0.6)
    assert global_prompt["local_rougeL"]["median"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "learning_rate,epochs,forgetting,fraction_worse",
    [
        # Global drops e * b (+0.03 on t3); local changes e * a_test (-0.15 on t2).
        (0.1, 2, (0.2 + 0.2 + 0.23) / 3, 0.0),  # t2: +0.20 - 0.15 > 0
        (0.1, 1, (0.1 + 0.1 + 0.13) / 3, 1 / 3),  # t2: +0.10 - 0.15 < 0
        (0.01, 2, (0.08 + 0.08 + 0.11) / 3, 1 / 3),  # t2: +0.12 - 0.15 < 0
        (0.01, 0, 0.0, 0.0),
    ],
)
def test_forgetting_and_fraction_worse(summary, learning_rate, epochs, forgetting, fraction_worse):
    entry = grid_entry(summary, "finetune", learning_rate, epochs)
    assert entry["forgetting"] == pytest.approx(forgetting)
    assert entry["fraction_worse_local"] == pytest.approx(fraction_worse)


def test_quantiles_of_a_grid_point(summary):
    # finetune lr 0.1, 2 epochs, test local: t1 0.4, t2 0.45, t3 0.5.
    local = grid_entry(summary, "finetune", 0.1, 2)["local_rougeL"]
    assert local["mean"] == pytest.approx(0.45)
    assert local["median"] == pytest.approx(0.45)
    assert local["q10"] == pytest.approx(0.41)
    assert local["q90"] == pytest.approx(0.49)


@pytest.mark.parametrize(
    "method,learning_rate,alpha,validation_local,test_local,test_global,forgetting",
    [
        # Validation prefers lr 0.01 (0.4 + 2 * 0.10 = 0.6) although the test
        # clients prefer lr 0.1 (0.45 vs 0.37).
        ("finetune", 0.01, 1.0, 0.6, 0.37, 0.51, 0.09),
        # Tied on validation (0.52): the smaller learning rate wins.
        ("l2", 0.01, 1.0, 0.52, 0.33, 0.55, 0.05),
        # alpha 0.5 beats alpha 1 on validation (0.64 vs 0.6).
        ("interpolation", 0.01, 0.5, 0.64, 0.32, 0.57, 0.03),
    ],
)
def test_motley_selection(
    summary, method, learning_rate, alpha, validation_local, test_local, test_global, forgetting
):
    selection = summary["starts"][START]["motley"][method]
    assert selection["selected_on"] == "validation"
    assert selection["setting"] == {
        "optimizer": "sgd",
        "learning_rate": learning_rate,
        "l2_strength": L2_STRENGTH if method == "l2" else 0.0,
        "alpha": alpha,
        "epochs": 2,
    }
    assert selection["num_selection_clients"] == 2
    assert selection["selection_local_rougeL_mean"] == pytest.approx(validation_local)
    assert selection["test_local_rougeL_mean"] == pytest.approx(test_local)
    assert selection["test_global_rougeL_mean"] == pytest.approx(test_global)
    assert selection["test_forgetting"] == pytest.approx(forgetting)


def test_motley_selects_on_test_without_validation_clients():
    rows = [r for r in personalization_rows() if r["client_split"] == "test"]
    selection = report.summarize_personalization(rows)["starts"][START]["motley"]["finetune"]
    assert selection["selected_on"] == "test"
    assert selection["setting"]["learning_rate"] == 0.1
    assert selection["setting"]["epochs"] == 2
    assert selection["test_local_rougeL_mean"] == pytest.approx(0.45)


def test_motley_ties_prefer_fewer_epochs():
    # Interpolation with alpha 0 only: every epoch ties with epoch 0 on validation.
    rows = [
        r
        for r in personalization_rows()
        if r["method"] == "interpolation" and r["alpha"] == 0.0 and r["client_split"] != "test"
    ]
    for row in rows:
        row["local_rougeL"] = BASE_SCORES[row["client_id"]][1]
    selection = report.summarize_personalization(rows)["starts"][START]["motley"]["interpolation"]
    assert selection["setting"]["epochs"] == 0
    assert selection["setting"]["learning_rate"] == 0.01


def pareto_settings(summary, method):
    return [
        (
            p["learning_rate"],
            p["alpha"],
            p["epochs"],
            p["local_rougeL_mean"],
            p["global_rougeL_mean"],
        )
        for p in summary["starts"][START]["pareto"][method]
    ]


def test_pareto_frontier(summary):
    approx = pytest.approx
    # Test points (local, global): epoch 0 (0.30, 0.60); lr 0.01: (0.31, 0.55),
    # (0.37, 0.51); lr 0.1: (0.35, 0.49) (dominated by (0.37, 0.51)), (0.45, 0.39).
    assert pareto_settings(summary, "finetune") == [
        (0.01, 1.0, 0, approx(0.30), approx(0.60)),
        (0.01, 1.0, 1, approx(0.31), approx(0.55)),
        (0.01, 1.0, 2, approx(0.37), approx(0.51)),
        (0.1, 1.0, 2, approx(0.45), approx(0.39)),
    ]
    # alpha 0 (0.25, 0.59) and alpha 0.5 lr 0.01 1 epoch (0.285, 0.58) are dominated
    # by epoch 0; alpha 0.5 lr 0.01 2 epochs (0.32, 0.57) dominates (0.31, 0.55).
    assert pareto_settings(summary, "interpolation") == [
        (0.01, 0.0, 0, approx(0.30), approx(0.60)),
        (0.01, 0.5, 2, approx(0.32), approx(0.57)),
        (0.01, 1.0, 2, approx(0.37), approx(0.51)),
        (0.1, 1.0, 2, approx(0.45), approx(0.39)),
    ]


def linked_plots(report_text):
    return re.findall(r"\]\((plots/[^)]+\.png)\)", report_text)


def test_write_all(tmp_path):
    results_dir = write_results_dir(tmp_path)
    outputs = report.write_all(results_dir)
    plots = sorted(p.name for p in (results_dir / "plots").glob("*.png"))
    assert plots == ["epochs_fedavg.png", "norms.png", "tradeoff_fedavg.png", "validation.png"]
    assert sorted(p.name for p in outputs["plots"]) == plots
    assert outputs["report"] == results_dir / "report.md"

    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary == report.summarize_personalization(
        report.read_csv(tmp_path / "personalization.csv")
    )

    text = (results_dir / "report.md").read_text()
    links = linked_plots(text)
    assert sorted(pathlib.Path(link).name for link in links) == plots
    assert all((results_dir / link).is_file() for link in links)
    assert text.startswith("# fedprompt results: fedavg on synthetic")
    assert "summary.json" in text
    assert "| 0.37 | 0.51 | 0.09 |" in text  # finetune Motley test local/global/forgetting
    assert "| total time (s) | 30 |" in text
    assert "| last validation local ROUGE-L | 0.3 |" in text


def test_header_only_rounds(tmp_path):
    results_dir = write_results_dir(tmp_path, rounds=False)
    (results_dir / "plots").mkdir()
    (results_dir / "plots" / "norms.png").write_bytes(b"stale")  # from an earlier call
    report.write_all(results_dir)
    plots = sorted(p.name for p in (results_dir / "plots").glob("*.png"))
    assert plots == ["epochs_fedavg.png", "tradeoff_fedavg.png"]
    text = (results_dir / "report.md").read_text()
    assert "norms.png" not in text and "validation.png" not in text
    assert all((results_dir / link).is_file() for link in linked_plots(text))
    assert "No federated rounds were recorded" in text


def test_missing_personalization_and_nan_scores(tmp_path):
    results_dir = write_results_dir(tmp_path)
    (results_dir / "personalization.csv").unlink()
    report.write_all(results_dir)
    assert sorted(p.name for p in (results_dir / "plots").glob("*.png")) == [
        "norms.png",
        "validation.png",
    ]
    assert "No personalization results" in (results_dir / "report.md").read_text()

    rows = personalization_rows()
    for row in rows:
        row["local_rougeL"] = "nan"
    write_csv(results_dir / "personalization.csv", PERSONALIZATION_COLUMNS, rows)
    report.write_all(results_dir)
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary["starts"][START]["motley"] == {}
    assert summary["starts"][START]["pareto"]["finetune"] == []


def test_aggregate_summaries(tmp_path):
    run_dir = write_results_dir(tmp_path)
    (row,) = report.aggregate_summaries([run_dir])
    assert row["algorithm"] == "fedavg" and row["partition"] == "dirichlet"
    assert row["alpha"] == 0.1 and row["home_fraction"] is None
    assert row["client_optimizer"] == "sgd" and row["server_optimizer"] == "adam"
    assert row["client_learning_rate"] == 0.1
    assert row["start"] == START
    assert row["motley_test_local_rougeL"] == pytest.approx(0.37)
    assert row["motley_test_global_rougeL"] == pytest.approx(0.51)
    assert row["global_prompt_local_rougeL"] == pytest.approx(0.3)
    assert row["global_prompt_global_rougeL"] == pytest.approx(0.6)
