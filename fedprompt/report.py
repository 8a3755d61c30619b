"""Report for one results directory: personalization summaries, plots, report.md.

A results directory written by the experiment program holds

  * `rounds.csv`: one row per federated round (losses, gradient and update
    norms, and `val_*` scores in the rounds where validation ran; empty strings
    elsewhere). It may be empty or header-only (algorithm `local`).
  * `personalization.csv`: one row per (start, client, split, method, optimizer,
    learning rate, epochs, l2 strength, alpha) with local and global scores.
    Epoch-0 rows score the starting (global) prompt.
  * `config.json` and `partition.json`: free-form dictionaries.

`write_all` turns it into `plots/*.png`, `summary.json` (the output of
`summarize_personalization`) and a self-contained `report.md`.
`aggregate_summaries` gives one row per run for a sweep-level table.

Conventions:
  * Statistics skip non-finite values (NaN scores of diverged runs); every
    statistic without any finite input is NaN in Python and `null` in JSON.
  * Per-client duplicates of one grid point are averaged before averaging over
    clients.
  * `elapsed_s` is the wall time from the start of training to the end of the
    round, so the total time is its last (largest) value.

This module deliberately avoids TensorFlow so that it imports in well under a
second; plots use matplotlib's object-oriented API with the Agg canvas (no
pyplot global state).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PathLike = Union[str, pathlib.Path]

ROUNDS_CSV = "rounds.csv"
PERSONALIZATION_CSV = "personalization.csv"
CONFIG_JSON = "config.json"
PARTITION_JSON = "partition.json"
SUMMARY_JSON = "summary.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"

VALIDATION_SPLIT = "validation"
TEST_SPLIT = "test"
FINETUNE = "finetune"
L2 = "l2"
INTERPOLATION = "interpolation"

# Columns that are always text, even when their values look like numbers.
STRING_COLUMNS = frozenset({"start", "client_id", "client_split", "method", "optimizer"})
# Columns that are always numbers; unparseable values become NaN.
NUMERIC_COLUMNS = frozenset(
    {
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
    }
)

METRIC_FIELDS = (
    "local_rougeL",
    "global_rougeL",
    "local_loss",
    "global_loss",
    "local_exact_match",
    "global_exact_match",
)
# The fields that, with the method, identify one grid point of a start.
SETTING_FIELDS = ("optimizer", "learning_rate", "l2_strength", "alpha", "epochs")

# Config keys shown first in the report, and the sweep fields of
# `aggregate_summaries`.
KEY_CONFIG_FIELDS = (
    "algorithm",
    "backbone",
    "data",
    "partition",
    "rounds",
    "seed",
    "alpha",
    "home_fraction",
    "clients_per_round",
    "client_optimizer",
    "client_learning_rate",
    "server_optimizer",
    "server_learning_rate",
)
AGGREGATE_CONFIG_FIELDS = (
    "algorithm",
    "partition",
    "alpha",
    "home_fraction",
    "client_optimizer",
    "client_learning_rate",
    "server_optimizer",
)

_METHOD_LINESTYLES = {FINETUNE: "-", L2: "--", INTERPOLATION: ":"}
_PLOT_PATTERNS = ("norms.png", "validation.png", "tradeoff_*.png", "epochs_*.png")

# (start, split, method, optimizer, learning_rate, l2_strength, alpha, epochs)
_GroupKey = Tuple[str, str, str, str, Optional[float], Optional[float], Optional[float], Any]
_ClientScores = Dict[str, Dict[str, float]]


# --------------------------------------------------------------------------- #
# Reading inputs.
# --------------------------------------------------------------------------- #


def _to_float(value: Any) -> float:
    """Returns `value` as a float; empty, missing or unparseable values are NaN."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    text = str(value).strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def _parses_as_float(value: Optional[str]) -> bool:
    if value is None or not value.strip():
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_csv(path: PathLike) -> List[Dict[str, Any]]:
    """Reads a CSV file with a header into one dict per row.

    Numeric columns become floats (empty strings become NaN); text columns
    (`STRING_COLUMNS`, and any unknown column with a non-numeric value) stay
    strings.

    Args:
      path: the CSV file. An empty file or a header-only file gives `[]`.

    Returns:
      The rows, in file order.
    """
    with pathlib.Path(path).open(newline="") as csv_file:
        reader = csv.DictReader(csv_file)
        raw_rows = list(reader)
        fieldnames = list(reader.fieldnames or [])
    numeric_columns = {
        name
        for name in fieldnames
        if name not in STRING_COLUMNS
        and (name in NUMERIC_COLUMNS or all(_parses_as_float(row.get(name)) for row in raw_rows))
    }
    rows = []
    for raw_row in raw_rows:
        row = {}
        for name, value in raw_row.items():
            if name is None:  # Values beyond the header.
                continue
            if name in numeric_columns:
                row[name] = _to_float(value)
            else:
                row[name] = "" if value is None else value
        rows.append(row)
    return rows


def _read_optional_csv(path: pathlib.Path) -> List[Dict[str, Any]]:
    return read_csv(path) if path.is_file() else []


def _read_optional_json(path: pathlib.Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open() as json_file:
        content = json.load(json_file)
    return content if isinstance(content, dict) else {"value": content}


# --------------------------------------------------------------------------- #
# Statistics helpers.
# --------------------------------------------------------------------------- #


def _finite(values: Iterable[float]) -> np.ndarray:
    array = np.asarray([_to_float(v) for v in values], dtype=np.float64)
    return array[np.isfinite(array)]


def _mean(values: Iterable[float]) -> float:
    finite = _finite(values)
    return float(np.mean(finite)) if finite.size else math.nan


def _distribution(values: Iterable[float]) -> Dict[str, float]:
    finite = _finite(values)
    if not finite.size:
        return {"mean": math.nan, "median": math.nan, "q10": math.nan, "q90": math.nan}
    return {
        "mean": float(np.mean(finite)),
        "median": float(np.median(finite)),
        "q10": float(np.quantile(finite, 0.1)),
        "q90": float(np.quantile(finite, 0.9)),
    }


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _json_safe(value: Any) -> Any:
    """Recursively replaces NaN/inf by None and numpy scalars by Python ones."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# --------------------------------------------------------------------------- #
# Personalization summaries.
# --------------------------------------------------------------------------- #


def _setting_number(value: Any) -> Optional[float]:
    number = _to_float(value)
    return number if math.isfinite(number) else None


def _epochs_value(value: Any) -> Any:
    number = _to_float(value)
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() else number


def _sortable(value: Any) -> Tuple[bool, Any]:
    """Sort key that puts None last and never compares None with numbers."""
    return (value is None, 0 if value is None else value)


def _group_key(row: Mapping[str, Any]) -> _GroupKey:
    return (
        str(row.get("start", "")),
        str(row.get("client_split", "")).strip().lower(),
        str(row.get("method", "")),
        str(row.get("optimizer", "")),
        _setting_number(row.get("learning_rate")),
        _setting_number(row.get("l2_strength")),
        _setting_number(row.get("alpha")),
        _epochs_value(row.get("epochs")),
    )


def _setting_sort_key(key: _GroupKey) -> tuple:
    """Orders grid points: fewer epochs, smaller learning rate, then the rest."""
    _, _, method, optimizer, learning_rate, l2_strength, alpha, epochs = key
    return (
        _sortable(epochs),
        _sortable(learning_rate),
        _sortable(l2_strength),
        _sortable(alpha),
        method,
        optimizer,
    )


def _index_records(records: Iterable[Mapping[str, Any]]) -> Dict[_GroupKey, _ClientScores]:
    """Groups rows by grid point and client, averaging per-client duplicates."""
    collected: Dict[_GroupKey, Dict[str, Dict[str, List[float]]]] = {}
    for row in records:
        per_client = collected.setdefault(_group_key(row), {})
        client_metrics = per_client.setdefault(
            str(row.get("client_id", "")), {metric: [] for metric in METRIC_FIELDS}
        )
        for metric in METRIC_FIELDS:
            client_metrics[metric].append(_to_float(row.get(metric)))
    return {
        key: {
            client: {metric: _mean(values) for metric, values in metrics.items()}
            for client, metrics in per_client.items()
        }
        for key, per_client in collected.items()
    }


class _Baselines:
    """Epoch-0 (starting prompt) scores of each client."""

    def __init__(self, index: Mapping[_GroupKey, _ClientScores]):
        self._index = index
        pooled: Dict[Tuple[str, str, str], Dict[str, List[float]]] = {}
        for key, clients in index.items():
            if key[-1] != 0:
                continue
            for client, metrics in clients.items():
                slot = pooled.setdefault((key[0], key[1], client), {m: [] for m in METRIC_FIELDS})
                for metric, value in metrics.items():
                    slot[metric].append(value)
        self._pooled = {
            slot_key: {metric: _mean(values) for metric, values in metrics.items()}
            for slot_key, metrics in pooled.items()
        }

    def clients(self, start: str, split: str) -> _ClientScores:
        """Pooled epoch-0 scores of every client of a start and split."""
        return {
            client: metrics
            for (s, client_split, client), metrics in self._pooled.items()
            if s == start and client_split == split
        }

    def get(self, key: _GroupKey, client: str) -> Optional[Dict[str, float]]:
        """The epoch-0 row of the same grid point, else the client's pooled epoch 0."""
        same_setting = self._index.get(key[:-1] + (0,), {}).get(client)
        if same_setting is not None:
            return same_setting
        return self._pooled.get((key[0], key[1], client))


def _point_statistics(
    index: Mapping[_GroupKey, _ClientScores], baselines: _Baselines, key: _GroupKey
) -> Dict[str, Any]:
    """Client statistics of one grid point (see `summarize_personalization`)."""
    clients = index.get(key, {})
    forgetting = []
    worse_local = []
    for client, metrics in clients.items():
        baseline = baselines.get(key, client)
        if baseline is None:
            continue
        if math.isfinite(baseline["global_rougeL"]) and math.isfinite(metrics["global_rougeL"]):
            forgetting.append(baseline["global_rougeL"] - metrics["global_rougeL"])
        if math.isfinite(baseline["local_rougeL"]) and math.isfinite(metrics["local_rougeL"]):
            worse_local.append(float(metrics["local_rougeL"] < baseline["local_rougeL"]))
    return {
        "num_clients": len(clients),
        "local_rougeL": _distribution(m["local_rougeL"] for m in clients.values()),
        "global_rougeL": _distribution(m["global_rougeL"] for m in clients.values()),
        "local_loss_mean": _mean(m["local_loss"] for m in clients.values()),
        "global_loss_mean": _mean(m["global_loss"] for m in clients.values()),
        "local_exact_match_mean": _mean(m["local_exact_match"] for m in clients.values()),
        "global_exact_match_mean": _mean(m["global_exact_match"] for m in clients.values()),
        "forgetting": _mean(forgetting),
        "fraction_worse_local": _mean(worse_local),
    }


def _setting_dict(key: _GroupKey) -> Dict[str, Any]:
    _, _, _, optimizer, learning_rate, l2_strength, alpha, epochs = key
    return {
        "optimizer": optimizer,
        "learning_rate": learning_rate,
        "l2_strength": l2_strength,
        "alpha": alpha,
        "epochs": epochs,
    }


def _with_split(key: _GroupKey, split: str) -> _GroupKey:
    return (key[0], split) + key[2:]


def _motley_selection(
    index: Mapping[_GroupKey, _ClientScores],
    baselines: _Baselines,
    start: str,
    method: str,
) -> Optional[Dict[str, Any]]:
    """Selects a method's setting on validation clients and reports it on test clients.

    This is the protocol of Motley (Jain et al., 2023): the fine-tuning
    hyper-parameters, including the number of epochs, are chosen per method by
    the mean local ROUGE-L of validation clients; ties go to fewer epochs, then
    to the smaller learning rate. Without usable validation clients the choice
    is made on the test clients and flagged `selected_on: "test"`.
    """
    for split in (VALIDATION_SPLIT, TEST_SPLIT):
        candidates = []
        for key, clients in index.items():
            if key[0] != start or key[1] != split or key[2] != method:
                continue
            mean_local = _mean(m["local_rougeL"] for m in clients.values())
            if math.isfinite(mean_local):
                candidates.append((mean_local, key, len(clients)))
        if candidates:
            break
    else:
        return None
    # Round so that means equal up to float noise count as ties.
    best_mean, best_key, num_selection_clients = min(
        candidates, key=lambda c: (-round(c[0], 12), _setting_sort_key(c[1]))
    )
    test_key = _with_split(best_key, TEST_SPLIT)
    test = _point_statistics(index, baselines, test_key)
    return {
        "selected_on": split,
        "setting": _setting_dict(best_key),
        "selection_local_rougeL_mean": best_mean,
        "num_selection_clients": num_selection_clients,
        "num_test_clients": test["num_clients"],
        "test_local_rougeL_mean": test["local_rougeL"]["mean"],
        "test_global_rougeL_mean": test["global_rougeL"]["mean"],
        "test_forgetting": test["forgetting"],
        "test_fraction_worse_local": test["fraction_worse_local"],
    }


def _pareto_frontier(points: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Non-dominated points of (local, global) mean ROUGE-L, sorted by local.

    A point is dominated when another one is at least as good in both and
    better in one. Of identical points only the first (in the order of
    `points`) is kept.
    """
    usable = [
        p
        for p in points
        if math.isfinite(p["local_rougeL_mean"]) and math.isfinite(p["global_rougeL_mean"])
    ]
    # Stable sort: identical points keep their given order.
    ordered = sorted(usable, key=lambda p: (-p["local_rougeL_mean"], -p["global_rougeL_mean"]))
    frontier = []
    best_global = -math.inf
    for point in ordered:
        if point["global_rougeL_mean"] > best_global:
            frontier.append(point)
            best_global = point["global_rougeL_mean"]
    return frontier[::-1]


def summarize_personalization(records: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Summarizes personalization rows (as `read_csv` gives them).

    Args:
      records: rows of `personalization.csv`.

    Returns:
      A JSON-serialisable dict (NaN statistics are None):
        {"num_records": int,
         "starts": {start: {
            "global_prompt": epoch-0 statistics over test clients (pooled over
                methods): {"num_clients", "local_rougeL", "global_rougeL",
                "local_loss_mean", "global_loss_mean"},
            "grid": [one entry per test grid point: {"method", "optimizer",
                "learning_rate", "l2_strength", "alpha", "epochs",
                "num_clients", "local_rougeL": {"mean", "median", "q10", "q90"},
                "global_rougeL": {...}, "local_loss_mean", "global_loss_mean",
                "local_exact_match_mean", "global_exact_match_mean",
                "forgetting", "fraction_worse_local"}],
            "motley": {method: {"selected_on": "validation" | "test",
                "setting": {"optimizer", "learning_rate", "l2_strength",
                "alpha", "epochs"}, "selection_local_rougeL_mean",
                "num_selection_clients", "num_test_clients",
                "test_local_rougeL_mean", "test_global_rougeL_mean",
                "test_forgetting", "test_fraction_worse_local"}},
            "pareto": {method: [{"method", "optimizer", "learning_rate",
                "l2_strength", "alpha", "epochs", "local_rougeL_mean",
                "global_rougeL_mean"}], sorted by local_rougeL_mean},
         }}}
      `forgetting` is the client mean of (global ROUGE-L at epoch 0 - global
      ROUGE-L at the point); `fraction_worse_local` the fraction of clients
      whose local ROUGE-L is below their epoch-0 local ROUGE-L.
    """
    records = list(records)
    index = _index_records(records)
    baselines = _Baselines(index)
    starts = sorted({key[0] for key in index})
    summary: Dict[str, Any] = {"num_records": len(records), "starts": {}}
    for start in starts:
        test_keys = sorted(
            (k for k in index if k[0] == start and k[1] == TEST_SPLIT),
            key=lambda k: (
                (k[2], k[3], _sortable(k[4]), _sortable(k[5]), _sortable(k[6])) + (_sortable(k[7]),)
            ),
        )
        grid = []
        for key in test_keys:
            entry = {"method": key[2], **_setting_dict(key)}
            entry.update(_point_statistics(index, baselines, key))
            grid.append(entry)

        global_prompt_clients = baselines.clients(start, TEST_SPLIT)
        global_prompt = {
            "num_clients": len(global_prompt_clients),
            "local_rougeL": _distribution(
                m["local_rougeL"] for m in global_prompt_clients.values()
            ),
            "global_rougeL": _distribution(
                m["global_rougeL"] for m in global_prompt_clients.values()
            ),
            "local_loss_mean": _mean(m["local_loss"] for m in global_prompt_clients.values()),
            "global_loss_mean": _mean(m["global_loss"] for m in global_prompt_clients.values()),
        }

        methods = sorted({key[2] for key in index if key[0] == start})
        motley = {}
        for method in methods:
            selection = _motley_selection(index, baselines, start, method)
            if selection is not None:
                motley[method] = selection

        pareto = {}
        for method in sorted({key[2] for key in test_keys}):
            method_keys = sorted((k for k in test_keys if k[2] == method), key=_setting_sort_key)
            points = []
            for key in method_keys:
                clients = index[key].values()
                points.append(
                    {
                        "method": method,
                        **_setting_dict(key),
                        "local_rougeL_mean": _mean(m["local_rougeL"] for m in clients),
                        "global_rougeL_mean": _mean(m["global_rougeL"] for m in clients),
                    }
                )
            pareto[method] = _pareto_frontier(points)

        summary["starts"][start] = {
            "global_prompt": global_prompt,
            "grid": grid,
            "motley": motley,
            "pareto": pareto,
        }
    return _json_safe(summary)


# --------------------------------------------------------------------------- #
# Plots.
# --------------------------------------------------------------------------- #


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "unnamed"


def _num(value: Any) -> float:
    """JSON value (None for NaN) back to a float."""
    return _to_float(value)


def _format_number(value: Any, digits: int = 4) -> str:
    number = _to_float(value)
    if not math.isfinite(number):
        return "n/a"
    return f"{number:.{digits}g}"


def _curve_label(curve_key: tuple, show_optimizer: bool) -> str:
    method, optimizer, learning_rate, l2_strength, alpha = curve_key
    parts = [method]
    if show_optimizer:
        parts.append(optimizer)
    parts.append(f"lr={_format_number(learning_rate, 3)}")
    if method == L2:
        parts.append(f"λ={_format_number(l2_strength, 3)}")
    if method == INTERPOLATION:
        parts.append(f"α={_format_number(alpha, 3)}")
    return " ".join(parts)


def _curves(grid: Sequence[Mapping[str, Any]]) -> Dict[tuple, List[Mapping[str, Any]]]:
    """Groups grid entries by (method, optimizer, lr, l2, alpha), sorted by epochs."""
    curves: Dict[tuple, List[Mapping[str, Any]]] = {}
    for entry in grid:
        if entry.get("epochs") is None:
            continue
        curve_key = (
            entry["method"],
            entry["optimizer"],
            entry["learning_rate"],
            entry["l2_strength"],
            entry["alpha"],
        )
        curves.setdefault(curve_key, []).append(entry)
    for entries in curves.values():
        entries.sort(key=lambda e: e["epochs"])
    return dict(sorted(curves.items(), key=lambda item: tuple(_sortable(v) for v in item[0])))


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: pathlib.Path) -> pathlib.Path:
    figure.savefig(path, dpi=100)
    return path


def _plot_tradeoff(start: str, grid: Sequence[Mapping[str, Any]], path: pathlib.Path):
    curves = _curves(grid)
    show_optimizer = len({key[1] for key in curves}) > 1
    figure = _new_figure(8.0, 6.0)
    axes = figure.add_subplot()
    epoch0_points = []
    plotted = 0
    for curve_key, entries in curves.items():
        local = np.array([_num(e["local_rougeL"]["mean"]) for e in entries])
        global_ = np.array([_num(e["global_rougeL"]["mean"]) for e in entries])
        if not np.any(np.isfinite(local) & np.isfinite(global_)):
            continue
        plotted += 1
        (line,) = axes.plot(
            local,
            global_,
            marker="o",
            markersize=3,
            linestyle=_METHOD_LINESTYLES.get(curve_key[0], "-."),
            linewidth=1.2,
            label=_curve_label(curve_key, show_optimizer),
        )
        for entry, x, y in zip(entries, local, global_):
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            if entry["epochs"] == 0:
                epoch0_points.append((x, y))
            else:
                axes.annotate(
                    str(entry["epochs"]),
                    (x, y),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=6,
                    color=line.get_color(),
                )
    if not plotted:
        return None
    if epoch0_points:
        x0, y0 = np.mean(np.array(epoch0_points), axis=0)
        axes.scatter([x0], [y0], marker="*", s=220, color="black", zorder=5, label="epoch 0")
        axes.axvline(x0, color="grey", linewidth=0.6, linestyle="--")
        axes.axhline(y0, color="grey", linewidth=0.6, linestyle="--")
    axes.set_xlabel("mean local ROUGE-L (test clients)")
    axes.set_ylabel("mean global ROUGE-L (test clients)")
    axes.set_title(f"Personalization vs. robustness from the {start} prompt (labels: epochs)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6, ncol=2, loc="best")
    return _save(figure, path)


def _plot_epochs(start: str, grid: Sequence[Mapping[str, Any]], path: pathlib.Path):
    curves = {k: v for k, v in _curves(grid).items() if k[0] == FINETUNE}
    show_optimizer = len({key[1] for key in curves}) > 1
    figure = _new_figure(10.0, 4.0)
    local_axes, global_axes = figure.subplots(1, 2, sharex=True)
    plotted = 0
    for curve_key, entries in curves.items():
        epochs = np.array([float(e["epochs"]) for e in entries])
        local = np.array([_num(e["local_rougeL"]["mean"]) for e in entries])
        global_ = np.array([_num(e["global_rougeL"]["mean"]) for e in entries])
        if not (np.any(np.isfinite(local)) or np.any(np.isfinite(global_))):
            continue
        plotted += 1
        label = _curve_label(curve_key, show_optimizer)
        local_axes.plot(epochs, local, marker="o", markersize=3, label=label)
        global_axes.plot(epochs, global_, marker="o", markersize=3, label=label)
    if not plotted:
        return None
    all_epochs = sorted({e["epochs"] for entries in curves.values() for e in entries})
    for axes, name in ((local_axes, "local"), (global_axes, "global")):
        axes.set_xscale("symlog", linthresh=1.0)
        axes.set_xticks([float(e) for e in all_epochs], [str(e) for e in all_epochs])
        axes.minorticks_off()
        axes.set_xlabel("personalization epochs")
        axes.set_ylabel(f"mean {name} ROUGE-L (test clients)")
        axes.grid(alpha=0.3)
    local_axes.set_title(f"Local (own data), fine-tuning from {start}")
    global_axes.set_title(f"Global (all tasks), fine-tuning from {start}")
    local_axes.legend(fontsize=7)
    return _save(figure, path)


def _column(rows: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
    return np.array([_to_float(row.get(name)) for row in rows], dtype=np.float64)


def _has_finite(values: np.ndarray) -> bool:
    return bool(np.any(np.isfinite(values)))


def _plot_norms(rounds: Sequence[Mapping[str, Any]], path: pathlib.Path):
    round_numbers = _column(rounds, "round")
    if not _has_finite(round_numbers):
        round_numbers = np.arange(1, len(rounds) + 1, dtype=np.float64)
    figure = _new_figure(12.0, 4.0)
    grad_axes, update_axes, loss_axes = figure.subplots(1, 3, sharex=True)
    plotted = 0
    for axes, prefix, title in (
        (grad_axes, "grad_norm", "client gradient norm"),
        (update_axes, "update_norm", "client update norm"),
    ):
        mean = _column(rounds, f"{prefix}_mean")
        low = _column(rounds, f"{prefix}_min")
        high = _column(rounds, f"{prefix}_max")
        if _has_finite(mean):
            plotted += 1
            axes.plot(round_numbers, mean, label="client mean")
        if _has_finite(low) and _has_finite(high):
            axes.fill_between(round_numbers, low, high, alpha=0.25, label="client min-max")
        axes.set_title(title)
        axes.set_xlabel("round")
        axes.grid(alpha=0.3)
    server_norm = _column(rounds, "server_update_norm")
    if _has_finite(server_norm):
        plotted += 1
        update_axes.plot(round_numbers, server_norm, linestyle="--", label="server update")
    for axes in (grad_axes, update_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    train_loss = _column(rounds, "train_loss")
    if _has_finite(train_loss):
        plotted += 1
        loss_axes.plot(round_numbers, train_loss, color="tab:red")
    loss_axes.set_title("train loss")
    loss_axes.set_xlabel("round")
    loss_axes.grid(alpha=0.3)
    if not plotted:
        return None
    return _save(figure, path)


def _plot_validation(rounds: Sequence[Mapping[str, Any]], path: pathlib.Path):
    round_numbers = _column(rounds, "round")
    if not _has_finite(round_numbers):
        round_numbers = np.arange(1, len(rounds) + 1, dtype=np.float64)
    figure = _new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    plotted = 0
    for name, label in (
        ("val_local_rougeL", "local (own data)"),
        ("val_global_rougeL", "global (all tasks)"),
    ):
        values = _column(rounds, name)
        evaluated = np.isfinite(values)
        if not np.any(evaluated):
            continue
        plotted += 1
        axes.plot(
            round_numbers[evaluated], values[evaluated], marker="o", markersize=3, label=label
        )
    if not plotted:
        return None
    axes.set_xlabel("round")
    axes.set_ylabel("mean ROUGE-L (validation clients)")
    axes.set_title("Validation during training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def _write_plots(
    results_dir: pathlib.Path,
    summary: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
) -> List[pathlib.Path]:
    plots_dir = results_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    # Remove this module's plots from an earlier call so no stale plot survives.
    for pattern in _PLOT_PATTERNS:
        for stale in plots_dir.glob(pattern):
            stale.unlink()
    written = []
    if rounds:
        written.append(_plot_norms(rounds, plots_dir / "norms.png"))
        written.append(_plot_validation(rounds, plots_dir / "validation.png"))
    for start, start_summary in summary.get("starts", {}).items():
        grid = start_summary.get("grid", [])
        name = _file_safe(start)
        written.append(_plot_tradeoff(start, grid, plots_dir / f"tradeoff_{name}.png"))
        written.append(_plot_epochs(start, grid, plots_dir / f"epochs_{name}.png"))
    return [path for path in written if path is not None]


def write_plots(results_dir: PathLike) -> List[pathlib.Path]:
    """Writes the plots of a results directory into `results_dir/plots/`.

    Plots (each skipped when its data is missing or all NaN; earlier versions
    of these files are removed first):
      * `tradeoff_<start>.png`: mean global vs. mean local test ROUGE-L, one
        curve per (method, optimizer, learning rate, l2, alpha) along epochs;
        points labeled by epochs, epoch 0 marked by a star.
      * `epochs_<start>.png`: local and global test ROUGE-L vs. epochs
        (symlog axis), one line per learning rate, method `finetune`.
      * `norms.png`: gradient and update norms (client mean, min-max band,
        server update) and train loss vs. round; needs rows in rounds.csv.
      * `validation.png`: validation local/global ROUGE-L vs. round, if any.

    Args:
      results_dir: the results directory.

    Returns:
      The paths written.
    """
    results_dir = pathlib.Path(results_dir)
    summary = summarize_personalization(_read_optional_csv(results_dir / PERSONALIZATION_CSV))
    return _write_plots(results_dir, summary, _read_optional_csv(results_dir / ROUNDS_CSV))


# --------------------------------------------------------------------------- #
# Markdown report.
# --------------------------------------------------------------------------- #


def _cell(value: Any) -> str:
    """A markdown table cell: numbers to 4 significant digits, pipes escaped."""
    if value is None:
        text = "n/a"
    elif isinstance(value, bool):
        text = str(value)
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        text = _format_number(value)
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(_json_safe(value), separators=(",", ":"))
        if len(text) > 120:
            text = text[:117] + "..."
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines.extend("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)
    return lines


def _describe_list(values: Sequence[Any]) -> Any:
    """Long numeric lists (e.g. per-client sizes) as count/min/median/max."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(values) > 8 and len(numbers) == len(values):
        finite = _finite(numbers)
        if finite.size:
            return (
                f"n={len(values)}, min={_format_number(finite.min())}, "
                f"median={_format_number(np.median(finite))}, "
                f"max={_format_number(finite.max())}"
            )
    return list(values)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and len(value) <= 20:
            items.extend(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            items.append((name, _describe_list(value)))
        else:
            items.append((name, value))
    return items


def _config_value(config: Mapping[str, Any], name: str) -> Any:
    """A config field, looked up at the top level and then inside `partition`."""
    if name in config:
        value = config[name]
        if name == "partition" and isinstance(value, Mapping):
            return value.get("kind", value.get("name", value.get("type", value)))
        return value
    partition = config.get("partition")
    if isinstance(partition, Mapping):
        return partition.get(name)
    return None


def _description(config: Mapping[str, Any], results_dir: pathlib.Path) -> str:
    def show(name: str) -> str:
        value = _config_value(config, name)
        return "unknown" if value is None else f"`{_cell(value)}`"

    return (
        f"This report describes the run in `{results_dir.name}`: a soft prompt for the frozen "
        f"{show('backbone')} backbone, trained on {show('data')} with the {show('algorithm')} "
        f"algorithm for {show('rounds')} rounds over a {show('partition')} client partition "
        f"(seed {show('seed')}). Starting from each trained prompt, every client then "
        "personalizes it (fine-tuning, L2-regularized fine-tuning, interpolation with the "
        "global prompt); *local* scores are on the client's own test data, *global* scores on "
        "the global test set. All numbers are ROUGE-L unless stated otherwise."
    )


def _training_section(rounds: Sequence[Mapping[str, Any]]) -> List[str]:
    lines = ["## Training", ""]
    if not rounds:
        return lines + ["No federated rounds were recorded (`rounds.csv` has no rows).", ""]

    def last_finite(name: str) -> Tuple[Optional[float], Optional[float]]:
        for row in reversed(rounds):
            value = _to_float(row.get(name))
            if math.isfinite(value):
                return value, _to_float(row.get("round"))
        return None, None

    final_loss, final_loss_round = last_finite("train_loss")
    val_local, val_local_round = last_finite("val_local_rougeL")
    val_global, val_global_round = last_finite("val_global_rougeL")
    elapsed = _finite(row.get("elapsed_s") for row in rounds)
    nonfinite = _finite(row.get("num_nonfinite_clients") for row in rounds)
    rows = [
        ("rounds recorded", len(rounds)),
        ("final train loss", final_loss),
        ("round of final train loss", final_loss_round),
        ("last validation local ROUGE-L", val_local),
        ("round of last validation (local)", val_local_round),
        ("last validation global ROUGE-L", val_global),
        ("round of last validation (global)", val_global_round),
        ("total time (s)", float(elapsed.max()) if elapsed.size else None),
        (
            "client updates with non-finite values",
            float(nonfinite.sum()) if nonfinite.size else None,
        ),
    ]
    return lines + _table(("quantity", "value"), rows) + [""]


def _personalization_section(summary: Mapping[str, Any]) -> List[str]:
    lines = ["## Personalization", ""]
    starts = summary.get("starts", {})
    if not starts:
        return lines + ["No personalization results (`personalization.csv` has no rows).", ""]

    lines += [
        "### Starting prompts (epoch 0, test clients)",
        "",
        *_table(
            ("start", "clients", "local mean", "local median", "global mean", "global median"),
            (
                (
                    start,
                    s["global_prompt"]["num_clients"],
                    s["global_prompt"]["local_rougeL"]["mean"],
                    s["global_prompt"]["local_rougeL"]["median"],
                    s["global_prompt"]["global_rougeL"]["mean"],
                    s["global_prompt"]["global_rougeL"]["median"],
                )
                for start, s in starts.items()
            ),
        ),
        "",
        "### Selected settings (Motley protocol)",
        "",
        "Per start and method, the optimizer, learning rate, L2 strength, alpha and number of "
        "epochs maximizing the mean local ROUGE-L of the *validation* clients (ties: fewer "
        "epochs, then smaller learning rate), scored on the *test* clients. Forgetting is the "
        "mean drop of global ROUGE-L from epoch 0; 'worse' is the fraction of clients whose "
        "local ROUGE-L fell below epoch 0.",
        "",
    ]
    motley_rows = []
    for start, start_summary in starts.items():
        for method, selection in start_summary.get("motley", {}).items():
            setting = selection["setting"]
            motley_rows.append(
                (
                    start,
                    method,
                    selection["selected_on"],
                    setting["optimizer"],
                    setting["learning_rate"],
                    setting["l2_strength"],
                    setting["alpha"],
                    setting["epochs"],
                    selection["selection_local_rougeL_mean"],
                    selection["test_local_rougeL_mean"],
                    selection["test_global_rougeL_mean"],
                    selection["test_forgetting"],
                    selection["test_fraction_worse_local"],
                )
            )
    lines += _table(
        (
            "start",
            "method",
            "selected on",
            "optimizer",
            "lr",
            "l2",
            "alpha",
            "epochs",
            "selection local",
            "test local",
            "test global",
            "forgetting",
            "worse",
        ),
        motley_rows,
    )
    lines.append("")

    for start, start_summary in starts.items():
        curves = {
            k: v for k, v in _curves(start_summary.get("grid", [])).items() if k[0] == FINETUNE
        }
        if not curves:
            continue
        epochs = sorted({e["epochs"] for entries in curves.values() for e in entries})
        show_optimizer = len({key[1] for key in curves}) > 1
        rows = []
        for curve_key, entries in curves.items():
            by_epochs = {e["epochs"]: e for e in entries}
            row = [_curve_label(curve_key, show_optimizer)]
            for epoch in epochs:
                entry = by_epochs.get(epoch)
                row.append(
                    "n/a"
                    if entry is None
                    else f"{_format_number(entry['local_rougeL']['mean'])} / "
                    f"{_format_number(entry['global_rougeL']['mean'])}"
                )
            rows.append(row)
        lines += [
            f"### Fine-tuning from `{start}` by epochs (test clients, local / global)",
            "",
            *_table(["setting"] + [f"{e} ep" for e in epochs], rows),
            "",
        ]

    for start, start_summary in starts.items():
        rows = [
            (
                method,
                point["optimizer"],
                point["learning_rate"],
                point["l2_strength"],
                point["alpha"],
                point["epochs"],
                point["local_rougeL_mean"],
                point["global_rougeL_mean"],
            )
            for method, points in start_summary.get("pareto", {}).items()
            for point in points
        ]
        if rows:
            lines += [
                f"### Pareto frontier of (local, global) from `{start}` (test clients)",
                "",
                *_table(
                    ("method", "optimizer", "lr", "l2", "alpha", "epochs", "local", "global"),
                    rows,
                ),
                "",
            ]
    return lines


def _existing_plots(results_dir: pathlib.Path) -> List[pathlib.Path]:
    plots_dir = results_dir / PLOTS_DIR
    found = []
    for pattern in _PLOT_PATTERNS:
        found.extend(sorted(p for p in plots_dir.glob(pattern) if p.is_file()))
    return found


def _write_summary(results_dir: pathlib.Path, summary: Mapping[str, Any]) -> pathlib.Path:
    path = results_dir / SUMMARY_JSON
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return path


def _write_report(
    results_dir: pathlib.Path,
    summary: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
) -> pathlib.Path:
    config = _read_optional_json(results_dir / CONFIG_JSON)
    partition = _read_optional_json(results_dir / PARTITION_JSON)
    _write_summary(results_dir, summary)

    algorithm = _config_value(config, "algorithm")
    data = _config_value(config, "data")
    title = "fedprompt results"
    if algorithm is not None:
        title += f": {_cell(algorithm)}"
    if data is not None:
        title += f" on {_cell(data)}"
    lines = [f"# {title}", "", _description(config, results_dir), ""]

    key_items = [(k, config[k]) for k in KEY_CONFIG_FIELDS if k in config]
    other_items = [(k, v) for k, v in config.items() if k not in KEY_CONFIG_FIELDS]
    lines += ["## Configuration", ""]
    if key_items or other_items:
        lines += _table(("key", "value"), key_items + other_items)
    else:
        lines.append("No `config.json`.")
    lines.append("")

    lines += ["## Partition", ""]
    partition_items = _flatten(partition)
    if partition_items:
        lines += _table(("statistic", "value"), partition_items)
    else:
        lines.append("No `partition.json`.")
    lines.append("")

    lines += _training_section(rounds)
    lines += _personalization_section(summary)

    lines += ["## Plots", ""]
    plots = _existing_plots(results_dir)
    if plots:
        for plot in plots:
            relative = plot.relative_to(results_dir).as_posix()
            lines += [f"![{plot.stem}]({relative})", ""]
    else:
        lines += ["No plots.", ""]
    lines += [f"Full personalization statistics: [`{SUMMARY_JSON}`]({SUMMARY_JSON}).", ""]

    path = results_dir / REPORT_MD
    path.write_text("\n".join(lines) + "\n")
    return path


def write_report(results_dir: PathLike) -> pathlib.Path:
    """Writes `report.md` and `summary.json` into a results directory.

    The report links only plots that exist in `results_dir/plots/`; call
    `write_plots` first (or `write_all`) to include them.

    Args:
      results_dir: the results directory.

    Returns:
      The path of `report.md`.
    """
    results_dir = pathlib.Path(results_dir)
    summary = summarize_personalization(_read_optional_csv(results_dir / PERSONALIZATION_CSV))
    return _write_report(results_dir, summary, _read_optional_csv(results_dir / ROUNDS_CSV))


def write_all(results_dir: PathLike) -> Dict[str, Any]:
    """Writes plots, `summary.json` and `report.md` for a results directory.

    Args:
      results_dir: the results directory.

    Returns:
      {"plots": [paths], "summary": summary.json path, "report": report.md path}.
    """
    results_dir = pathlib.Path(results_dir)
    summary = summarize_personalization(_read_optional_csv(results_dir / PERSONALIZATION_CSV))
    rounds = _read_optional_csv(results_dir / ROUNDS_CSV)
    plots = _write_plots(results_dir, summary, rounds)
    report = _write_report(results_dir, summary, rounds)
    return {"plots": plots, "summary": results_dir / SUMMARY_JSON, "report": report}


# --------------------------------------------------------------------------- #
# Sweep aggregation.
# --------------------------------------------------------------------------- #


def _run_summary(run_dir: pathlib.Path) -> Dict[str, Any]:
    csv_path = run_dir / PERSONALIZATION_CSV
    if csv_path.is_file():
        return summarize_personalization(read_csv(csv_path))
    return _read_optional_json(run_dir / SUMMARY_JSON)


def aggregate_summaries(run_dirs: Iterable[PathLike]) -> List[Dict[str, Any]]:
    """One row per run for a sweep table.

    The start reported is the one named like the run's algorithm, else the
    only (or alphabetically first) start of the run.

    Args:
      run_dirs: results directories.

    Returns:
      Rows with "run_dir", the config fields `AGGREGATE_CONFIG_FIELDS` (None
      when absent; also looked up inside a dict-valued `partition`), "start",
      the Motley selection of method finetune ("motley_selected_on",
      "motley_optimizer", "motley_learning_rate", "motley_epochs",
      "motley_test_local_rougeL", "motley_test_global_rougeL",
      "motley_test_forgetting") and the epoch-0 test means
      ("global_prompt_local_rougeL", "global_prompt_global_rougeL"). Missing
      numbers are NaN.
    """
    rows = []
    for run_dir in run_dirs:
        run_dir = pathlib.Path(run_dir)
        config = _read_optional_json(run_dir / CONFIG_JSON)
        row: Dict[str, Any] = {"run_dir": str(run_dir)}
        for name in AGGREGATE_CONFIG_FIELDS:
            row[name] = _config_value(config, name)
        starts = _run_summary(run_dir).get("starts", {})
        algorithm = row.get("algorithm")
        fallback_start = sorted(starts)[0] if starts else None
        start = algorithm if algorithm in starts else fallback_start
        start_summary = starts.get(start, {}) if start is not None else {}
        selection = start_summary.get("motley", {}).get(FINETUNE, {})
        setting = selection.get("setting", {})
        global_prompt = start_summary.get("global_prompt", {})
        row.update(
            {
                "start": start,
                "motley_selected_on": selection.get("selected_on"),
                "motley_optimizer": setting.get("optimizer"),
                "motley_learning_rate": _to_float(setting.get("learning_rate")),
                "motley_epochs": setting.get("epochs"),
                "motley_test_local_rougeL": _to_float(selection.get("test_local_rougeL_mean")),
                "motley_test_global_rougeL": _to_float(selection.get("test_global_rougeL_mean")),
                "motley_test_forgetting": _to_float(selection.get("test_forgetting")),
                "global_prompt_local_rougeL": _to_float(
                    global_prompt.get("local_rougeL", {}).get("mean")
                ),
                "global_prompt_global_rougeL": _to_float(
                    global_prompt.get("global_rougeL", {}).get("mean")
                ),
            }
        )
        rows.append(row)
    return rows
