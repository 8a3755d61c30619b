r"""Runs a sweep of fedprompt experiments and writes the claims report.

Every (heterogeneity level, algorithm) cell is one `run_experiment.py` run into
`<output_dir>/<algorithm>__<level>/`; finished cells are skipped on a rerun and
interrupted ones resume from their checkpoints. Then `<output_dir>/sweep_report.md`
(runs table, claims C1-C6 with PASS / FAIL / INCONCLUSIVE and their numbers, plots),
`claims.json` and `plots/*.png` are written.

  python run_sweep.py --output_dir=runs/sweep \
      --algorithms=fedavg_sgd,fedavg_adam,fedsgd,centralized \
      --partitions=dirichlet:1,natural \
      --base_flags="--rounds=10 --personalization_epochs=0,1,2,4" \
      --set=fedavg_adam:client_learning_rate=0.01
  python run_sweep.py --output_dir=runs/sweep --report_only

`--base_flags` go to every cell, `--training_flags` to every cell but the
`local` baseline's (which trains nothing); `--set=[algorithm:]key=value` (repeatable) to
every cell or only to one algorithm's cells (run_experiment rejects flags an
algorithm does not use, e.g. `--clients_per_round` for centralized). All cells'
flags are checked by run_experiment's own parser before anything runs.
"""

import pathlib
import shlex
import signal
import sys

from absl import app, flags

from fedprompt import sweep

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/sweep", "Sweep directory.")
_ALGORITHMS = flags.DEFINE_string(
    "algorithms",
    "fedavg_sgd,fedavg_adam,fedsgd,centralized",
    f"Comma-separated, of: {', '.join(sweep.ALGORITHM_FLAGS)}.",
)
_PARTITIONS = flags.DEFINE_string(
    "partitions",
    "dirichlet:1,natural",
    "Heterogeneity levels: natural | dirichlet:<alpha> | home_fraction:<fraction>, "
    "comma-separated.",
)
_BASE_FLAGS = flags.DEFINE_string(
    "base_flags", "", "run_experiment.py flags for every cell, as one shell-quoted string."
)
_TRAINING_FLAGS = flags.DEFINE_string(
    "training_flags",
    "",
    "run_experiment.py flags for every cell that trains (all but local: e.g. --rounds, "
    "--runtime, which --algorithm=local rejects), as one shell-quoted string.",
)
_SET = flags.DEFINE_multi_string(
    "set", [], "[algorithm:]key=value: a run_experiment flag for every cell or one algorithm's."
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Only regenerate the report from the runs in --output_dir."
)
_CELL_TIMEOUT = flags.DEFINE_float(
    "cell_timeout_s", None, "Stop a cell after this many seconds (counted failed; rerun resumes)."
)
_EXAMPLE_CATEGORY = flags.DEFINE_string(
    "example_category",
    None,
    "A data category (e.g. Translation) whose test clients get their own fine-tuning "
    "curves in the report (table and plots/example_client.png).",
)
_PREFLIGHT = flags.DEFINE_bool(
    "preflight", True, "Check every cell's flags with run_experiment's parser first."
)


def exit_on_sigterm(signum, frame):
    """SIGTERM (kill, a batch scheduler) unwinds like Ctrl-C.

    Python's default SIGTERM ends the process at once, so the running cell (its
    own process group, TFF workers included) would be left running; raising
    here runs `run_cell_subprocess`'s cleanup, which stops that group.
    """
    del frame
    raise SystemExit(128 + signum)


def _grid():
    algorithms = sweep.parse_algorithms(_ALGORITHMS.value)
    levels = sweep.parse_partitions(_PARTITIONS.value)
    common, scoped = sweep.parse_sets(_SET.value, algorithms)
    return sweep.build_grid(
        algorithms=algorithms,
        levels=levels,
        base_flags=sweep.parse_base_flags(_BASE_FLAGS.value) + common,
        algorithm_flags=scoped,
        training_flags=sweep.parse_base_flags(_TRAINING_FLAGS.value, "training_flags"),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    output_dir = _OUTPUT_DIR.value
    try:
        if _CELL_TIMEOUT.value is not None and not _CELL_TIMEOUT.value > 0:
            raise sweep.SweepError(f"--cell_timeout_s must be > 0, got {_CELL_TIMEOUT.value}.")
        if _REPORT_ONLY.value:
            if not pathlib.Path(output_dir).is_dir():
                raise sweep.SweepError(f"--output_dir={output_dir} is not a directory.")
            failed = []
        else:
            cells = _grid()
            if _PREFLIGHT.value:
                sweep.preflight(cells)
            outcome = sweep.run_sweep(
                output_dir=output_dir,
                cells=cells,
                progress=lambda line: print(line, flush=True),
                cell_timeout_s=_CELL_TIMEOUT.value,
            )
            failed = outcome.failed
            print(
                f"sweep: {len(outcome.completed)} ran, {len(outcome.skipped)} already complete, "
                f"{len(outcome.failed)} failed",
                flush=True,
            )
    except sweep.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "run_sweep.py", *sys.argv[1:]])
    if _REPORT_ONLY.value:
        description = f"Report regenerated from the runs on disk by `{command}`."
    else:
        description = f"Command: `{command}`."
    written = sweep.write_sweep_report(
        output_dir,
        description=description + " Each run's own command is listed under Cell commands.",
        failed=failed,
        example_category=_EXAMPLE_CATEGORY.value,
    )
    for record in written["records"]:
        print(f"{record['claim']}: {record['verdict']}")
    print(f"report: {written['report']}")
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(main)
