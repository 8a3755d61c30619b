"""fedprompt.claims on hand-designed scores (tests/sweep_fixtures.py).

Every expected verdict and number below is worked out by hand from the fixture
scores; epoch 0 (the global prompt) is local 0.30 / global 0.50 in GOOD_FINETUNE.
"""

import math

import pytest

from fedprompt import claims
from tests.sweep_fixtures import (
    GOOD_FINETUNE,
    GOOD_HYPERVOLUME,
    WEAK_FINETUNE,
    WEAK_HYPERVOLUME,
    make_run,
    norm_rounds,
)

ADAM, SGD = claims.FEDAVG_ADAM, claims.FEDAVG_SGD


def _level(record, level="natural"):
    return record["numbers"]["levels"][level]


# --------------------------------------------------------------------------- hypervolume


def test_hypervolume_hand_example():
    # Rectangles [0, .5] x [0, .2] and [0, .3] x [0, .4]: 0.10 + 0.3 * 0.2; (0.2, 0.1)
    # is dominated and the NaN point is ignored.
    points = [(0.5, 0.2), (0.3, 0.4), (0.2, 0.1), (math.nan, 1.0)]
    assert claims.hypervolume(points) == pytest.approx(0.16)
    # Against (0.1, 0.1): 0.4 * 0.1 + 0.2 * 0.2.
    assert claims.hypervolume(points, reference=(0.1, 0.1)) == pytest.approx(0.08)
    assert claims.hypervolume([]) == 0.0
    assert claims.hypervolume([(0.5, 0.0)]) == 0.0  # Not above the reference.


def test_fixture_hypervolumes():
    hv = lambda run: claims._hypervolume_of(claims.grid_points(run, "finetune"))  # noqa: E731
    assert hv(make_run(ADAM)) == pytest.approx(GOOD_HYPERVOLUME)
    assert hv(make_run(SGD, finetune=WEAK_FINETUNE)) == pytest.approx(WEAK_HYPERVOLUME)


def test_first_crossing_interpolates_in_epochs():
    curve = claims.finetune_curves(make_run(ADAM))[0.3]
    # Local 0.30 -> 0.40 over epochs 0 -> 1 reaches 0.36 at 0.6 epochs, where
    # global is 0.50 - 0.6 * 0.06.
    epochs, global_ = claims.first_crossing(curve, 0.36)
    assert epochs == pytest.approx(0.6) and global_ == pytest.approx(0.464)
    assert claims.first_crossing(curve, 0.9) is None


# --------------------------------------------------------------------------- C1


def test_c1_pass():
    record = claims.claim_c1([make_run(ADAM)])
    numbers = _level(record)
    assert record["verdict"] == claims.PASS and numbers["verdict"] == claims.PASS
    # lr 0.3, 4 epochs: gain 0.50 - 0.30, forgetting 0.50 - 0.35; lr 0.01 at 4
    # epochs: 0.06 / 0.03; lr 0.3 at 1 epoch: 0.10 / 0.06.
    assert numbers["lr_max"] == 0.3 and numbers["epochs_max"] == 4 and numbers["epochs_min"] == 1
    assert numbers["local_gain"] == pytest.approx(0.20)
    assert numbers["forgetting"] == pytest.approx(0.15)
    assert numbers["local_gain_at_lr_min"] == pytest.approx(0.06)
    assert numbers["forgetting_at_lr_min"] == pytest.approx(0.03)
    assert numbers["local_gain_at_epochs_min"] == pytest.approx(0.10)
    assert numbers["forgetting_at_epochs_min"] == pytest.approx(0.06)
    assert numbers["run"] == "fedavg_adam__natural"


def test_c1_fail_without_forgetting():
    finetune = {**GOOD_FINETUNE, 0.3: [(0, 0.30, 0.50), (1, 0.40, 0.44), (4, 0.50, 0.52)]}
    record = claims.claim_c1([make_run(ADAM, finetune=finetune)])
    numbers = _level(record)
    assert record["verdict"] == claims.FAIL
    assert numbers["forgetting"] == pytest.approx(-0.02)
    assert numbers["checks"]["forgetting_positive"] is False
    assert numbers["checks"]["local_gain_positive"] is True


def test_c1_inconclusive_with_one_learning_rate():
    record = claims.claim_c1([make_run(ADAM, finetune={0.3: GOOD_FINETUNE[0.3]})])
    assert record["verdict"] == claims.INCONCLUSIVE
    assert "2 fine-tuning lrs" in _level(record)["reason"]


def test_reference_run_is_fedavg_adam_then_fedavg_sgd():
    weak_adam = make_run(ADAM, finetune=WEAK_FINETUNE)
    record = claims.claim_c1([make_run(SGD), weak_adam])
    assert _level(record)["run"] == "fedavg_adam__natural"
    assert _level(record)["local_gain"] == pytest.approx(0.10)  # WEAK: 0.30 - 0.20
    assert _level(claims.claim_c1([make_run(SGD)]))["run"] == "fedavg_sgd__natural"


# --------------------------------------------------------------------------- C2


def test_c2_pass_with_epochs_needed():
    record = claims.claim_c2([make_run(ADAM)])
    numbers = _level(record)
    assert record["verdict"] == claims.PASS
    # L* = min(0.36, 0.50); the small lr reaches it at epoch 4 (global 0.47), the
    # large lr at 0.6 epochs (global 0.464).
    assert numbers["matched_local"] == pytest.approx(0.36)
    assert numbers["global_at_match_small_lr"] == pytest.approx(0.47)
    assert numbers["global_at_match_large_lr"] == pytest.approx(0.464)
    assert numbers["epochs_to_match_small_lr"] == pytest.approx(4.0)
    assert numbers["epochs_to_match_large_lr"] == pytest.approx(0.6)
    assert numbers["epochs_ratio_small_to_large"] == pytest.approx(4.0 / 0.6)


def test_c2_fail_when_small_lr_forgets_more():
    finetune = {**GOOD_FINETUNE, 0.01: [(0, 0.30, 0.50), (1, 0.32, 0.49), (4, 0.36, 0.40)]}
    numbers = _level(record := claims.claim_c2([make_run(ADAM, finetune=finetune)]))
    assert record["verdict"] == claims.FAIL
    assert numbers["global_at_match_small_lr"] == pytest.approx(0.40)
    assert numbers["global_at_match_large_lr"] == pytest.approx(0.464)


def test_c2_fail_without_local_gain():
    flat = {lr: [(e, 0.30 - 0.01 * e, g) for e, _, g in c] for lr, c in GOOD_FINETUNE.items()}
    record = claims.claim_c2([make_run(ADAM, finetune=flat)])
    assert record["verdict"] == claims.FAIL
    assert "no local gain" in _level(record)["reason"]


# --------------------------------------------------------------------------- C3


def _sgd_adam(sgd_norms=(0.001, 0.003), adam_norms=(1.0, 3.0), sgd_finetune=WEAK_FINETUNE):
    return [
        make_run(SGD, finetune=sgd_finetune, rounds=norm_rounds(sgd_norms, (0.5, 0.5))),
        make_run(ADAM, rounds=norm_rounds(adam_norms, (1.0, 1.0))),
    ]


def test_c3_pass():
    record = claims.claim_c3(_sgd_adam())
    numbers = _level(record)
    assert record["verdict"] == claims.PASS
    assert numbers["hypervolume_fedavg_adam"] == pytest.approx(GOOD_HYPERVOLUME)
    assert numbers["hypervolume_fedavg_sgd"] == pytest.approx(WEAK_HYPERVOLUME)
    # Mean update norms 0.002 and 2.0; gradient norms 0.5 and 1.0.
    assert numbers["update_norm_ratio_sgd_to_adam"] == pytest.approx(0.001)
    assert numbers["update_norm_orders_of_magnitude"] == pytest.approx(3.0)
    assert numbers["grad_norm_ratio_sgd_to_adam"] == pytest.approx(0.5)


def test_c3_fail_when_sgd_updates_are_larger():
    record = claims.claim_c3(_sgd_adam(sgd_norms=(2.0, 4.0), adam_norms=(1.0, 1.0)))
    assert record["verdict"] == claims.FAIL
    assert _level(record)["update_norm_ratio_sgd_to_adam"] == pytest.approx(3.0)


def test_c3_fail_when_sgd_tradeoff_is_better():
    record = claims.claim_c3(_sgd_adam(sgd_finetune={0.3: [(0, 0.6, 0.6), (1, 0.7, 0.5)]}))
    # 0.7 * 0.5 + 0.6 * 0.1 = 0.41 > 0.2312.
    assert record["verdict"] == claims.FAIL
    assert _level(record)["hypervolume_fedavg_sgd"] == pytest.approx(0.41)


def test_c3_pass_when_sgd_scores_are_all_zero():
    zero = {0.3: [(0, 0.0, 0.0), (1, 0.0, 0.0)]}
    record = claims.claim_c3(_sgd_adam(sgd_finetune=zero))
    assert record["verdict"] == claims.PASS
    assert _level(record)["hypervolume_fedavg_sgd"] == 0.0


def test_all_zero_scores_are_inconclusive():
    zero = {lr: [(e, 0.0, 0.0) for e, _, _ in c] for lr, c in GOOD_FINETUNE.items()}
    runs = [
        make_run(ADAM, finetune=zero, rounds=norm_rounds((1.0,), (1.0,))),
        make_run(SGD, finetune=zero, rounds=norm_rounds((0.1,), (1.0,))),
    ]
    for claim in (claims.claim_c1, claims.claim_c2, claims.claim_c3, claims.claim_c5):
        record = claim(runs)
        assert record["verdict"] == claims.INCONCLUSIVE, record["claim"]
        assert "every score involved is 0" in _level(record)["reason"]


def test_levels_without_a_reference_run_are_inconclusive():
    # Any known algorithm can be the reference (FedAvg(Adam) first); a level with
    # only runs of algorithms claims does not know has none.
    runs = [make_run("fedprox")]
    for claim in (claims.claim_c1, claims.claim_c2, claims.claim_c5):
        record = claim(runs)
        assert record["verdict"] == claims.INCONCLUSIVE, record["claim"]
        assert _level(record)["reason"].startswith("no run of fedavg_adam, "), record["claim"]


def test_c3_inconclusive_without_sgd_run():
    record = claims.claim_c3([make_run(ADAM)])
    assert record["verdict"] == claims.INCONCLUSIVE
    assert _level(record)["reason"] == "missing runs: fedavg_sgd"


def test_verdicts_combine_over_levels():
    passing = _sgd_adam()
    failing = [
        claims.dataclasses.replace(run, level="dirichlet:0.1")
        for run in _sgd_adam(sgd_norms=(2.0, 4.0), adam_norms=(1.0, 1.0))
    ]
    assert claims.claim_c3(passing + failing)["verdict"] == claims.FAIL
    only_adam = [claims.dataclasses.replace(make_run(ADAM), level="dirichlet:0.1")]
    record = claims.claim_c3(passing + only_adam)
    assert record["verdict"] == claims.PASS
    assert _level(record, "dirichlet:0.1")["verdict"] == claims.INCONCLUSIVE


# --------------------------------------------------------------------------- C4


def test_c4_pass_and_fail():
    runs = [make_run(ADAM), make_run(claims.FEDSGD, finetune=WEAK_FINETUNE)]
    weak_centralized = make_run(claims.CENTRALIZED, finetune=WEAK_FINETUNE)
    record = claims.claim_c4(runs + [weak_centralized])
    assert record["verdict"] == claims.PASS
    assert _level(record)["hypervolume_centralized"] == pytest.approx(WEAK_HYPERVOLUME)
    # Centralized: every global score of GOOD_FINETUNE + 0.05 adds 0.05 * 0.50
    # (the largest local score) to the hypervolume.
    better = {lr: [(e, lo, gl + 0.05) for e, lo, gl in c] for lr, c in GOOD_FINETUNE.items()}
    record = claims.claim_c4(runs + [make_run(claims.CENTRALIZED, finetune=better)])
    assert record["verdict"] == claims.FAIL
    assert _level(record)["hypervolume_centralized"] == pytest.approx(GOOD_HYPERVOLUME + 0.025)


def test_c4_inconclusive_without_centralized():
    record = claims.claim_c4([make_run(ADAM), make_run(claims.FEDSGD)])
    assert record["verdict"] == claims.INCONCLUSIVE
    assert _level(record)["reason"] == "missing runs: centralized"


# --------------------------------------------------------------------------- C5

# At E1 = 1 epoch, fine-tuning points (0.32, 0.49) and (0.40, 0.44):
# hypervolume 0.40 * 0.44 + 0.32 * 0.05 = 0.192.
FINETUNE_E1_HYPERVOLUME = 0.192
GOOD_L2 = {0.01: [(0, 0.30, 0.50), (1, 0.33, 0.50)], 0.3: [(0, 0.30, 0.50), (1, 0.39, 0.47)]}
# 0.39 * 0.47 + 0.33 * 0.03.
GOOD_L2_HYPERVOLUME = 0.1932
BAD_L2 = {0.01: [(0, 0.30, 0.50), (1, 0.31, 0.50)], 0.3: [(0, 0.30, 0.50), (1, 0.38, 0.48)]}
GOOD_INTERPOLATION = {
    (0.01, 0.5): [(0, 0.30, 0.50), (1, 0.36, 0.50)],
    (0.3, 0.5): [(0, 0.30, 0.50), (1, 0.41, 0.45)],
}
# 0.41 * 0.45 + 0.36 * 0.05.
GOOD_INTERPOLATION_HYPERVOLUME = 0.2025
# alpha 0.5: 0.38 * 0.47 + 0.35 * 0.02 = 0.1856 < 0.192. With the alpha = 1
# points (= fine-tuning) counted it would be 0.1944 > 0.192, so this also checks
# that alpha in {0, 1} is left out.
BAD_INTERPOLATION = {
    (0.01, 0.5): [(0, 0.30, 0.50), (1, 0.35, 0.49)],
    (0.3, 0.5): [(0, 0.30, 0.50), (1, 0.38, 0.47)],
    (0.01, 1.0): GOOD_FINETUNE[0.01][:2],
    (0.3, 1.0): GOOD_FINETUNE[0.3][:2],
}


def test_c5_pass():
    run = make_run(ADAM, l2=GOOD_L2, interpolation=GOOD_INTERPOLATION)
    record = claims.claim_c5([run])
    numbers = _level(record)
    assert record["verdict"] == claims.PASS
    assert numbers["epochs"] == 1
    assert numbers["hypervolume_finetune"] == pytest.approx(FINETUNE_E1_HYPERVOLUME)
    assert numbers["hypervolume_l2"] == pytest.approx(GOOD_L2_HYPERVOLUME)
    assert numbers["hypervolume_interpolation"] == pytest.approx(GOOD_INTERPOLATION_HYPERVOLUME)
    assert numbers["hypervolume_gain_l2"] == pytest.approx(0.0012)


def test_c5_fail_when_interpolation_does_not_help():
    record = claims.claim_c5([make_run(ADAM, l2=GOOD_L2, interpolation=BAD_INTERPOLATION)])
    assert record["verdict"] == claims.FAIL
    assert _level(record)["hypervolume_interpolation"] == pytest.approx(0.1856)


def test_c5_fail_when_l2_does_not_help():
    record = claims.claim_c5([make_run(ADAM, l2=BAD_L2, interpolation=GOOD_INTERPOLATION)])
    # 0.38 * 0.48 + 0.31 * 0.02.
    assert record["verdict"] == claims.FAIL
    assert _level(record)["hypervolume_l2"] == pytest.approx(0.1886)


def test_c5_inconclusive_without_l2_points():
    record = claims.claim_c5([make_run(ADAM, interpolation=GOOD_INTERPOLATION)])
    assert record["verdict"] == claims.INCONCLUSIVE
    assert "no l2 points" in _level(record)["reason"]


def test_per_level_records_follow_heterogeneity_not_input_order():
    # Directory order put `centralized__natural` before any dirichlet run; the
    # records must still read from least to most heterogeneous.
    natural = [make_run(a, "natural", heterogeneity=0.8) for a in (claims.CENTRALIZED, ADAM)]
    dirichlet = [make_run(a, "dirichlet:1", heterogeneity=0.2) for a in (claims.CENTRALIZED, ADAM)]
    for runs in (natural + dirichlet, dirichlet + natural):
        for claim in (
            claims.claim_c1,
            claims.claim_c2,
            claims.claim_c3,
            claims.claim_c4,
            claims.claim_c5,
        ):
            assert list(claim(runs)["numbers"]["levels"]) == ["dirichlet:1", "natural"]


# --------------------------------------------------------------------------- C6


def _scaled(forgetting_at_max):
    """GOOD_FINETUNE with global 0.50 - forgetting at (lr 0.3, 4 epochs)."""
    return {
        **GOOD_FINETUNE,
        0.3: [(0, 0.30, 0.50), (1, 0.40, 0.44), (4, 0.50, 0.50 - forgetting_at_max)],
    }


def test_c6_pass_orders_levels_by_measured_heterogeneity():
    runs = [  # Given most heterogeneous first: the order comes from heterogeneity.
        make_run(ADAM, "natural", finetune=_scaled(0.15), heterogeneity=0.8),
        make_run(ADAM, "dirichlet:1", finetune=_scaled(0.05), heterogeneity=0.2),
    ]
    record = claims.claim_c6(runs)
    numbers = record["numbers"]
    assert record["verdict"] == claims.PASS
    assert numbers["order"] == ["dirichlet:1", "natural"]
    assert numbers["least_heterogeneous"] == "dirichlet:1"
    assert numbers["forgetting_increase"] == pytest.approx(0.10)
    assert numbers["local_gain_increase"] == pytest.approx(0.0)
    assert numbers["levels"]["natural"]["forgetting"] == pytest.approx(0.15)


def test_c6_fail_when_forgetting_shrinks():
    runs = [
        make_run(ADAM, "natural", finetune=_scaled(0.05), heterogeneity=0.8),
        make_run(ADAM, "dirichlet:1", finetune=_scaled(0.15), heterogeneity=0.2),
    ]
    record = claims.claim_c6(runs)
    assert record["verdict"] == claims.FAIL
    assert record["numbers"]["forgetting_increase"] == pytest.approx(-0.10)


def test_c6_fail_when_no_level_forgets():
    # The global score rises at both levels (negative forgetting), less so at the
    # most heterogeneous one: -0.02 > -0.10, but there is no trade-off to widen.
    runs = [
        make_run(ADAM, "natural", finetune=_scaled(-0.02), heterogeneity=0.8),
        make_run(ADAM, "dirichlet:1", finetune=_scaled(-0.10), heterogeneity=0.2),
    ]
    record = claims.claim_c6(runs)
    assert record["verdict"] == claims.FAIL
    assert record["numbers"]["forgetting_increase"] == pytest.approx(0.08)
    assert "no forgetting at the most heterogeneous level (natural)" in record["numbers"]["reason"]


def test_c6_inconclusive_with_one_level():
    assert claims.claim_c6([make_run(ADAM), make_run(SGD)])["verdict"] == claims.INCONCLUSIVE


# --------------------------------------------------------------------------- all


def test_evaluate_claims_records_and_no_runs():
    records = claims.evaluate_claims([])
    assert [r["claim"] for r in records] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    assert all(r["verdict"] == claims.INCONCLUSIVE for r in records)
    records = claims.evaluate_claims(_sgd_adam())
    for record in records:
        assert set(record) == {"claim", "statement", "verdict", "numbers", "criterion"}
        assert record["criterion"] and record["statement"]
    assert {r["claim"]: r["verdict"] for r in records}["C3"] == claims.PASS


def test_labels_from_config():
    assert claims.algorithm_label({"algorithm": "fedavg", "client_optimizer": "adam"}) == ADAM
    assert claims.algorithm_label({"algorithm": "fedsgd"}) == "fedsgd"
    assert claims.level_label({"partition": "dirichlet", "alpha": 0.1}) == "dirichlet:0.1"
    assert claims.level_label({"partition": "home_fraction", "home_fraction": 0.9}) == (
        "home_fraction:0.9"
    )
    assert claims.level_label({"partition": "natural"}) == "natural"
