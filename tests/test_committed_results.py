"""The committed sweeps in docs/runs/ agree with the code and with docs/RESULTS.md.

Each committed sweep directory holds its cells' results (config, CSVs, summaries)
and the `claims.json` and `sweep_report.md` written from them. These tests recompute
the claims from the committed cells with the current `fedprompt.claims` and check
that `claims.json` is what they give, and that docs/RESULTS.md shows each sweep's
claims table as its report has it. A change to the claims code, or a rerun cell,
without regenerating the report and the docs fails here (regenerate with
`python run_sweep.py --output_dir=<sweep> --report_only`, see docs/RESULTS.md).
"""

import json
import math
import pathlib

import pytest

from fedprompt import claims, report, sweep

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "docs" / "RESULTS.md"
COMMITTED_SWEEPS = sorted(p.parent for p in (REPO / "docs" / "runs").glob("*/claims.json"))


def _complete_runs(sweep_dir: pathlib.Path):
    return [claims.load_run(p) for p in sweep.discover_run_dirs(sweep_dir) if sweep.has_results(p)]


def _assert_close(actual, expected, where="claims"):
    """Equal structure and strings; floats equal to 1e-9 (JSON round trip, BLAS order)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool):
        assert isinstance(actual, (int, float)), where
        assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12), (
            f"{where}: {actual} != {expected}"
        )
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_committed_sweeps_exist():
    # Guards the parametrized tests below against silently testing nothing.
    assert COMMITTED_SWEEPS, "no docs/runs/*/claims.json: the committed sweeps are missing"


@pytest.mark.parametrize("sweep_dir", COMMITTED_SWEEPS, ids=lambda p: p.name)
def test_claims_json_is_what_the_committed_cells_give(sweep_dir):
    runs = _complete_runs(sweep_dir)
    assert runs, f"{sweep_dir}: claims.json but no complete cell"
    recomputed = json.loads(json.dumps(claims.evaluate_claims(runs), allow_nan=False))
    committed = json.loads((sweep_dir / sweep.CLAIMS_JSON).read_text())
    _assert_close(recomputed, committed)


@pytest.mark.parametrize("sweep_dir", COMMITTED_SWEEPS, ids=lambda p: p.name)
def test_results_md_shows_the_committed_claims_table(sweep_dir):
    report_lines = (sweep_dir / sweep.SWEEP_REPORT_MD).read_text().splitlines()
    claim_rows = [line for line in report_lines if line.startswith("| C")]
    assert [row.split("|")[1].strip() for row in claim_rows] == [f"C{i}" for i in range(1, 7)]
    results = RESULTS_MD.read_text()
    missing = [row.split("|")[1].strip() for row in claim_rows if row not in results]
    assert not missing, (
        f"docs/RESULTS.md does not show {sweep_dir.name}'s claims rows {missing} as "
        f"{sweep_dir.relative_to(REPO)}/sweep_report.md has them; copy its claims table."
    )


@pytest.mark.parametrize("sweep_dir", COMMITTED_SWEEPS, ids=lambda p: p.name)
def test_cells_of_a_sweep_used_one_backbone_listed_in_results_md(sweep_dir):
    # Cells are compared with each other, so they must share the backbone's
    # weights (the tiny backbone is pre-trained per machine: a cell from another
    # machine would differ). Cells older than the fingerprint record none.
    recorded = {}
    for run_dir in sweep.discover_run_dirs(sweep_dir):
        config = json.loads((run_dir / report.CONFIG_JSON).read_text())
        fingerprint = config.get("resolved_backbone", {}).get("weights_sha256")
        if fingerprint is not None:
            recorded.setdefault(fingerprint, []).append(run_dir.name)
    assert len(recorded) <= 1, f"{sweep_dir.name}: cells ran on different backbones: {recorded}"
    for fingerprint in recorded:
        assert f"`{fingerprint}`" in RESULTS_MD.read_text(), (
            f"{sweep_dir.name}'s backbone fingerprint {fingerprint} is not in docs/RESULTS.md's "
            "Backbones table."
        )
