"""fedprompt.sweep: grid parsing, resume (complete cells are not rerun), the report.

Runs are faked (a runner that writes a results directory of hand-written scores,
tests/sweep_fixtures.py), so these tests need no TFF; the driver's flag errors
run `run_sweep.py` as a subprocess (its flags would clash with run_experiment's
in one process).
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

from fedprompt import claims, report, sweep
from tests.sweep_fixtures import (
    GOOD_FINETUNE,
    WEAK_FINETUNE,
    norm_rounds,
    personalization_rows,
    write_run_dir,
)

REPO = pathlib.Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- parsing


def test_parse_partitions():
    levels = sweep.parse_partitions("natural, dirichlet:0.1,home_fraction:0.9,dirichlet:inf")
    assert [level.label for level in levels] == [
        "natural",
        "dirichlet:0.1",
        "home_fraction:0.9",
        "dirichlet:inf",
    ]
    assert levels[1].flags == ("--partition=dirichlet", "--alpha=0.1")
    assert levels[2].flags == ("--partition=home_fraction", "--home_fraction=0.9")
    assert levels[1].file_name == "dirichlet_0.1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("iid", "'iid' is not natural, dirichlet:<alpha> or home_fraction:<fraction>"),
        ("dirichlet", "the value must be a number"),
        ("dirichlet:x", "the value must be a number"),
        ("dirichlet:0", "needs alpha > 0"),
        ("home_fraction:1.5", "needs a fraction in [0, 1]"),
        ("natural:1", "natural takes no value"),
        ("natural,natural", "lists an entry twice"),
        ("dirichlet:1,dirichlet:1.0", "lists a level twice"),
        ("", "must name at least one entry"),
    ],
)
def test_bad_partitions(text, message):
    with pytest.raises(sweep.SweepError, match="--partitions") as error:
        sweep.parse_partitions(text)
    assert message in str(error.value)


def test_parse_algorithms_and_errors():
    assert sweep.parse_algorithms("fedavg_sgd,fedavg_adam") == ["fedavg_sgd", "fedavg_adam"]
    with pytest.raises(sweep.SweepError, match="unknown algorithm 'fedprox'; choose from"):
        sweep.parse_algorithms("fedavg_sgd,fedprox")


def test_parse_sets_and_base_flags():
    common, scoped = sweep.parse_sets(
        ["rounds=3", "fedavg_adam:client_learning_rate=0.01", "personalization_epochs=0,1"],
        ["fedavg_sgd", "fedavg_adam"],
    )
    assert common == ["--rounds=3", "--personalization_epochs=0,1"]
    assert scoped == {"fedavg_adam": ["--client_learning_rate=0.01"]}
    assert sweep.parse_base_flags("--rounds=2 --personalization_epochs='0,1'") == [
        "--rounds=2",
        "--personalization_epochs=0,1",
    ]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sweep.parse_sets(["rounds"], ["fedsgd"]), "is not [algorithm:]key=value"),
        (lambda: sweep.parse_sets(["fedprox:rounds=1"], ["fedsgd"]), "not in --algorithms"),
        (lambda: sweep.parse_sets(["alpha=0.1"], ["fedsgd"]), "--alpha is set by the sweep grid"),
        (lambda: sweep.parse_base_flags("rounds=3"), "is not a --flag=value argument"),
        (lambda: sweep.parse_base_flags("--output_dir=x"), "--output_dir is set by the sweep"),
        (lambda: sweep.parse_base_flags("--nooverwrite"), "--nooverwrite is set by the sweep"),
        (lambda: sweep.parse_base_flags("--rounds='3"), "cannot be split like a shell line"),
    ],
)
def test_bad_pass_through_flags(call, message):
    with pytest.raises(sweep.SweepError) as error:
        call()
    assert message in str(error.value)


def test_build_grid_names_and_flag_order():
    cells = sweep.build_grid(
        algorithms=["fedavg_adam", "fedsgd"],
        levels=sweep.parse_partitions("natural,dirichlet:0.5"),
        base_flags=["--rounds=2"],
        algorithm_flags={"fedavg_adam": ["--client_learning_rate=0.01"]},
    )
    assert [c.name for c in cells] == [
        "fedavg_adam__natural",
        "fedsgd__natural",
        "fedavg_adam__dirichlet_0.5",
        "fedsgd__dirichlet_0.5",
    ]
    # Presets first, then the level, the common flags and the scoped ones (last wins).
    assert cells[2].argv == (
        "--algorithm=fedavg",
        "--client_optimizer=adam",
        "--client_learning_rate=0.03",
        "--partition=dirichlet",
        "--alpha=0.5",
        "--rounds=2",
        "--client_learning_rate=0.01",
    )
    assert cells[1].argv[-1] == "--rounds=2" and cells[1].algorithm == "fedsgd"


def test_training_flags_go_to_every_cell_but_the_local_baseline():
    cells = sweep.build_grid(
        algorithms=["fedavg_adam", "local"],
        levels=sweep.parse_partitions("natural"),
        base_flags=["--seed=9"],
        training_flags=sweep.parse_base_flags("--rounds=6 --runtime=xla", "training_flags"),
        algorithm_flags={"fedavg_adam": ["--client_learning_rate=0.01"]},
    )
    assert cells[0].argv[-4:] == (
        "--seed=9",
        "--rounds=6",
        "--runtime=xla",
        "--client_learning_rate=0.01",
    )
    assert cells[1].argv == ("--algorithm=local", "--partition=natural", "--seed=9")
    with pytest.raises(sweep.SweepError, match="--training_flags: --output_dir"):
        sweep.parse_base_flags("--output_dir=x", "training_flags")


# --------------------------------------------------------------------------- running


def _config(algorithm, level):
    name, _, value = level.label.partition(":")
    config = {"algorithm": algorithm.split("_")[0], "partition": name, "rounds": 2}
    if algorithm.startswith("fedavg"):
        config["client_optimizer"] = algorithm.split("_")[1]
    if name == "dirichlet":
        config["alpha"] = float(value)
    return config


# Per algorithm: (fine-tuning scores, client update norms) of the fake runs.
FAKE_SCORES = {
    "fedavg_adam": (GOOD_FINETUNE, (1.0, 3.0)),
    "fedavg_sgd": (WEAK_FINETUNE, (0.001, 0.003)),
}


class FakeRunner:
    """Writes a complete results directory instead of running run_experiment."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)

    def __call__(self, cell, *, cell_dir, log_path, progress):
        self.calls.append(cell.name)
        progress(f"[{cell.name}] fake run")
        if cell.name in self.fail:
            return 3
        finetune, norms = FAKE_SCORES[cell.algorithm]
        heterogeneity = 0.8 if cell.level.label == "natural" else 0.3
        write_run_dir(
            cell_dir,
            config=_config(cell.algorithm, cell.level),
            rows=personalization_rows(finetune),
            rounds=norm_rounds(norms, (1.0, 1.0)),
            heterogeneity=heterogeneity,
            flags=sweep._given_flags(cell.argv),
        )
        return 0


def _cells(partitions="natural"):
    return sweep.build_grid(
        algorithms=["fedavg_sgd", "fedavg_adam"],
        levels=sweep.parse_partitions(partitions),
        base_flags=["--rounds=2", "--personalization_epochs=0,1,4"],
    )


def test_complete_cells_are_not_rerun(tmp_path):
    cells = _cells()
    runner = FakeRunner()
    lines = []
    first = sweep.run_sweep(output_dir=tmp_path, cells=cells, runner=runner, progress=lines.append)
    assert first.completed == [c.name for c in cells] and runner.calls == first.completed
    marker = json.loads((tmp_path / cells[0].name / sweep.CELL_MARKER).read_text())
    assert marker["argv"] == list(cells[0].argv)

    # Rerun: nothing runs again. An interrupted cell (no report.md) runs again.
    (tmp_path / cells[1].name / report.REPORT_MD).unlink()
    runner.calls.clear()
    second = sweep.run_sweep(output_dir=tmp_path, cells=cells, runner=runner, progress=lines.append)
    assert second.skipped == [cells[0].name] and runner.calls == [cells[1].name]
    assert f"[{cells[0].name}] cell 1/2: complete, skipped" in lines

    # The same flags in another order (e.g. moved from --base_flags to
    # --training_flags) mean the same run: still complete.
    reordered = sweep.dataclasses.replace(cells[0], argv=tuple(reversed(cells[0].argv)))
    assert sweep.cell_is_complete(reordered, tmp_path / cells[0].name)
    # An overridden flag given last wins, as in absl: a different run.
    overridden = sweep.dataclasses.replace(cells[0], argv=cells[0].argv + ("--rounds=3",))
    assert not sweep.cell_is_complete(overridden, tmp_path / cells[0].name)

    # Changed flags: the marker no longer matches, so the cell is not complete.
    changed = _cells()[0]
    changed = sweep.dataclasses.replace(changed, argv=changed.argv + ("--seed=1",))
    assert not sweep.cell_is_complete(changed, tmp_path / changed.name)


def test_results_without_marker_complete_when_config_flags_match(tmp_path):
    cell = _cells()[0]
    FakeRunner()(cell, cell_dir=tmp_path / cell.name, log_path=None, progress=print)
    assert sweep.cell_is_complete(cell, tmp_path / cell.name)  # config.json flags match.
    other = sweep.dataclasses.replace(cell, argv=cell.argv[:-1] + ("--personalization_epochs=0,1",))
    assert not sweep.cell_is_complete(other, tmp_path / cell.name)
    runner = FakeRunner()
    outcome = sweep.run_sweep(output_dir=tmp_path, cells=[cell], runner=runner, progress=print)
    assert outcome.skipped == [cell.name] and runner.calls == []


def test_failed_cell_does_not_stop_the_others(tmp_path):
    cells = _cells()
    runner = FakeRunner(fail={cells[0].name})
    lines = []
    outcome = sweep.run_sweep(
        output_dir=tmp_path, cells=cells, runner=runner, progress=lines.append
    )
    assert outcome.failed == [cells[0].name] and outcome.completed == [cells[1].name]
    assert any("FAILED (exit status 3)" in line for line in lines)


def test_report_over_two_levels(tmp_path):
    cells = _cells("natural,dirichlet:1")
    sweep.run_sweep(output_dir=tmp_path, cells=cells, runner=FakeRunner(), progress=print)
    written = sweep.write_sweep_report(tmp_path, description="Command: `test`")

    records = json.loads((tmp_path / sweep.CLAIMS_JSON).read_text())
    verdicts = {r["claim"]: r["verdict"] for r in records}
    # Identical scores at both levels: C3 holds at each (see test_claims), C4
    # lacks runs, C6 sees no change in forgetting (0.15 at both levels).
    assert verdicts["C3"] == claims.PASS and verdicts["C4"] == claims.INCONCLUSIVE
    assert verdicts["C6"] == claims.FAIL
    c6 = next(r for r in records if r["claim"] == "C6")
    assert c6["numbers"]["order"] == ["dirichlet:1", "natural"]  # by heterogeneity 0.3 < 0.8
    assert written["records"] == records

    text = (tmp_path / sweep.SWEEP_REPORT_MD).read_text()
    assert "## Claims" in text and "| C3 | **PASS** |" in text and "Command: `test`" in text
    assert "[fedavg_adam__natural](fedavg_adam__natural/report.md)" in text
    assert {p.name for p in written["plots"]} == set(sweep.SWEEP_PLOTS)
    for name in ("tradeoff_by_level.png", "norms_by_level.png", "epochs_by_level.png"):
        assert (tmp_path / report.PLOTS_DIR / name).stat().st_size > 0
        assert f"(plots/{name})" in text

    # Every run's own command, from its marker, runnable as written.
    for cell in cells:
        command = sweep.cell_command(tmp_path / cell.name)
        assert shlex.split(command) == [
            "python",
            "run_experiment.py",
            *cell.argv,
            f"--output_dir={(tmp_path / cell.name).as_posix()}",
        ]
        assert f"- {cell.name}: `{command}`" in text
    # Results made by hand (no marker) or a damaged marker: said so, not hidden.
    (tmp_path / cells[1].name / sweep.CELL_MARKER).unlink()
    (tmp_path / cells[2].name / sweep.CELL_MARKER).write_text('{"argv": "--seed=1"}')
    (tmp_path / cells[3].name / sweep.CELL_MARKER).write_bytes(b"\xff\xfe not UTF-8")
    sweep.write_sweep_report(tmp_path)
    text = (tmp_path / sweep.SWEEP_REPORT_MD).read_text()
    assert f"- {cells[1].name}: no `sweep_cell.json` (results made outside the sweep" in text
    assert f'{cells[2].name}/sweep_cell.json: "argv" is not a list of flags.' in text
    assert f"{cells[3].name}/sweep_cell.json: unreadable (" in text
    # A damaged marker means the cell is not known to be complete: it reruns.
    assert not sweep.cell_is_complete(cells[3], tmp_path / cells[3].name)

    # An incomplete run is listed, not used.
    (tmp_path / cells[0].name / report.REPORT_MD).unlink()
    sweep.write_sweep_report(tmp_path)
    assert (
        f"Not included (incomplete or failed): {cells[0].name}"
        in (tmp_path / sweep.SWEEP_REPORT_MD).read_text()
    )


# --------------------------------------------------------------------------- driver


def _driver(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "run_sweep.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_driver_bad_flags_one_line_before_any_run(tmp_path):
    out = tmp_path / "sweep"
    result = _driver(f"--output_dir={out}", "--partitions=natural,iid")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --partitions: 'iid' is not natural, dirichlet:<alpha> or home_fraction:<fraction>."
    ]
    assert not out.exists()
    # A pass-through flag run_experiment rejects, found by its own parser.
    result = _driver(
        f"--output_dir={out}", "--algorithms=fedsgd", "--partitions=natural", "--set=rounds=0"
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fedsgd__natural" in lines[0] and "--rounds" in lines[0], lines
    assert not out.exists()


def test_driver_report_only(tmp_path):
    sweep.run_sweep(output_dir=tmp_path, cells=_cells(), runner=FakeRunner(), progress=print)
    result = _driver(f"--output_dir={tmp_path}", "--report_only")
    assert result.returncode == 0, result.stderr
    assert "C3: PASS" in result.stdout and "report:" in result.stdout
    text = (tmp_path / sweep.SWEEP_REPORT_MD).read_text()
    # Not presented as the command that made the runs: theirs are listed per cell.
    assert "Report regenerated from the runs on disk by `python run_sweep.py" in text
    assert "## Cell commands" in text and "Command:" not in text


# --------------------------------------------------------------------------- subprocess


def _fake_python(tmp_path, body):
    """A stand-in for the interpreter: a shell script that ignores its arguments."""
    script = tmp_path / "fake_python.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def _gone(pid, wait_s=5.0):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("hang", [False, True])
def test_subprocess_runner_stops_leftover_children(tmp_path, hang):
    # Like TFF's worker_binary, the child keeps the output pipe open after the
    # run exits; with `hang` the run itself never ends and times out.
    child_pid = tmp_path / "child.pid"
    python = _fake_python(
        tmp_path,
        f"echo started\nsleep 60 &\necho $! > {child_pid}\n" + ("sleep 60\n" if hang else ""),
    )
    cell = _cells()[0]
    lines = []
    started = time.monotonic()
    status = sweep.run_cell_subprocess(
        cell,
        cell_dir=tmp_path / cell.name,
        log_path=tmp_path / "logs" / "cell.log",
        progress=lines.append,
        python=python,
        timeout_s=1.0,
    )
    assert time.monotonic() - started < 10
    assert status == (124 if hang else 0)
    assert f"[{cell.name}] started" in lines
    assert _gone(int(child_pid.read_text()))
    log = (tmp_path / "logs" / "cell.log").read_text()
    assert "run_experiment.py --algorithm=fedavg" in log and "started" in log


def test_sigterm_of_the_sweep_stops_the_running_cell(tmp_path):
    # The sweep driver's SIGTERM handler, with a cell that never ends and leaves
    # a child behind (like TFF's worker_binary).
    child_pid = tmp_path / "child.pid"
    python = _fake_python(tmp_path, f"sleep 60 &\necho $! > {child_pid}\necho started\nsleep 60\n")
    script = tmp_path / "driver.py"
    script.write_text(
        "import pathlib, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import run_sweep\n"
        "from fedprompt import sweep\n"
        "signal.signal(signal.SIGTERM, run_sweep.exit_on_sigterm)\n"
        "cell = sweep.build_grid(algorithms=['fedavg_sgd'], "
        "levels=sweep.parse_partitions('natural'), base_flags=[])[0]\n"
        f"out = pathlib.Path({str(tmp_path)!r})\n"
        "sweep.run_cell_subprocess(cell, cell_dir=out / cell.name, log_path=out / 'cell.log', "
        f"progress=lambda line: print(line, flush=True), python={python!r})\n"
    )
    driver = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        for line in driver.stdout:  # Skips import chatter up to the cell's first line.
            if "started" in line:
                break
        driver.terminate()
        assert driver.wait(timeout=30) == 128 + 15
    finally:
        driver.kill()
    assert _gone(int(child_pid.read_text()))


# --------------------------------------------------------------------------- example client


def _two_client_run(run_dir):
    """A FedAvg run with test clients t1 (Translation) and t2 (Mathematics)."""
    rows = personalization_rows(GOOD_FINETUNE)
    # t2 (another category) has other scores; it must not enter the Translation curves.
    rows += [
        dict(r, client_id="t2", local_rougeL=0.9, global_rougeL=0.9)
        for r in rows
        if r["client_split"] == "test"
    ]
    # A second start: only the run's own start (fedavg) counts.
    rows += [dict(r, start="local", local_rougeL=0.0) for r in rows]
    write_run_dir(run_dir, config={"algorithm": "fedavg", "client_optimizer": "adam"}, rows=rows)
    partition = {
        "heterogeneity": 0.8,
        "clients": [
            {"client_id": "v1", "population": "validation", "home_category": "Translation"},
            {"client_id": "t1", "population": "test", "home_category": "Translation"},
            {"client_id": "t2", "population": "test", "home_category": "Mathematics"},
        ],
    }
    (run_dir / report.PARTITION_JSON).write_text(json.dumps(partition))
    return run_dir


def test_category_client_curves_are_that_clients_finetuning_curves(tmp_path):
    run_dir = _two_client_run(tmp_path / "fedavg_adam__natural")
    run = claims.load_run(run_dir)
    example = sweep.category_client_curves(run, run_dir, "Translation")
    assert example.client_ids == ("t1",) and example.algorithm == claims.FEDAVG_ADAM
    assert example.curves == {
        lr: [(float(e), pytest.approx(lo), pytest.approx(gl)) for e, lo, gl in curve]
        for lr, curve in GOOD_FINETUNE.items()
    }
    assert sweep.category_client_curves(run, run_dir, "Sentiment Analysis") is None


def test_report_has_the_example_client_section_and_plot(tmp_path):
    _two_client_run(tmp_path / "fedavg_adam__natural")
    written = sweep.write_sweep_report(tmp_path, example_category="Translation")
    text = (tmp_path / sweep.SWEEP_REPORT_MD).read_text()
    assert "## Example client: Translation" in text
    # lr 0.3: epochs 0 / 1 / 4, local 0.30 -> 0.50, global 0.50 -> 0.35 (GOOD_FINETUNE).
    assert "| t1 | 0.3 | 0 / 1 / 4 | 0.3 / 0.4 / 0.5 | 0.5 / 0.44 / 0.35 |" in text
    assert (tmp_path / report.PLOTS_DIR / sweep.EXAMPLE_CLIENT_PLOT) in written["plots"]
    # Without the category the section and a stale plot are gone.
    sweep.write_sweep_report(tmp_path)
    assert "## Example client" not in (tmp_path / sweep.SWEEP_REPORT_MD).read_text()
    assert not (tmp_path / report.PLOTS_DIR / sweep.EXAMPLE_CLIENT_PLOT).exists()
    sweep.write_sweep_report(tmp_path, example_category="Sentiment Analysis")
    assert (
        "No test client has home category 'Sentiment Analysis'"
        in (tmp_path / sweep.SWEEP_REPORT_MD).read_text()
    )
