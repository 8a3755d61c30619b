"""Hand-designed personalization scores for the claims and sweep tests.

One validation and one test client with identical scores, so every test mean
equals the value written here and the numbers of each claim can be worked out
by hand (see tests/test_claims.py).
"""

import csv
import json
import math
import pathlib

from fedprompt import claims, report

START = "fedavg"
FINETUNE_L2, FINETUNE_ALPHA = 0.0, 1.0
L2_STRENGTH = 0.1

# {lr: [(epochs, local, global)]}, epoch 0 = the global prompt (0.30, 0.50).
GOOD_FINETUNE = {
    0.01: [(0, 0.30, 0.50), (1, 0.32, 0.49), (4, 0.36, 0.47)],
    0.3: [(0, 0.30, 0.50), (1, 0.40, 0.44), (4, 0.50, 0.35)],
}
# Hypervolume of those five distinct points, from the largest local score:
# 0.50*0.35 + 0.40*0.09 + 0.36*0.03 + 0.32*0.02 + 0.30*0.01.
GOOD_HYPERVOLUME = 0.2312
WEAK_FINETUNE = {
    0.01: [(0, 0.20, 0.40), (1, 0.21, 0.39), (4, 0.22, 0.38)],
    0.3: [(0, 0.20, 0.40), (1, 0.25, 0.30), (4, 0.30, 0.20)],
}
# 0.30*0.20 + 0.25*0.10 + 0.22*0.08 + 0.21*0.01 + 0.20*0.01.
WEAK_HYPERVOLUME = 0.1067


def personalization_rows(finetune, l2=None, interpolation=None):
    """personalization.csv rows for clients v1 (validation) and t1 (test).

    Args:
      finetune: {lr: [(epochs, local, global)]}.
      l2: {lr: [(epochs, local, global)]} at `L2_STRENGTH`.
      interpolation: {(lr, alpha): [(epochs, local, global)]}.
    """
    points = []
    for lr, curve in finetune.items():
        points += [("finetune", lr, e, FINETUNE_L2, FINETUNE_ALPHA, lo, gl) for e, lo, gl in curve]
    for lr, curve in (l2 or {}).items():
        points += [("l2", lr, e, L2_STRENGTH, 1.0, lo, gl) for e, lo, gl in curve]
    for (lr, alpha), curve in (interpolation or {}).items():
        points += [("interpolation", lr, e, 0.0, alpha, lo, gl) for e, lo, gl in curve]
    rows = []
    for client, split in (("v1", "validation"), ("t1", "test")):
        for method, lr, epochs, l2_strength, alpha, local, global_ in points:
            rows.append(
                {
                    "start": START,
                    "client_id": client,
                    "client_split": split,
                    "method": method,
                    "optimizer": "sgd",
                    "learning_rate": lr,
                    "epochs": epochs,
                    "l2_strength": l2_strength,
                    "alpha": alpha,
                    "local_rougeL": local,
                    "global_rougeL": global_,
                    "local_loss": 1.0,
                    "global_loss": 1.0,
                    "local_exact_match": 0.0,
                    "global_exact_match": 0.0,
                }
            )
    return rows


def norm_rounds(update_norms, grad_norms):
    return [
        {"round": float(i), "update_norm_mean": u, "grad_norm_mean": g}
        for i, (u, g) in enumerate(zip(update_norms, grad_norms), start=1)
    ]


def make_run(
    algorithm,
    level="natural",
    *,
    finetune=None,
    l2=None,
    interpolation=None,
    heterogeneity=math.nan,
    rounds=(),
):
    """A `claims.RunResult` of hand-written scores."""
    rows = personalization_rows(finetune or GOOD_FINETUNE, l2, interpolation)
    return claims.RunResult(
        name=f"{algorithm}__{level}",
        algorithm=algorithm,
        level=level,
        heterogeneity=heterogeneity,
        summary=report.summarize_personalization(rows),
        rounds=list(rounds),
        config={"algorithm": START, "personalization_optimizer": "sgd"},
    )


def write_run_dir(run_dir, *, config, rows, rounds=(), heterogeneity=0.5, flags=None):
    """A complete results directory as the experiment program leaves it."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / report.CONFIG_JSON).write_text(json.dumps(dict(config, flags=flags or {})))
    (run_dir / report.PARTITION_JSON).write_text(json.dumps({"heterogeneity": heterogeneity}))
    with (run_dir / report.PERSONALIZATION_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = ("round", "update_norm_mean", "grad_norm_mean")
    with (run_dir / report.ROUNDS_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rounds)
    report.write_report(run_dir)
    return run_dir
