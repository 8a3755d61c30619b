"""A sweep: algorithms x heterogeneity levels, one `run_experiment.py` run per cell.

A sweep is a grid of *cells*; each cell is one experiment (an algorithm at one
heterogeneity level) that evaluates the whole personalization grid (learning
rates x epochs, L2 strengths, interpolation alphas) from its trained prompt, so
personalization settings are an axis of every cell rather than separate runs.

  * `build_grid` turns algorithm names (`ALGORITHM_FLAGS`), partition specs
    (`natural`, `dirichlet:<alpha>`, `home_fraction:<fraction>`) and pass-through
    `run_experiment.py` flags into `Cell`s.
  * `run_sweep` runs every incomplete cell as a subprocess into
    `<output_dir>/<cell name>/` (isolation: each run owns its TFF context,
    worker processes and memory), streaming its lines prefixed with the cell
    name. A cell is complete when its results (`report.md`, `summary.json`,
    `personalization.csv`) exist for the same flags; complete cells are skipped
    and interrupted ones resume from their checkpoints (the driver does that).
  * `write_sweep_report` writes `sweep_report.md`, `claims.json`
    (`fedprompt.claims`) and the sweep plots in `<output_dir>/plots/`.

Library functions take explicit keyword arguments; the flags live in
`run_sweep.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fedprompt import claims, report

PathLike = Union[str, pathlib.Path]
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN_EXPERIMENT = REPO_ROOT / "run_experiment.py"

# What each algorithm name means as run_experiment flags. The client learning
# rates are this sweep's defaults (Adam needs a much smaller step than SGD on
# soft prompts; FedSGD's single server step needs a large one), not the paper's
# values, and any of them can be overridden per algorithm.
ALGORITHM_FLAGS: Dict[str, Tuple[str, ...]] = {
    claims.FEDAVG_SGD: ("--algorithm=fedavg", "--client_optimizer=sgd"),
    claims.FEDAVG_ADAM: (
        "--algorithm=fedavg",
        "--client_optimizer=adam",
        "--client_learning_rate=0.03",
    ),
    claims.FEDSGD: ("--algorithm=fedsgd", "--server_learning_rate=3.0"),
    # The same client optimizer as FedAvg(Adam), so C4 compares federation, not
    # optimizers.
    claims.CENTRALIZED: (
        "--algorithm=centralized",
        "--client_optimizer=adam",
        "--client_learning_rate=0.03",
    ),
    claims.LOCAL: ("--algorithm=local",),
}
# Flags the grid sets; passing them through would silently change a cell.
RESERVED_FLAGS = ("algorithm", "partition", "alpha", "home_fraction", "output_dir", "overwrite")
CELL_MARKER = "sweep_cell.json"
SWEEP_REPORT_MD = "sweep_report.md"
CLAIMS_JSON = "claims.json"
LOGS_DIR = "logs"
COMPLETE_FILES = (report.REPORT_MD, report.SUMMARY_JSON, report.PERSONALIZATION_CSV)


def has_results(run_dir: PathLike) -> bool:
    """Whether `run_dir` holds a finished run's results (`COMPLETE_FILES`)."""
    return all((pathlib.Path(run_dir) / name).is_file() for name in COMPLETE_FILES)


class SweepError(ValueError):
    """A sweep setting that cannot work; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Level:
    """A heterogeneity level: its label (`dirichlet:0.1`) and run_experiment flags."""

    label: str
    flags: Tuple[str, ...]

    @property
    def file_name(self) -> str:
        return self.label.replace(":", "_")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the sweep: `run_experiment.py <argv> --output_dir=<dir>/<name>`."""

    name: str
    algorithm: str
    level: Level
    argv: Tuple[str, ...]


# --------------------------------------------------------------------------- #
# The grid.
# --------------------------------------------------------------------------- #


def _split_list(text: str, name: str) -> List[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SweepError(f"--{name}: must name at least one entry, got {text!r}.")
    if len(set(items)) != len(items):
        raise SweepError(f"--{name}: lists an entry twice ({text!r}).")
    return items


def parse_algorithms(text: str) -> List[str]:
    """`fedavg_sgd,fedavg_adam,...` -> names of `ALGORITHM_FLAGS`."""
    names = _split_list(text, "algorithms")
    for name in names:
        if name not in ALGORITHM_FLAGS:
            raise SweepError(
                f"--algorithms: unknown algorithm {name!r}; choose from {', '.join(ALGORITHM_FLAGS)}."
            )
    return names


def parse_level(spec: str) -> Level:
    """`natural` | `dirichlet:<alpha > 0, inf = IID>` | `home_fraction:<f in [0, 1]>`."""
    kind, _, value = spec.partition(":")
    usage = f"--partitions: {spec!r} is not natural, dirichlet:<alpha> or home_fraction:<fraction>"
    if kind == "natural":
        if value:
            raise SweepError(f"{usage} (natural takes no value).")
        return Level("natural", ("--partition=natural",))
    if kind not in ("dirichlet", "home_fraction"):
        raise SweepError(f"{usage}.")
    try:
        number = float(value)
    except ValueError:
        raise SweepError(f"{usage} (the value must be a number).") from None
    if kind == "dirichlet":
        if not number > 0:
            raise SweepError(f"--partitions: {spec!r} needs alpha > 0 (inf = IID).")
        return Level(f"dirichlet:{number:g}", ("--partition=dirichlet", f"--alpha={number!r}"))
    if not 0 <= number <= 1:
        raise SweepError(f"--partitions: {spec!r} needs a fraction in [0, 1].")
    return Level(
        f"home_fraction:{number:g}", ("--partition=home_fraction", f"--home_fraction={number!r}")
    )


def parse_partitions(text: str) -> List[Level]:
    levels = [parse_level(spec) for spec in _split_list(text, "partitions")]
    labels = [level.label for level in levels]
    if len(set(labels)) != len(labels):
        raise SweepError(f"--partitions: lists a level twice ({text!r}).")
    return levels


def _flag_name(argument: str) -> str:
    return argument[2:].split("=", 1)[0]


def _check_pass_through(argument: str, source: str) -> str:
    if not argument.startswith("--") or len(argument) < 3:
        raise SweepError(f"{source}: {argument!r} is not a --flag=value argument.")
    name = _flag_name(argument)
    if name in RESERVED_FLAGS or (name.startswith("no") and name[2:] in RESERVED_FLAGS):
        raise SweepError(
            f"{source}: --{name} is set by the sweep grid (--algorithms / --partitions / "
            "--output_dir); remove it."
        )
    return argument


def parse_base_flags(text: str, name: str = "base_flags") -> List[str]:
    """A shell-quoted string of run_experiment flags (`--base_flags`, `--training_flags`)."""
    try:
        arguments = shlex.split(text or "")
    except ValueError as e:
        raise SweepError(f"--{name}: cannot be split like a shell line ({e}).") from None
    return [_check_pass_through(a, f"--{name}") for a in arguments]


def parse_sets(
    settings: Sequence[str], algorithms: Sequence[str]
) -> Tuple[List[str], Dict[str, List[str]]]:
    """`[algorithm:]key=value` entries -> (flags for every cell, {algorithm: flags}).

    An algorithm prefix scopes the flag to that algorithm's cells (run_experiment
    rejects flags an algorithm does not use, e.g. `--client_learning_rate` for
    FedSGD).
    """
    common: List[str] = []
    scoped: Dict[str, List[str]] = {}
    for setting in settings:
        scope, key_value = None, setting
        head, sep, tail = setting.partition(":")
        if sep and "=" not in head:
            scope, key_value = head, tail
        if "=" not in key_value or not key_value.split("=", 1)[0].strip():
            raise SweepError(f"--set: {setting!r} is not [algorithm:]key=value.")
        if scope is not None and scope not in algorithms:
            raise SweepError(
                f"--set: {setting!r} names algorithm {scope!r}, which is not in --algorithms "
                f"({', '.join(algorithms)})."
            )
        key, value = key_value.split("=", 1)
        argument = _check_pass_through(f"--{key.strip().lstrip('-')}={value}", "--set")
        (common if scope is None else scoped.setdefault(scope, [])).append(argument)
    return common, scoped


def build_grid(
    *,
    algorithms: Sequence[str],
    levels: Sequence[Level],
    base_flags: Sequence[str] = (),
    algorithm_flags: Optional[Mapping[str, Sequence[str]]] = None,
    training_flags: Sequence[str] = (),
) -> List[Cell]:
    """The cells, level by level; later flags override earlier ones (absl semantics).

    Args:
      algorithms: names of `ALGORITHM_FLAGS`.
      levels: heterogeneity levels.
      base_flags: run_experiment flags for every cell (after the algorithm's).
      algorithm_flags: {algorithm: flags} for that algorithm's cells (last).
      training_flags: flags for the cells that train a prompt, i.e. all but
        `local` (after `base_flags`): `--rounds`, `--runtime`, ... which
        run_experiment rejects for `--algorithm=local`.

    Returns:
      One `Cell` per (level, algorithm), named `<algorithm>__<level>`.
    """
    algorithm_flags = algorithm_flags or {}
    cells = []
    for level in levels:
        for algorithm in algorithms:
            if algorithm not in ALGORITHM_FLAGS:
                raise SweepError(f"--algorithms: unknown algorithm {algorithm!r}.")
            argv = (
                *ALGORITHM_FLAGS[algorithm],
                *level.flags,
                *base_flags,
                *(training_flags if algorithm != claims.LOCAL else ()),
                *algorithm_flags.get(algorithm, ()),
            )
            cells.append(Cell(f"{algorithm}__{level.file_name}", algorithm, level, argv))
    return cells


# --------------------------------------------------------------------------- #
# Completeness (resume).
# --------------------------------------------------------------------------- #


def _given_flags(argv: Sequence[str]) -> Dict[str, str]:
    """{flag name: value as given}; the last occurrence wins, as in absl."""
    given = {}
    for argument in argv:
        name, sep, value = argument[2:].partition("=")
        if sep:
            given[name] = value
        elif name.startswith("no"):
            given[name[2:]] = "false"
        else:
            given[name] = "true"
    return given


def _same_value(recorded: Any, given: str) -> bool:
    if isinstance(recorded, (list, tuple)):
        items = [item.strip() for item in given.split(",") if item.strip()]
        return len(items) == len(recorded) and all(map(_same_value, recorded, items))
    if isinstance(recorded, bool):
        return (
            given.strip().lower() in ("true", "1")
            if recorded
            else given.strip().lower()
            in (
                "false",
                "0",
            )
        )
    if recorded is None:
        return given.strip().lower() in ("", "none")
    if isinstance(recorded, (int, float)):
        try:
            return math.isclose(float(given), float(recorded), rel_tol=1e-9, abs_tol=0.0)
        except ValueError:
            return False
    return str(recorded) == given


def recorded_argv(cell_dir: PathLike) -> List[str]:
    """The flags a finished cell ran with, from its `sweep_cell.json`.

    Raises:
      SweepError: the marker cannot be read (missing, or not UTF-8 text), is not
        a JSON object, or holds no list of flags.
    """
    marker = pathlib.Path(cell_dir) / CELL_MARKER
    try:
        text = marker.read_text()
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError.
        raise SweepError(f"{marker}: unreadable ({e}).") from e
    try:
        argv = json.loads(text).get("argv")
    except (ValueError, AttributeError) as e:
        raise SweepError(f"{marker}: not a JSON object ({e}).") from e
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise SweepError(f'{marker}: "argv" is not a list of flags.')
    return argv


def cell_is_complete(cell: Cell, cell_dir: PathLike) -> bool:
    """Whether `cell_dir` holds finished results of exactly this cell's flags.

    The sweep writes `sweep_cell.json` (the cell's flags) after a run succeeds;
    its flags must mean the same as the cell's (the same value for every flag,
    the last occurrence winning as in absl; the order they are given in does not
    matter). Without it (results made by hand) the flags recorded in
    `config.json` must equal every flag of the cell.
    """
    cell_dir = pathlib.Path(cell_dir)
    if not has_results(cell_dir):
        return False
    if (cell_dir / CELL_MARKER).is_file():
        try:
            return _given_flags(recorded_argv(cell_dir)) == _given_flags(cell.argv)
        except SweepError:
            return False
    try:
        recorded = json.loads((cell_dir / report.CONFIG_JSON).read_text()).get("flags", {})
    except (OSError, ValueError, AttributeError):
        return False
    return all(
        name in recorded and _same_value(recorded[name], value)
        for name, value in _given_flags(cell.argv).items()
    )


def _mark_complete(cell: Cell, cell_dir: pathlib.Path) -> None:
    tmp = cell_dir / (CELL_MARKER + ".tmp")
    tmp.write_text(json.dumps({"cell": cell.name, "argv": list(cell.argv)}, indent=1) + "\n")
    os.replace(tmp, cell_dir / CELL_MARKER)


# --------------------------------------------------------------------------- #
# Running.
# --------------------------------------------------------------------------- #

# Parses every cell's flags with run_experiment's own flag definitions and
# validates the resulting config, in one subprocess (importing TF takes seconds
# and the sweep process itself stays free of TF and TFF).
_PREFLIGHT = """
import json, sys
from absl import flags
import run_experiment
from fedprompt import program
for name, argv in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["run_experiment.py", *argv])
        run_experiment.config_from_flags().validate()
    except (flags.Error, run_experiment.FlagError, program.ConfigError) as e:
        print(f"cell {name}: {e}")
        sys.exit(2)
"""


def _environment() -> Dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        PYTHONPATH=str(REPO_ROOT) + (os.pathsep + path if path else ""),
    )


def preflight(cells: Sequence[Cell], *, python: str = sys.executable) -> None:
    """Raises `SweepError` (one line naming the cell) if a cell's flags are rejected."""
    payload = json.dumps([[cell.name, list(cell.argv)] for cell in cells])
    result = subprocess.run(
        [python, "-c", _PREFLIGHT, payload],
        cwd=REPO_ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in result.stdout.splitlines() if line.startswith("cell ")]
        detail = lines[-1] if lines else (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise SweepError(f"run_experiment rejects the flags of {detail.removeprefix('cell ')}")


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the run's process group (TFF worker processes may outlive it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)


def run_cell_subprocess(
    cell: Cell,
    *,
    cell_dir: pathlib.Path,
    log_path: pathlib.Path,
    progress: Callable[[str], None],
    python: str = sys.executable,
    timeout_s: Optional[float] = None,
) -> int:
    """Runs one cell with run_experiment.py; returns its exit status (124: timed out).

    Its stdout and stderr go, line by line, to `progress` (prefixed with the
    cell name) and to `log_path`. The run gets its own process group, which is
    terminated when the run ends, times out (`timeout_s`; a rerun resumes it
    from its last checkpoint) or this call is interrupted, so no TFF
    `worker_binary` outlives it (DESIGN.md trap 1).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [python, str(RUN_EXPERIMENT), *cell.argv, f"--output_dir={cell_dir}"]
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )

        def forward():
            for line in process.stdout:
                log.write(line)
                log.flush()
                progress(f"[{cell.name}] {line.rstrip()}")

        # The `try` starts right after Popen: a SIGTERM (run_sweep raises
        # SystemExit on it) that lands while the reader starts must still stop
        # the group. It used to start after the reader, and a signal in between
        # left the cell running (seen as a flaky test on a loaded machine).
        try:
            # A reader thread, so a leftover child holding the pipe open cannot
            # block the sweep once the run itself has exited.
            reader = threading.Thread(target=forward, daemon=True)
            reader.start()
            status = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            progress(f"[{cell.name}] timed out after {timeout_s:g} s; stopping it")
            status = 124
        finally:
            _stop_group(process)
            process.wait()
        reader.join(timeout=5)
    return status


@dataclasses.dataclass
class SweepOutcome:
    completed: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)
    failed: List[str] = dataclasses.field(default_factory=list)


def run_sweep(
    *,
    output_dir: PathLike,
    cells: Sequence[Cell],
    progress: Callable[[str], None] = print,
    runner: Optional[Callable[..., int]] = None,
    cell_timeout_s: Optional[float] = None,
) -> SweepOutcome:
    """Runs every incomplete cell (in order), then nothing else; see `write_sweep_report`.

    Args:
      output_dir: the sweep directory; cell `c` writes into `output_dir/c.name`.
      cells: the grid (`build_grid`).
      progress: receives one line at a time.
      runner: `runner(cell, cell_dir=, log_path=, progress=) -> exit status`;
        default `run_cell_subprocess`.
      cell_timeout_s: wall-time limit of one cell for the default runner (a
        hung run is stopped and counted as failed); None = no limit.

    Returns:
      Which cells completed now, were skipped as already complete, or failed
      (a failed cell does not stop the others).
    """
    runner = runner or functools.partial(run_cell_subprocess, timeout_s=cell_timeout_s)
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outcome = SweepOutcome()
    for index, cell in enumerate(cells, start=1):
        cell_dir = output_dir / cell.name
        header = f"[{cell.name}] cell {index}/{len(cells)}"
        if cell_is_complete(cell, cell_dir):
            progress(f"{header}: complete, skipped")
            outcome.skipped.append(cell.name)
            continue
        progress(f"{header}: run_experiment.py {shlex.join(cell.argv)}")
        status = runner(
            cell,
            cell_dir=cell_dir,
            log_path=output_dir / LOGS_DIR / f"{cell.name}.log",
            progress=progress,
        )
        if status == 0 and has_results(cell_dir):
            _mark_complete(cell, cell_dir)
            outcome.completed.append(cell.name)
        else:
            progress(f"{header}: FAILED (exit status {status}); see {LOGS_DIR}/{cell.name}.log")
            outcome.failed.append(cell.name)
    return outcome


# --------------------------------------------------------------------------- #
# The sweep report.
# --------------------------------------------------------------------------- #


def discover_run_dirs(output_dir: PathLike) -> List[pathlib.Path]:
    """Subdirectories of a sweep holding a run (`config.json`), sorted by name."""
    output_dir = pathlib.Path(output_dir)
    return sorted(
        p for p in output_dir.iterdir() if p.is_dir() and (p / report.CONFIG_JSON).is_file()
    )


_ALGORITHM_ORDER = {name: i for i, name in enumerate(ALGORITHM_FLAGS)}
_ALGORITHM_NAMES = {
    claims.FEDAVG_SGD: "FedAvg(SGD)",
    claims.FEDAVG_ADAM: "FedAvg(Adam)",
    claims.FEDSGD: "FedSGD",
    claims.CENTRALIZED: "centralized",
    claims.LOCAL: "no training",
}
_COLORS = {
    claims.FEDAVG_SGD: "tab:blue",
    claims.FEDAVG_ADAM: "tab:red",
    claims.FEDSGD: "tab:green",
    claims.CENTRALIZED: "tab:purple",
    claims.LOCAL: "tab:gray",
}
_METHOD_COLORS = {
    report.FINETUNE: "tab:blue",
    report.L2: "tab:orange",
    report.INTERPOLATION: "tab:green",
}


def _display(algorithm: str) -> str:
    return _ALGORITHM_NAMES.get(algorithm, algorithm)


def _sorted_runs(runs: Sequence[claims.RunResult]) -> List[claims.RunResult]:
    order = {level: i for i, level in enumerate(claims.order_levels(runs))}
    return sorted(
        runs,
        key=lambda r: (order[r.level], _ALGORITHM_ORDER.get(r.algorithm, 99), r.algorithm),
    )


def _frontier(points: Sequence[claims.Point]) -> List[claims.Point]:
    """Non-dominated points, sorted by local score."""
    ordered = sorted(points, key=lambda p: (-p.local, -p.global_))
    frontier, best = [], -math.inf
    for point in ordered:
        if point.global_ > best:
            frontier.append(point)
            best = point.global_
    return frontier[::-1]


def _panels(count: int, width: float, height: float, rows: int = 1):
    figure = report._new_figure(width * count, height * rows)
    axes = np.asarray(figure.subplots(rows, count, squeeze=False))
    return figure, axes


_LOCAL_AXIS = "mean local ROUGE-L (test clients)"
_GLOBAL_AXIS = "mean global ROUGE-L"


def _finish_axes(ax, title, xlabel, *, ylabel=None, legend_size=7, title_size=None):
    """Title, labels, grid, and a legend when something on the axes has a label."""
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)


def _plot_tradeoff_by_level(levels, by_level, path):
    figure, axes = _panels(len(levels), 5.0, 4.5)
    plotted = 0
    for column, level in enumerate(levels):
        ax = axes[0, column]
        for algorithm, run in by_level[level].items():
            points = claims.grid_points(run, report.FINETUNE)
            if not points:
                continue
            plotted += 1
            color = _COLORS.get(algorithm)
            ax.scatter(
                [p.local for p in points], [p.global_ for p in points], s=8, alpha=0.3, color=color
            )
            frontier = _frontier(points)
            ax.plot(
                [p.local for p in frontier],
                [p.global_ for p in frontier],
                marker="o",
                markersize=3,
                color=color,
                label=f"{_display(algorithm)} (HV {claims._hypervolume_of(points):.3f})",
            )
            start = [p for p in points if p.epochs == 0]
            if start:
                ax.scatter([start[0].local], [start[0].global_], marker="*", s=150, color=color)
        _finish_axes(ax, f"{level}: fine-tuning trade-off", _LOCAL_AXIS, ylabel=_GLOBAL_AXIS)
    if not plotted:
        return None
    # Two lines: one line is wider than a one-level (single-panel) figure.
    figure.suptitle("Pareto frontiers over every lr and epoch count\n(star: epoch 0)")
    return report._save(figure, path)


def _plot_norms(levels, by_level, path):
    figure, axes = _panels(len(levels), 5.0, 3.5, rows=2)
    plotted = 0
    for column, level in enumerate(levels):
        for row, (name, title) in enumerate(
            (("grad_norm_mean", "client gradient norm"), ("update_norm_mean", "client update norm"))
        ):
            ax = axes[row, column]
            for algorithm, run in by_level[level].items():
                values = report._column(run.rounds, name) if run.rounds else np.array([])
                if not (values.size and np.any(np.isfinite(values) & (values > 0))):
                    continue
                plotted += 1
                rounds = report._column(run.rounds, "round")
                ax.plot(rounds, values, color=_COLORS.get(algorithm), label=_display(algorithm))
            ax.set_yscale("log")
            _finish_axes(ax, f"{level}: {title}", "round")
    if not plotted:
        return None
    return report._save(figure, path)


def _plot_mitigations(levels, by_level, path):
    figure, axes = _panels(len(levels), 5.0, 4.5)
    plotted = 0
    for column, level in enumerate(levels):
        ax = axes[0, column]
        run = claims._reference(by_level[level])
        if run is None:
            continue
        nonzero = sorted(
            {
                p.epochs
                for p in claims.grid_points(run, report.FINETUNE)
                if p.epochs not in (0, None)
            }
        )
        for method in (report.FINETUNE, report.L2, report.INTERPOLATION):
            points = [
                p
                for p in claims.grid_points(run, method)
                if p.epochs != 0 and (method != report.INTERPOLATION or 0 < (p.alpha or 0) < 1)
            ]
            if not points:
                continue
            plotted += 1
            color = _METHOD_COLORS[method]
            frontier = _frontier(points)
            ax.plot(
                [p.local for p in frontier],
                [p.global_ for p in frontier],
                color=color,
                marker="o",
                markersize=3,
                label=f"{method} (frontier, all epochs)",
            )
            first = [p for p in points if nonzero and p.epochs == nonzero[0]]
            if first:
                ax.scatter(
                    [p.local for p in first],
                    [p.global_ for p in first],
                    s=60,
                    marker="D",
                    facecolors="none",
                    edgecolors=color,
                    label=f"{method} at {nonzero[0]} epochs",
                )
        start = [p for p in claims.grid_points(run, report.FINETUNE) if p.epochs == 0]
        if start:
            ax.scatter([start[0].local], [start[0].global_], marker="*", s=150, color="black")
        _finish_axes(
            ax,
            f"{level}: mitigations from {_display(run.algorithm)}",
            _LOCAL_AXIS,
            ylabel=_GLOBAL_AXIS,
            legend_size=6,
        )
    if not plotted:
        return None
    return report._save(figure, path)


def _as_tuples(curves: Mapping[float, List[claims.Point]]) -> Dict[float, list]:
    """{lr: [(epochs, local, global)]} of `claims.finetune_curves`."""
    return {lr: [(p.epochs, p.local, p.global_) for p in c] for lr, c in curves.items()}


def _plot_epoch_row(axes_row, curves, title, *, title_size):
    """Local (left) and global (right) ROUGE-L vs epochs, one line per lr.

    `curves`: {lr: [(epochs, local, global)]}; `title(name)` titles each panel.
    """
    for lr, curve in curves.items():
        epochs = [float(e) for e, _, _ in curve]
        label = f"lr {lr:.3g}"
        axes_row[0].plot(epochs, [v[1] for v in curve], marker="o", ms=3, label=label)
        axes_row[1].plot(epochs, [v[2] for v in curve], marker="o", ms=3, label=label)
    all_epochs = sorted({float(e) for curve in curves.values() for e, _, _ in curve})
    for ax, name in zip(axes_row, ("local", "global")):
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xticks(all_epochs, [f"{e:g}" for e in all_epochs])
        ax.minorticks_off()
        _finish_axes(ax, title(name), "personalization epochs", title_size=title_size)


def _plot_epochs(levels, by_level, path):
    figure, axes = _panels(2, 5.0, 3.5, rows=len(levels))
    plotted = 0
    for row, level in enumerate(levels):
        run = claims._reference(by_level[level])
        if run is None:
            continue
        curves = _as_tuples(claims.finetune_curves(run))
        plotted += len(curves)
        _plot_epoch_row(
            axes[row],
            curves,
            lambda name, level=level, run=run: (
                f"{level}: {name} ROUGE-L from {_display(run.algorithm)}"
            ),
            title_size=10,
        )
    if not plotted:
        return None
    return report._save(figure, path)


def _plot_heterogeneity(levels, by_level, path):
    figure, axes = _panels(2, 5.0, 3.5)
    plotted = 0
    algorithms = sorted(
        {a for level in levels for a in by_level[level]}, key=lambda a: _ALGORITHM_ORDER.get(a, 99)
    )
    for algorithm in algorithms:
        xs, gains, forgetting = [], [], []
        for x, level in enumerate(levels):
            run = by_level[level].get(algorithm)
            if run is None:
                continue
            curves = claims.finetune_curves(run)
            epochs = sorted({p.epochs for c in curves.values() for p in c if p.epochs != 0})
            tradeoff = (
                claims._tradeoff_at(curves, max(curves), epochs[-1]) if curves and epochs else None
            )
            if tradeoff is None:
                continue
            xs.append(x)
            gains.append(tradeoff[0])
            forgetting.append(tradeoff[1])
        if xs:
            plotted += 1
            color = _COLORS.get(algorithm)
            axes[0, 0].plot(xs, gains, marker="o", color=color, label=_display(algorithm))
            axes[0, 1].plot(xs, forgetting, marker="o", color=color, label=_display(algorithm))
    if not plotted:
        return None
    for ax, title in zip(axes[0], ("local gain", "forgetting (global drop)")):
        ax.set_xticks(range(len(levels)), levels, rotation=20, fontsize=7)
        ax.axhline(0, color="grey", linewidth=0.6)
        _finish_axes(ax, f"{title} at the largest lr and epochs", "heterogeneity (least -> most)")
    return report._save(figure, path)


@dataclasses.dataclass(frozen=True)
class ClientCurves:
    """Fine-tuning curves of a run's test clients whose home category is one category.

    Attributes:
      run: the run's display name; algorithm and level as in `claims.RunResult`.
      client_ids: the test clients averaged (usually one).
      curves: {learning rate: [(epochs, mean local ROUGE-L, mean global ROUGE-L)]},
        epochs ascending, epoch 0 (the global prompt) included.
    """

    run: str
    algorithm: str
    level: str
    client_ids: Tuple[str, ...]
    curves: Mapping[float, List[Tuple[Any, float, float]]]


def category_client_curves(
    run: claims.RunResult, run_dir: PathLike, category: str
) -> Optional[ClientCurves]:
    """Plain fine-tuning curves of `run`'s test clients with home category `category`.

    `partition.json` tells which test client has which home category; their rows
    of `personalization.csv` are summarized as `claims` summarizes a run (the start
    named like the run's algorithm, finite scores). None when no test client has
    that category.
    """
    run_dir = pathlib.Path(run_dir)
    partition = json.loads((run_dir / report.PARTITION_JSON).read_text())
    client_ids = tuple(
        c["client_id"]
        for c in partition.get("clients", [])
        if c.get("population") == report.TEST_SPLIT and c.get("home_category") == category
    )
    if not client_ids:
        return None
    rows = [
        r
        for r in report.read_csv(run_dir / report.PERSONALIZATION_CSV)
        if r["client_split"] != report.TEST_SPLIT or r["client_id"] in client_ids
    ]
    clients_run = dataclasses.replace(run, summary=report.summarize_personalization(rows))
    curves = _as_tuples(claims.finetune_curves(clients_run))
    return ClientCurves(run.name, run.algorithm, run.level, client_ids, curves)


def _plot_example_clients(examples: Sequence[ClientCurves], category: str, path):
    """Local and global ROUGE-L vs epochs per lr: one row per level, its reference run."""
    by_level: Dict[str, Dict[str, ClientCurves]] = {}
    for example in examples:
        by_level.setdefault(example.level, {}).setdefault(example.algorithm, example)
    examples = [
        claims._reference(group) or next(iter(group.values())) for group in by_level.values()
    ]
    if not examples:
        return None
    figure, axes = _panels(2, 5.0, 3.5, rows=len(examples))
    for row, example in enumerate(examples):
        _plot_epoch_row(
            axes[row],
            example.curves,
            lambda name, example=example: (
                f"{example.level}: {category} client, {name} ROUGE-L "
                f"({_display(example.algorithm)})"
            ),
            title_size=9,
        )
    return report._save(figure, path)


def _example_client_lines(examples: Sequence[ClientCurves], category: str) -> List[str]:
    lines = [f"## Example client: {category}", ""]
    if not examples:
        return lines + [f"No test client has home category {category!r} in these runs.", ""]
    rows = []
    for example in examples:
        for lr, curve in example.curves.items():
            rows.append(
                (
                    example.run,
                    _display(example.algorithm),
                    example.level,
                    ", ".join(example.client_ids),
                    lr,
                    " / ".join(f"{float(e):g}" for e, _, _ in curve),
                    " / ".join(report._format_number(v[1], 3) for v in curve),
                    " / ".join(report._format_number(v[2], 3) for v in curve),
                )
            )
    lines += report._table(
        ("run", "algorithm", "level", "client", "lr", "epochs", "local ROUGE-L", "global ROUGE-L"),
        rows,
    )
    return lines + [
        "",
        f"Plain fine-tuning of the {category} test client(s) from each run's global prompt; "
        "each column lists the values at the epochs in the order of the `epochs` column.",
        "",
    ]


EXAMPLE_CLIENT_PLOT = "example_client.png"
SWEEP_PLOTS = {
    "tradeoff_by_level.png": _plot_tradeoff_by_level,
    "norms_by_level.png": _plot_norms,
    "mitigations_by_level.png": _plot_mitigations,
    "epochs_by_level.png": _plot_epochs,
    "heterogeneity.png": _plot_heterogeneity,
}


def write_sweep_plots(output_dir: PathLike, runs: Sequence[claims.RunResult]) -> List[pathlib.Path]:
    """Writes the sweep plots (each skipped when it has no data) into `output_dir/plots/`.

    * `tradeoff_by_level.png`: one panel per heterogeneity level; per
      algorithm, every fine-tuning (local, global) point, its Pareto frontier
      (with its hypervolume) and the epoch-0 point (C3, C4).
    * `norms_by_level.png`: client gradient and update norms over rounds per
      algorithm (log scale), one column per level (C3).
    * `mitigations_by_level.png`: fine-tuning vs L2 vs interpolation from
      each level's reference run; frontiers over all epochs, the points at the
      fewest nonzero epochs marked (C5).
    * `epochs_by_level.png`: local and global ROUGE-L vs epochs per lr, one
      row per level (C1, C2).
    * `heterogeneity.png`: local gain and forgetting at the largest lr and
      epochs vs level, per algorithm (C6).
    """
    plots_dir = pathlib.Path(output_dir) / report.PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name in SWEEP_PLOTS:
        (plots_dir / name).unlink(missing_ok=True)
    levels = claims.order_levels(runs)
    by_level: Dict[str, Dict[str, claims.RunResult]] = {level: {} for level in levels}
    for run in _sorted_runs(runs):
        by_level[run.level].setdefault(run.algorithm, run)
    written = [plot(levels, by_level, plots_dir / name) for name, plot in SWEEP_PLOTS.items()]
    return [path for path in written if path is not None]


# Per claim, the level numbers shown in the claims table (all are in claims.json).
_KEY_NUMBERS = {
    "C1": ("local_gain", "forgetting", "lr_max", "epochs_max"),
    "C2": (
        "matched_local",
        "global_at_match_small_lr",
        "global_at_match_large_lr",
        "epochs_to_match_small_lr",
        "epochs_to_match_large_lr",
    ),
    "C3": (
        "hypervolume_fedavg_adam",
        "hypervolume_fedavg_sgd",
        "update_norm_ratio_sgd_to_adam",
        "grad_norm_ratio_sgd_to_adam",
    ),
    "C4": ("hypervolume_fedavg_adam", "hypervolume_fedsgd", "hypervolume_centralized"),
    "C5": ("epochs", "hypervolume_finetune", "hypervolume_l2", "hypervolume_interpolation"),
    "C6": ("heterogeneity", "local_gain", "forgetting"),
}


def _key_numbers(record: Mapping[str, Any]) -> str:
    levels = record["numbers"].get("levels", {})
    parts = []
    for level, numbers in levels.items():
        shown = ", ".join(
            f"{name} {report._format_number(numbers[name], 3)}"
            for name in _KEY_NUMBERS[record["claim"]]
            if numbers.get(name) is not None
        )
        verdict = numbers.get("verdict")
        prefix = f"{level}" + (f" {verdict}" if verdict else "")
        if numbers.get("reason") and not shown:
            shown = numbers["reason"]
        parts.append(f"**{prefix}**: {shown}")
    if not parts and record["numbers"].get("reason"):
        parts.append(record["numbers"]["reason"])
    return "<br>".join(parts)


def _claim_details(record: Mapping[str, Any]) -> List[str]:
    lines = [f"### {record['claim']}: {record['verdict']}", "", record["statement"], ""]
    lines += [f"Criterion: {record['criterion']}", ""]
    numbers = record["numbers"]
    levels = numbers.get("levels", {})
    scalar_names: List[str] = []
    for level_numbers in levels.values():
        for name, value in level_numbers.items():
            if name not in scalar_names and not isinstance(value, (dict, list)):
                scalar_names.append(name)
    if levels:
        lines += report._table(
            ["level", *scalar_names],
            ([level, *(ln.get(name) for name in scalar_names)] for level, ln in levels.items()),
        )
        lines.append("")
    extra = [(k, v) for k, v in numbers.items() if k != "levels" and not isinstance(v, dict)]
    if extra:
        lines += report._table(("quantity", "value"), extra) + [""]
    for level, level_numbers in levels.items():
        checks = level_numbers.get("checks")
        if checks:
            failed = [name for name, ok in checks.items() if not ok]
            lines.append(
                f"- {level} checks: "
                + ("all hold." if not failed else f"failed: {', '.join(failed)}.")
            )
    if any(ln.get("checks") for ln in levels.values()):
        lines.append("")
    return lines


def cell_command(cell_dir: PathLike) -> Optional[str]:
    """The `run_experiment.py` command that produced a sweep cell, from its marker.

    None without a `sweep_cell.json` (results made outside the sweep, or the sweep
    stopped between the run's end and marking it).

    Raises:
      SweepError: the marker exists but holds no list of flags.
    """
    cell_dir = pathlib.Path(cell_dir)
    if not (cell_dir / CELL_MARKER).is_file():
        return None
    argv = recorded_argv(cell_dir)
    return shlex.join(["python", RUN_EXPERIMENT.name, *argv, f"--output_dir={cell_dir.as_posix()}"])


def _cell_command_lines(runs: Sequence[Tuple[claims.RunResult, pathlib.Path]]) -> List[str]:
    # Each cell's own command: a sweep directory is often filled by several
    # invocations (resumed, or subsets of the grid) and the report may be
    # regenerated with --report_only, so no single sweep command says how every
    # run was made.
    lines = ["## Cell commands", ""]
    for run, run_dir in runs:
        try:
            command = cell_command(run_dir)
        except SweepError as e:
            lines.append(f"- {run.name}: {e} Its flags are in its `{report.CONFIG_JSON}`.")
            continue
        if command is None:
            lines.append(
                f"- {run.name}: no `{CELL_MARKER}` (results made outside the sweep, or the "
                f"sweep stopped before marking the cell); every flag's value is in its "
                f"`{report.CONFIG_JSON}`."
            )
        else:
            lines.append(f"- {run.name}: `{command}`")
    return [*lines, ""]


def write_sweep_report(
    output_dir: PathLike,
    *,
    run_dirs: Optional[Sequence[PathLike]] = None,
    description: str = "",
    failed: Sequence[str] = (),
    example_category: Optional[str] = None,
) -> Dict[str, Any]:
    """Writes `sweep_report.md`, `claims.json` and the sweep plots.

    Args:
      output_dir: the sweep directory.
      run_dirs: the runs to include (default: `discover_run_dirs(output_dir)`).
      description: a paragraph about the grid (the command, the settings).
      failed: names of cells that failed, listed in the report.
      example_category: a category whose test clients get their own section and
        plot (`example_client.png`): fine-tuning curves at each lr, in every run
        (the paper's "translation client").

    Returns:
      {"report": path, "claims": path, "plots": [paths], "records": claim records}.
    """
    output_dir = pathlib.Path(output_dir)
    run_dirs = [pathlib.Path(p) for p in (run_dirs or discover_run_dirs(output_dir))]
    complete = {p.name for p in run_dirs if has_results(p)}
    runs = [claims.load_run(p) for p in run_dirs if p.name in complete]
    dir_of = {p.name: p for p in run_dirs}
    ordered = _sorted_runs(runs)
    records = claims.evaluate_claims(runs)
    claims_path = output_dir / CLAIMS_JSON
    claims_path.write_text(json.dumps(records, indent=2, allow_nan=False) + "\n")
    plots = write_sweep_plots(output_dir, runs)

    aggregate = {
        pathlib.Path(row["run_dir"]).name: row
        for row in report.aggregate_summaries([p for p in run_dirs if p.name in complete])
    }
    lines = ["# fedprompt sweep", ""]
    if description:
        lines += [description, ""]
    lines += [
        f"{len(runs)} complete runs in `{output_dir}`. Scores are mean ROUGE-L over test "
        "clients: *local* on each client's own test data, *global* on the global test set. "
        "HV is the hypervolume (area under the Pareto frontier, reference (0, 0)) of every "
        "fine-tuning point (all lrs and epochs, epoch 0 included). Heterogeneity is the mean "
        "total-variation distance of the clients' category mix from the overall mix (0 = IID).",
        "",
    ]
    incomplete = sorted({p.name for p in run_dirs} - complete) + [
        name for name in failed if name not in {p.name for p in run_dirs}
    ]
    if incomplete or failed:
        lines += [
            f"Not included (incomplete or failed): {', '.join(sorted(set(incomplete) | set(failed)))}.",
            "",
        ]

    lines += [
        "## Claims",
        "",
        *report._table(
            ("claim", "verdict", "numbers (per level)", "statement"),
            ((r["claim"], f"**{r['verdict']}**", _key_numbers(r), r["statement"]) for r in records),
        ),
        "",
        f"All numbers: [`{CLAIMS_JSON}`]({CLAIMS_JSON}). PASS = the claim holds at every "
        "level where its runs exist; INCONCLUSIVE = the runs or grid points it needs are missing "
        "(or every score involved is 0). Verdicts compare means over the test clients "
        "without a significance test: with few clients and a small global test subsample, "
        "small differences are within noise, so read the numbers, not only the verdicts.",
        "",
    ]

    lines += ["## Runs", ""]
    rows = []
    for run in ordered:
        row = aggregate.get(run.name, {})
        rows.append(
            (
                f"[{run.name}]({run.name}/{report.REPORT_MD})",
                _display(run.algorithm),
                run.level,
                run.heterogeneity,
                row.get("global_prompt_local_rougeL"),
                row.get("global_prompt_global_rougeL"),
                claims._hypervolume_of(claims.grid_points(run, report.FINETUNE)),
                row.get("motley_learning_rate"),
                row.get("motley_epochs"),
                row.get("motley_test_local_rougeL"),
                row.get("motley_test_global_rougeL"),
                row.get("motley_test_forgetting"),
            )
        )
    lines += report._table(
        (
            "run",
            "algorithm",
            "level",
            "heterogeneity",
            "epoch-0 local",
            "epoch-0 global",
            "fine-tune HV",
            "Motley lr",
            "Motley epochs",
            "Motley local",
            "Motley global",
            "Motley forgetting",
        ),
        rows,
    )
    lines += [
        "",
        "Motley columns: the fine-tuning setting chosen by validation clients' local ROUGE-L, "
        "scored on test clients (see each run's report).",
        "",
    ]
    lines += _cell_command_lines([(run, dir_of[run.name]) for run in ordered])
    lines += ["## Claim details", ""]
    for record in records:
        lines += _claim_details(record)
    example_plot = output_dir / report.PLOTS_DIR / EXAMPLE_CLIENT_PLOT
    example_plot.unlink(missing_ok=True)
    if example_category is not None:
        examples = [
            e
            for e in (
                category_client_curves(run, dir_of[run.name], example_category) for run in ordered
            )
            if e is not None
        ]
        lines += _example_client_lines(examples, example_category)
        plot = _plot_example_clients(examples, example_category, example_plot)
        if plot is not None:
            plots = [*plots, plot]
    lines += ["## Plots", ""]
    for plot in plots:
        lines += [f"![{plot.stem}]({plot.relative_to(output_dir).as_posix()})", ""]
    if not plots:
        lines += ["No plots (no complete runs with scores).", ""]
    report_path = output_dir / SWEEP_REPORT_MD
    report_path.write_text("\n".join(lines) + "\n")
    return {"report": report_path, "claims": claims_path, "plots": plots, "records": records}


if __name__ == "__main__":
    # `python -m fedprompt.sweep ...` is `python run_sweep.py ...`: the flags live
    # in the driver (DESIGN.md section 7, rule 1).
    from absl import app

    sys.path.insert(0, str(REPO_ROOT))  # run_sweep.py sits beside the package.
    import run_sweep

    app.run(run_sweep.main)
