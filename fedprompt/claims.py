"""Verdicts on the paper's claims C1-C6 (DESIGN.md section 2) from a set of runs.

Each run is one results directory of the experiment program (one algorithm at
one heterogeneity level), read into a `RunResult`. `evaluate_claims(runs)`
returns one record per claim:

  {"claim": "C1", "statement": ..., "verdict": "PASS" | "FAIL" | "INCONCLUSIVE",
   "criterion": the rule applied, in words, "numbers": {...}}

Conventions shared by every criterion (fixed in advance, never tuned to make a
claim pass):
  * Scores are the mean ROUGE-L over *test* clients of one grid point, as in
    `report.summarize_personalization` ("local" on each client's own test data,
    "global" on the global test set). Epoch 0 is the trained global prompt.
  * Runs are named by algorithm: `fedavg_sgd`, `fedavg_adam` (FedAvg with that
    client optimizer), `fedsgd`, `centralized`, `local`; see `algorithm_label`.
  * Heterogeneity levels are labeled from the partition (`natural`,
    `dirichlet:0.1`, `home_fraction:0.9`) and ordered from least to most
    heterogeneous by the measured `heterogeneity` of `partition.json` (mean
    total-variation distance of the clients' category mix from the overall
    mix); levels without it keep the order in which they were given, last.
  * C1-C5 are evaluated separately at every level that has the runs they need,
    with the numbers of each level under `numbers["levels"]`. A claim is PASS
    when it holds at every level where it could be evaluated, FAIL when it fails
    at one, INCONCLUSIVE when no level has the needed runs or grid points, or
    when every score involved is 0 or non-finite (a prompt that decodes nothing
    matching gives no trade-off to judge). C6 compares levels.
  * C1, C2, C5 and C6 use the personalization of one *reference run* per level:
    the first present of `REFERENCE_ALGORITHMS` (FedAvg(Adam) first, the paper's
    recommended prompt).
  * Trade-off quality is the hypervolume of (local, global) points: the area of
    the region of the unit square that some point weakly dominates, against the
    reference point (0, 0) (both scores are maximized and lie in [0, 1]). It is
    the area under the Pareto frontier; a larger area is a better trade-off.

Like `fedprompt.report` this module avoids TensorFlow and imports in well under
a second.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from fedprompt import report

PASS = "PASS"
FAIL = "FAIL"
INCONCLUSIVE = "INCONCLUSIVE"

FEDAVG_SGD = "fedavg_sgd"
FEDAVG_ADAM = "fedavg_adam"
FEDSGD = "fedsgd"
CENTRALIZED = "centralized"
LOCAL = "local"
REFERENCE_ALGORITHMS = (FEDAVG_ADAM, FEDAVG_SGD, CENTRALIZED, FEDSGD, LOCAL)
HYPERVOLUME_REFERENCE = (0.0, 0.0)
_NO_REFERENCE = f"no run of {', '.join(REFERENCE_ALGORITHMS)}"
_ALL_ZERO = "every score involved is 0 or non-finite: nothing to compare"

STATEMENTS = {
    "C1": "Personalization raises the local score and lowers the global score; a larger "
    "learning rate and more epochs give more local gain and more forgetting.",
    "C2": "At a matched local score, a small learning rate (for many epochs) keeps a higher "
    "global score than a large learning rate (for few epochs).",
    "C3": "Prompts from FedAvg(Adam) give a better trade-off curve than FedAvg(SGD); "
    "FedAvg(SGD) prompt updates are much smaller (paper: about 1000x).",
    "C4": "FedAvg(Adam) beats FedSGD and centralized training on the trade-off.",
    "C5": "With few personalization steps, L2 regularization and interpolation both improve "
    "the trade-off over plain fine-tuning.",
    "C6": "The trade-off widens with heterogeneity.",
}

CRITERIA = {
    "C1": "Reference run, fine-tuning, largest lr `lr_max` and largest epochs `E_max`: local "
    "gain(lr_max, E_max) > 0 and forgetting(lr_max, E_max) > 0, and both gain and forgetting "
    "are larger at lr_max than at the smallest lr (at E_max) and larger at E_max than at the "
    "fewest nonzero epochs (at lr_max). Gain = local - local at epoch 0; forgetting = global "
    "at epoch 0 - global. Needs >= 2 lrs and >= 2 nonzero epoch counts.",
    "C2": "Reference run, fine-tuning curves (epoch 0, 1, ...) of the smallest and the largest "
    "lr. Matched local score L* = the smaller of the two curves' best local scores; each "
    "curve is linearly interpolated (in epochs) where it first reaches L*. PASS iff the "
    "small-lr curve's global score there is higher. Needs L* above the epoch-0 local score "
    "(else FAIL: no local gain to match). Epochs needed are reported, not judged.",
    "C3": "At each level with both runs: hypervolume of all fine-tuning points (every lr and "
    "epoch count, epoch 0 included) of FedAvg(Adam) > that of FedAvg(SGD), and the "
    "FedAvg(SGD) / FedAvg(Adam) ratio of the mean (over rounds) client update norm < 1. "
    "The size of the ratio depends on the chosen client learning rates, so it is reported "
    "(with the gradient-norm ratio) but not judged.",
    "C4": "At each level with all three runs: hypervolume of the fine-tuning points of "
    "FedAvg(Adam) > that of FedSGD and > that of centralized.",
    "C5": "Reference run, at the fewest nonzero epochs E1: hypervolume of the L2 points (every "
    "lr and lambda) > hypervolume of the fine-tuning points (every lr), and hypervolume of "
    "the interpolation points (every lr and alpha strictly between 0 and 1) > the same "
    "fine-tuning hypervolume. Epoch-0 points are excluded from all three sets. A mitigation "
    "passes when its family of settings reaches trade-offs that fine-tuning at E1 does "
    "not (more lambdas or alphas give it more points; alpha = 1 is fine-tuning itself, "
    "hence excluded).",
    "C6": "The first algorithm of the reference order present at >= 2 levels; forgetting of "
    "fine-tuning at (lr_max, E_max) at the most heterogeneous level > 0 and > at the least "
    "heterogeneous level. Local gain and forgetting at every level are reported; "
    "monotonicity over intermediate levels is reported, not judged.",
}


# --------------------------------------------------------------------------- #
# Runs.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run's results, as the claims need them.

    Attributes:
      name: a display name (the sweep cell name or the directory name).
      algorithm: see `algorithm_label`.
      level: the heterogeneity label, see `level_label`.
      heterogeneity: `partition.json`'s `heterogeneity` (NaN when unknown).
      summary: `report.summarize_personalization` of `personalization.csv`.
      rounds: `rounds.csv` rows (as `report.read_csv` gives them).
      config: `config.json`.
    """

    name: str
    algorithm: str
    level: str
    heterogeneity: float = math.nan
    summary: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rounds: Sequence[Mapping[str, Any]] = ()
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def algorithm_label(config: Mapping[str, Any]) -> str:
    """`fedavg_<client optimizer>` for FedAvg, else the algorithm name."""
    algorithm = str(config.get("algorithm", "unknown"))
    if algorithm == "fedavg":
        return f"fedavg_{config.get('client_optimizer', 'sgd')}"
    return algorithm


def level_label(config: Mapping[str, Any]) -> str:
    """`natural`, `dirichlet:<alpha>` or `home_fraction:<fraction>`."""
    partition = str(config.get("partition", "unknown"))
    if partition == "dirichlet":
        return f"dirichlet:{_short(config.get('alpha'))}"
    if partition == "home_fraction":
        return f"home_fraction:{_short(config.get('home_fraction'))}"
    return partition


def _short(value: Any) -> str:
    number = report._to_float(value)
    if not math.isfinite(number):
        return str(value)
    return f"{number:g}"


def load_run(run_dir: Union[str, pathlib.Path], *, name: Optional[str] = None) -> RunResult:
    """Reads a results directory into a `RunResult` (missing files give empty fields)."""
    run_dir = pathlib.Path(run_dir)
    config = _read_json(run_dir / report.CONFIG_JSON)
    partition = _read_json(run_dir / report.PARTITION_JSON)
    personalization_csv = run_dir / report.PERSONALIZATION_CSV
    if personalization_csv.is_file():
        summary = report.summarize_personalization(report.read_csv(personalization_csv))
    else:
        summary = _read_json(run_dir / report.SUMMARY_JSON)
    rounds_csv = run_dir / report.ROUNDS_CSV
    return RunResult(
        name=name or run_dir.name,
        algorithm=algorithm_label(config),
        level=level_label(config),
        heterogeneity=report._to_float(partition.get("heterogeneity")),
        summary=summary,
        rounds=report.read_csv(rounds_csv) if rounds_csv.is_file() else [],
        config=config,
    )


def _read_json(path: pathlib.Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    content = json.loads(path.read_text())
    return content if isinstance(content, dict) else {}


def order_levels(runs: Sequence[RunResult]) -> List[str]:
    """Levels from least to most heterogeneous (see the module docstring)."""
    first_seen: Dict[str, int] = {}
    measured: Dict[str, List[float]] = {}
    for run in runs:
        first_seen.setdefault(run.level, len(first_seen))
        if math.isfinite(run.heterogeneity):
            measured.setdefault(run.level, []).append(run.heterogeneity)

    def key(level: str) -> Tuple[bool, float, int]:
        values = measured.get(level)
        if not values:
            return (True, 0.0, first_seen[level])
        return (False, sum(values) / len(values), first_seen[level])

    return sorted(first_seen, key=key)


def _runs_by_level(runs: Sequence[RunResult]) -> Dict[str, Dict[str, RunResult]]:
    """{level: {algorithm: run}} in `order_levels` order; of duplicates the first is kept.

    Ordered by level rather than by the order of `runs`, so that every claim's
    per-level records read from least to most heterogeneous whatever order the
    run directories were listed in.
    """
    grouped: Dict[str, Dict[str, RunResult]] = {level: {} for level in order_levels(runs)}
    for run in runs:
        grouped[run.level].setdefault(run.algorithm, run)
    return grouped


def _reference(by_algorithm: Mapping[str, RunResult]) -> Optional[RunResult]:
    for algorithm in REFERENCE_ALGORITHMS:
        if algorithm in by_algorithm:
            return by_algorithm[algorithm]
    return None


# --------------------------------------------------------------------------- #
# Trade-off points and hypervolume.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Point:
    """One test grid point: mean local and global ROUGE-L of a personalization setting."""

    method: str
    learning_rate: Optional[float]
    epochs: Any
    l2_strength: Optional[float]
    alpha: Optional[float]
    local: float
    global_: float

    def as_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "l2_strength": self.l2_strength,
            "alpha": self.alpha,
            "local": self.local,
            "global": self.global_,
        }


def _start_summary(run: RunResult) -> Mapping[str, Any]:
    """The start named like the run's algorithm, else the first (as `aggregate_summaries`)."""
    starts = run.summary.get("starts", {}) if run.summary else {}
    if not starts:
        return {}
    start = run.config.get("algorithm")
    return starts[start] if start in starts else starts[sorted(starts)[0]]


def grid_points(run: RunResult, method: Optional[str] = None) -> List[Point]:
    """The run's test grid points (of `method` if given) with finite scores."""
    points = []
    optimizer = run.config.get("personalization_optimizer")
    for entry in _start_summary(run).get("grid", []):
        if method is not None and entry.get("method") != method:
            continue
        if optimizer and entry.get("optimizer") and entry["optimizer"] != optimizer:
            continue
        local = report._to_float(entry.get("local_rougeL", {}).get("mean"))
        global_ = report._to_float(entry.get("global_rougeL", {}).get("mean"))
        if not (math.isfinite(local) and math.isfinite(global_)):
            continue
        points.append(
            Point(
                method=entry.get("method"),
                learning_rate=entry.get("learning_rate"),
                epochs=entry.get("epochs"),
                l2_strength=entry.get("l2_strength"),
                alpha=entry.get("alpha"),
                local=local,
                global_=global_,
            )
        )
    return points


def finetune_curves(run: RunResult) -> Dict[float, List[Point]]:
    """{learning rate: fine-tuning points sorted by epochs (epoch 0 first)}."""
    curves: Dict[float, List[Point]] = {}
    for point in grid_points(run, report.FINETUNE):
        if point.learning_rate is None or point.epochs is None:
            continue
        curves.setdefault(float(point.learning_rate), []).append(point)
    for points in curves.values():
        points.sort(key=lambda p: p.epochs)
    return dict(sorted(curves.items()))


def hypervolume(
    points: Iterable[Tuple[float, float]],
    reference: Tuple[float, float] = HYPERVOLUME_REFERENCE,
) -> float:
    """Area weakly dominated by `points` and dominating `reference` (both maximized).

    For 2-D points this is the area of the union of the rectangles
    [reference_x, x] x [reference_y, y]. Points not above the reference in both
    coordinates, and non-finite points, add nothing; no points give 0.

    Args:
      points: (x, y) pairs, e.g. (local ROUGE-L, global ROUGE-L).
      reference: the reference point.

    Returns:
      The hypervolume (area).
    """
    reference_x, reference_y = reference
    usable = sorted(
        (
            (float(x), float(y))
            for x, y in points
            if math.isfinite(x) and math.isfinite(y) and x > reference_x and y > reference_y
        ),
        key=lambda p: (-p[0], -p[1]),
    )
    area = 0.0
    best_y = reference_y
    # Sweep from the largest x: each point adds the strip above the best y so far.
    for x, y in usable:
        if y > best_y:
            area += (x - reference_x) * (y - best_y)
            best_y = y
    return area


def _hypervolume_of(points: Iterable[Point]) -> float:
    return hypervolume((p.local, p.global_) for p in points)


def _all_zero(points: Sequence[Point]) -> bool:
    return not any(p.local > 0 or p.global_ > 0 for p in points)


def _mean_column(rows: Sequence[Mapping[str, Any]], name: str) -> float:
    values = [report._to_float(row.get(name)) for row in rows]
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return math.nan
    return numerator / denominator


# --------------------------------------------------------------------------- #
# Claims.
# --------------------------------------------------------------------------- #


def _level_record(verdict: str, reason: Optional[str] = None, **numbers: Any) -> Dict[str, Any]:
    record = {"verdict": verdict, **numbers}
    if reason:
        record["reason"] = reason
    return record


def _combine(claim: str, levels: Mapping[str, Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    """PASS iff every evaluable level passes; FAIL if one fails; else INCONCLUSIVE."""
    verdicts = [record["verdict"] for record in levels.values()]
    if FAIL in verdicts:
        verdict = FAIL
    elif PASS in verdicts:
        verdict = PASS
    else:
        verdict = INCONCLUSIVE
    return {
        "claim": claim,
        "statement": STATEMENTS[claim],
        "verdict": verdict,
        "numbers": {"levels": dict(levels), **extra},
        "criterion": CRITERIA[claim],
    }


def _at(curve: Sequence[Point], epochs: Any) -> Optional[Point]:
    for point in curve:
        if point.epochs == epochs:
            return point
    return None


def _tradeoff_at(curves: Mapping[float, List[Point]], lr: float, epochs: Any):
    """(local gain, forgetting) of fine-tuning at (lr, epochs) from that lr's epoch 0."""
    curve = curves.get(lr, [])
    start, point = _at(curve, 0), _at(curve, epochs)
    if start is None or point is None:
        return None
    return point.local - start.local, start.global_ - point.global_


def _scored_reference_runs(
    runs: Sequence[RunResult], levels: Dict[str, Dict[str, Any]]
) -> Iterator[Tuple[str, RunResult]]:
    """(level, reference run) for each level whose reference run has nonzero scores.

    Levels without a reference run, or whose scores are all zero, get their
    INCONCLUSIVE record in `levels` instead (in level order, like the others).
    """
    for level, by_algorithm in _runs_by_level(runs).items():
        run = _reference(by_algorithm)
        if run is None:
            levels[level] = _level_record(INCONCLUSIVE, _NO_REFERENCE)
        elif _all_zero(grid_points(run)):
            levels[level] = _level_record(INCONCLUSIVE, _ALL_ZERO, run=run.name)
        else:
            yield level, run


def claim_c1(runs: Sequence[RunResult]) -> Dict[str, Any]:
    levels = {}
    for level, run in _scored_reference_runs(runs, levels):
        curves = finetune_curves(run)
        lrs = sorted(curves)
        epochs = sorted({p.epochs for c in curves.values() for p in c if p.epochs != 0})
        if len(lrs) < 2 or len(epochs) < 2:
            levels[level] = _level_record(
                INCONCLUSIVE,
                f"needs >= 2 fine-tuning lrs and >= 2 nonzero epoch counts, got lrs {lrs} "
                f"and epochs {epochs}",
                run=run.name,
            )
            continue
        lr_min, lr_max, e_min, e_max = lrs[0], lrs[-1], epochs[0], epochs[-1]
        main = _tradeoff_at(curves, lr_max, e_max)
        small_lr = _tradeoff_at(curves, lr_min, e_max)
        few_epochs = _tradeoff_at(curves, lr_max, e_min)
        if main is None or small_lr is None or few_epochs is None:
            levels[level] = _level_record(
                INCONCLUSIVE, "a needed grid point has no finite scores", run=run.name
            )
            continue
        start = _at(curves[lr_max], 0)
        checks = {
            "local_gain_positive": main[0] > 0,
            "forgetting_positive": main[1] > 0,
            "more_gain_at_larger_lr": main[0] > small_lr[0],
            "more_forgetting_at_larger_lr": main[1] > small_lr[1],
            "more_gain_with_more_epochs": main[0] > few_epochs[0],
            "more_forgetting_with_more_epochs": main[1] > few_epochs[1],
        }
        levels[level] = _level_record(
            PASS if all(checks.values()) else FAIL,
            run=run.name,
            lr_max=lr_max,
            lr_min=lr_min,
            epochs_max=e_max,
            epochs_min=e_min,
            local_epoch0=start.local,
            global_epoch0=start.global_,
            local_gain=main[0],
            forgetting=main[1],
            local_gain_at_lr_min=small_lr[0],
            forgetting_at_lr_min=small_lr[1],
            local_gain_at_epochs_min=few_epochs[0],
            forgetting_at_epochs_min=few_epochs[1],
            checks=checks,
        )
    return _combine("C1", levels)


def first_crossing(curve: Sequence[Point], target: float) -> Optional[Tuple[float, float]]:
    """(epochs, global) where the curve's local score first reaches `target`.

    Linear interpolation (in epochs) on the first segment that reaches it; the
    first point itself when it already does. None when it never does.
    """
    previous = None
    for point in curve:
        if point.local >= target:
            if previous is None:
                return float(point.epochs), point.global_
            fraction = (target - previous.local) / (point.local - previous.local)
            return (
                previous.epochs + fraction * (point.epochs - previous.epochs),
                previous.global_ + fraction * (point.global_ - previous.global_),
            )
        previous = point
    return None


def claim_c2(runs: Sequence[RunResult]) -> Dict[str, Any]:
    levels = {}
    for level, run in _scored_reference_runs(runs, levels):
        curves = finetune_curves(run)
        lrs = sorted(curves)
        if len(lrs) < 2 or any(_at(curves[lr], 0) is None for lr in (lrs[0], lrs[-1])):
            levels[level] = _level_record(
                INCONCLUSIVE,
                f"needs >= 2 fine-tuning lrs with epoch 0, got lrs {lrs}",
                run=run.name,
            )
            continue
        small, large = curves[lrs[0]], curves[lrs[-1]]
        local_epoch0 = _at(small, 0).local
        target = min(max(p.local for p in small), max(p.local for p in large))
        numbers = dict(
            run=run.name,
            lr_small=lrs[0],
            lr_large=lrs[-1],
            local_epoch0=local_epoch0,
            global_epoch0=_at(small, 0).global_,
            matched_local=target,
        )
        if not target > local_epoch0:
            levels[level] = _level_record(
                FAIL, "no local gain to match: a curve never rises above epoch 0", **numbers
            )
            continue
        epochs_small, global_small = first_crossing(small, target)
        epochs_large, global_large = first_crossing(large, target)
        levels[level] = _level_record(
            PASS if global_small > global_large else FAIL,
            **numbers,
            global_at_match_small_lr=global_small,
            global_at_match_large_lr=global_large,
            epochs_to_match_small_lr=epochs_small,
            epochs_to_match_large_lr=epochs_large,
            epochs_ratio_small_to_large=_ratio(epochs_small, epochs_large),
        )
    return _combine("C2", levels)


def _norms(run: RunResult) -> Dict[str, float]:
    return {
        "update_norm_mean": _mean_column(run.rounds, "update_norm_mean"),
        "grad_norm_mean": _mean_column(run.rounds, "grad_norm_mean"),
    }


def claim_c3(runs: Sequence[RunResult]) -> Dict[str, Any]:
    levels = {}
    for level, by_algorithm in _runs_by_level(runs).items():
        missing = [a for a in (FEDAVG_SGD, FEDAVG_ADAM) if a not in by_algorithm]
        if missing:
            levels[level] = _level_record(INCONCLUSIVE, f"missing runs: {', '.join(missing)}")
            continue
        sgd, adam = by_algorithm[FEDAVG_SGD], by_algorithm[FEDAVG_ADAM]
        hv_sgd = _hypervolume_of(grid_points(sgd, report.FINETUNE))
        hv_adam = _hypervolume_of(grid_points(adam, report.FINETUNE))
        sgd_norms, adam_norms = _norms(sgd), _norms(adam)
        update_ratio = _ratio(sgd_norms["update_norm_mean"], adam_norms["update_norm_mean"])
        grad_ratio = _ratio(sgd_norms["grad_norm_mean"], adam_norms["grad_norm_mean"])
        numbers = dict(
            hypervolume_fedavg_adam=hv_adam,
            hypervolume_fedavg_sgd=hv_sgd,
            update_norm_fedavg_sgd=sgd_norms["update_norm_mean"],
            update_norm_fedavg_adam=adam_norms["update_norm_mean"],
            update_norm_ratio_sgd_to_adam=update_ratio,
            update_norm_orders_of_magnitude=(
                -math.log10(update_ratio) if update_ratio > 0 else math.nan
            ),
            grad_norm_fedavg_sgd=sgd_norms["grad_norm_mean"],
            grad_norm_fedavg_adam=adam_norms["grad_norm_mean"],
            grad_norm_ratio_sgd_to_adam=grad_ratio,
        )
        if not (hv_sgd > 0 or hv_adam > 0):
            levels[level] = _level_record(INCONCLUSIVE, _ALL_ZERO, **numbers)
            continue
        if not math.isfinite(update_ratio):
            levels[level] = _level_record(
                INCONCLUSIVE, "no finite client update norms in rounds.csv", **numbers
            )
            continue
        verdict = PASS if hv_adam > hv_sgd and update_ratio < 1 else FAIL
        levels[level] = _level_record(verdict, **numbers)
    return _combine("C3", levels)


def claim_c4(runs: Sequence[RunResult]) -> Dict[str, Any]:
    levels = {}
    needed = (FEDAVG_ADAM, FEDSGD, CENTRALIZED)
    for level, by_algorithm in _runs_by_level(runs).items():
        missing = [a for a in needed if a not in by_algorithm]
        if missing:
            levels[level] = _level_record(INCONCLUSIVE, f"missing runs: {', '.join(missing)}")
            continue
        volumes = {
            a: _hypervolume_of(grid_points(by_algorithm[a], report.FINETUNE)) for a in needed
        }
        numbers = {f"hypervolume_{a}": v for a, v in volumes.items()}
        if not any(v > 0 for v in volumes.values()):
            levels[level] = _level_record(INCONCLUSIVE, _ALL_ZERO, **numbers)
            continue
        wins = (
            volumes[FEDAVG_ADAM] > volumes[FEDSGD] and volumes[FEDAVG_ADAM] > volumes[CENTRALIZED]
        )
        levels[level] = _level_record(PASS if wins else FAIL, **numbers)
    return _combine("C4", levels)


def claim_c5(runs: Sequence[RunResult]) -> Dict[str, Any]:
    levels = {}
    for level, run in _scored_reference_runs(runs, levels):
        nonzero = sorted(
            {p.epochs for p in grid_points(run, report.FINETUNE) if p.epochs not in (0, None)}
        )
        if not nonzero:
            levels[level] = _level_record(
                INCONCLUSIVE, "no fine-tuning points with nonzero epochs", run=run.name
            )
            continue
        e1 = nonzero[0]
        finetune = [p for p in grid_points(run, report.FINETUNE) if p.epochs == e1]
        l2 = [p for p in grid_points(run, report.L2) if p.epochs == e1]
        interpolation = [
            p
            for p in grid_points(run, report.INTERPOLATION)
            if p.epochs == e1 and p.alpha is not None and 0 < p.alpha < 1
        ]
        hv_finetune = _hypervolume_of(finetune)
        hv_l2 = _hypervolume_of(l2)
        hv_interpolation = _hypervolume_of(interpolation)
        numbers = dict(
            run=run.name,
            epochs=e1,
            hypervolume_finetune=hv_finetune,
            hypervolume_l2=hv_l2,
            hypervolume_interpolation=hv_interpolation,
            hypervolume_gain_l2=hv_l2 - hv_finetune,
            hypervolume_gain_interpolation=hv_interpolation - hv_finetune,
            points={
                "finetune": [p.as_dict() for p in finetune],
                "l2": [p.as_dict() for p in l2],
                "interpolation": [p.as_dict() for p in interpolation],
            },
        )
        missing = [
            name for name, points in (("l2", l2), ("interpolation", interpolation)) if not points
        ]
        if missing:
            levels[level] = _level_record(
                INCONCLUSIVE,
                f"no {' or '.join(missing)} points at {e1} epochs (set --l2_strengths / "
                "--interpolation_alphas strictly between 0 and 1)",
                **numbers,
            )
            continue
        verdict = PASS if hv_l2 > hv_finetune and hv_interpolation > hv_finetune else FAIL
        levels[level] = _level_record(verdict, **numbers)
    return _combine("C5", levels)


def claim_c6(runs: Sequence[RunResult]) -> Dict[str, Any]:
    grouped = _runs_by_level(runs)  # Least heterogeneous level first.
    algorithm = next(
        (
            a
            for a in REFERENCE_ALGORITHMS
            if sum(a in by_algorithm for by_algorithm in grouped.values()) >= 2
        ),
        None,
    )
    record = {
        "claim": "C6",
        "statement": STATEMENTS["C6"],
        "criterion": CRITERIA["C6"],
    }
    if algorithm is None:
        return record | {
            "verdict": INCONCLUSIVE,
            "numbers": {"reason": "no algorithm was run at >= 2 heterogeneity levels"},
        }
    levels = {}
    for level, by_algorithm in grouped.items():
        run = by_algorithm.get(algorithm)
        if run is None:
            continue
        curves = finetune_curves(run)
        lrs = sorted(curves)
        epochs = sorted({p.epochs for c in curves.values() for p in c if p.epochs != 0})
        usable = lrs and epochs and not _all_zero(grid_points(run))
        tradeoff = _tradeoff_at(curves, lrs[-1], epochs[-1]) if usable else None
        levels[level] = {
            "run": run.name,
            "heterogeneity": run.heterogeneity,
            "lr_max": lrs[-1] if lrs else None,
            "epochs_max": epochs[-1] if epochs else None,
            "local_gain": tradeoff[0] if tradeoff else math.nan,
            "forgetting": tradeoff[1] if tradeoff else math.nan,
        }
    usable = [level for level, numbers in levels.items() if math.isfinite(numbers["forgetting"])]
    numbers = {"algorithm": algorithm, "order": list(levels), "levels": levels}
    if len(usable) < 2:
        return record | {
            "verdict": INCONCLUSIVE,
            "numbers": numbers | {"reason": "fewer than 2 levels with finite, nonzero scores"},
        }
    least, most = usable[0], usable[-1]
    forgetting = [levels[level]["forgetting"] for level in usable]
    numbers |= {
        "least_heterogeneous": least,
        "most_heterogeneous": most,
        "forgetting_increase": levels[most]["forgetting"] - levels[least]["forgetting"],
        "local_gain_increase": levels[most]["local_gain"] - levels[least]["local_gain"],
        "forgetting_monotone": all(a < b for a, b in zip(forgetting, forgetting[1:])),
    }
    # "Widens" needs a trade-off to widen: with no forgetting at the most
    # heterogeneous level (the global score rose), less negative is not wider.
    widens = levels[most]["forgetting"] > max(levels[least]["forgetting"], 0.0)
    if not levels[most]["forgetting"] > 0:
        numbers["reason"] = f"no forgetting at the most heterogeneous level ({most})"
    return record | {"verdict": PASS if widens else FAIL, "numbers": numbers}


CLAIMS = (claim_c1, claim_c2, claim_c3, claim_c4, claim_c5, claim_c6)


def evaluate_claims(runs: Sequence[RunResult]) -> List[Dict[str, Any]]:
    """The records of C1-C6 (see the module docstring), JSON-safe (NaN -> None)."""
    runs = list(runs)
    records = []
    for claim in CLAIMS:
        if not runs:
            name = claim.__name__.split("_")[1].upper()
            records.append(
                {
                    "claim": name,
                    "statement": STATEMENTS[name],
                    "verdict": INCONCLUSIVE,
                    "numbers": {"reason": "no runs"},
                    "criterion": CRITERIA[name],
                }
            )
            continue
        records.append(claim(runs))
    ordered = [
        {k: record[k] for k in ("claim", "statement", "verdict", "numbers", "criterion")}
        for record in records
    ]
    return report._json_safe(ordered)
